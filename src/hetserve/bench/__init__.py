"""Measuring servers and models: a load generator for any OpenAI-compatible server (``loadgen``), the
``hetserve bench`` command (``cli``), and model quality under quantisation (``quality``)."""
