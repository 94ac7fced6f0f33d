"""Llama-family models: architecture config, the PyTorch module, loaders, tokenizer, model sources.

Submodules are imported directly (``from hetserve.runtime.model.llama import LlamaModel``); only
``source`` and ``config`` work without PyTorch installed.
"""
