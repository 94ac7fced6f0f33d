"""Export a plan to serving engines: launch scripts for vLLM and SGLang, manifests for Kubernetes.

``common`` holds what a plan instance asks and what an engine can express (gaps, ``--nearest``);
``vllm``, ``sglang`` and ``k8s`` hold one target each; ``export`` writes the files; ``targets`` holds
the engines ``hetserve plan --target`` keeps a plan to; ``nearest_cost`` simulates what ``--nearest``
changes cost. docs/deploy.md.
"""
