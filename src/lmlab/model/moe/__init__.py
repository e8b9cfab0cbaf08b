"""Mixture-of-Experts FFNs as composable parts.

  router.py    token-choice routers (top-k, noisy, dense; jitter; MoE++ gating residual), expert choice
  dispatch.py  sort assignments by expert, capacity with token dropping, combine
  experts.py   GroupedExperts (one grouped GEMM; the seam expert parallelism wraps), MoE++ experts
  losses.py    load balancing, CV^2 importance / load, z-loss; the RoutingRecord a forward returns
  layer.py     MoE: the token- and expert-choice layer with shared experts
  soft.py      Soft MoE (encoders only)

`ModelConfig(ffn="moe")` builds an MoE layer in every `moe_every`-th Block (after the first
`moe_first_dense`), a dense FFN elsewhere; `moe_router="soft"` builds a SoftMoE.
"""

from __future__ import annotations

from torch import nn

from lmlab.config import ModelConfig
from lmlab.model.ffn import DenseFFN, register_ffn
from lmlab.model.moe.experts import GroupedExperts, ZeroComputeExperts, grouped_matmul
from lmlab.model.moe.layer import MoE
from lmlab.model.moe.losses import RoutingRecord
from lmlab.model.moe.soft import SoftMoE

MOE_LAYERS = (MoE, SoftMoE)


def _build(cfg: ModelConfig, layer_index: int) -> nn.Module:
    if not cfg.is_moe_layer(layer_index):
        return DenseFFN(cfg, layer_index)
    if cfg.moe_router == "soft":
        return SoftMoE(cfg)
    return MoE(cfg, has_previous=any(cfg.is_moe_layer(i) for i in range(layer_index)))


register_ffn("moe", _build)

__all__ = ["MOE_LAYERS", "GroupedExperts", "MoE", "RoutingRecord", "SoftMoE", "ZeroComputeExperts", "grouped_matmul"]
