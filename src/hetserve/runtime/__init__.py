"""The inference engine: Llama-family models on a paged KV cache, driven by the shared scheduler.

Exports load lazily so that ``hetserve.runtime.generate`` can be imported (and report a missing
PyTorch clearly) on installs without the engine extra.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "EngineConfig": ".engine",
    "LLMEngine": ".engine",
    "RequestOutput": ".engine",
    "SamplingParams": ".sampling",
    "run_generate": ".generate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
