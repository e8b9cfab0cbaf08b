"""The model: one config, one Block, four families."""

from lmlab.model.attention import KVCache
from lmlab.model.ffn import register_ffn
from lmlab.model.model import Model, ModelOutput
from lmlab.model.moe import MoE, RoutingRecord, SoftMoE

__all__ = ["KVCache", "MoE", "Model", "ModelOutput", "RoutingRecord", "SoftMoE", "register_ffn"]
