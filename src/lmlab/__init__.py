"""lmlab: pre-train, fine-tune, compare and serve Transformer language models of every family.

The public names load on first use (PEP 562), so `import lmlab.config` or `lmlab --help` does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "PRESETS": "lmlab.config",
    "ModelConfig": "lmlab.config",
    "preset": "lmlab.config",
    "CheckpointError": "lmlab.errors",
    "ConfigError": "lmlab.errors",
    "DataError": "lmlab.errors",
    "LmlabError": "lmlab.errors",
    "load": "lmlab.io",
    "save": "lmlab.io",
    "convert": "lmlab.io",
    "KVCache": "lmlab.model",
    "Model": "lmlab.model",
    "ModelOutput": "lmlab.model",
    "register_ffn": "lmlab.model",
    "RoutingRecord": "lmlab.model",
    "keep_freed_memory": "lmlab.runtime",
    "FamilySpec": "lmlab.families",
    "FAMILIES": "lmlab.families",
    "complete": "lmlab.generate",
    "stream": "lmlab.generate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
