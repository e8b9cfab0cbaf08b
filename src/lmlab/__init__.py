"""lmlab: pre-train, fine-tune, compare and serve Transformer language models of every family."""

from lmlab.config import PRESETS, ModelConfig, preset
from lmlab.errors import CheckpointError, ConfigError, DataError, LmlabError
from lmlab.io import load, save
from lmlab.model import KVCache, Model, ModelOutput, register_ffn
from lmlab.runtime import keep_freed_memory

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "CheckpointError", "ConfigError", "DataError", "KVCache", "LmlabError", "Model", "ModelConfig",
    "ModelOutput", "keep_freed_memory", "load", "preset", "register_ffn", "save",
]
