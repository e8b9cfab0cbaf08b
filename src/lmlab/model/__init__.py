"""The model: one config, one Block, four families."""

from lmlab.model.attention import KVCache
from lmlab.model.ffn import register_ffn
from lmlab.model.model import Model, ModelOutput

__all__ = ["KVCache", "Model", "ModelOutput", "register_ffn"]
