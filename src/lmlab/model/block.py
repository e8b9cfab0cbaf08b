"""The one Block every family uses: self-attention, optional cross-attention, then the FFN slot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.model.attention import Attention, LayerKV
from lmlab.model.ffn import build_ffn


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    """Pre-norm (GPT-2, T5): x + f(norm(x)). Post-norm (BERT, BART): norm(x + f(x)).

    The mask policy is not the Block's business: the Stack builds the mask once and passes it
    down, so one Block serves encoders, decoders and prefix-LMs alike.
    """

    def __init__(self, cfg: ModelConfig, layer_index: int, cross: bool = False) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.cross_norm = make_norm(cfg) if cross else None
        self.cross_attn = Attention(cfg, cross=True) if cross else None
        self.ffn_norm = make_norm(cfg)
        self.ffn = build_ffn(cfg, layer_index)
        self.routed = hasattr(self.ffn, "expert_name")  # an MoE layer: takes `previous`, returns a record
        self.drop = nn.Dropout(cfg.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre_norm:
            y = f(norm(x))
            return x + (self.drop(y) if self.training else y)
        y = f(x)
        return norm(x + (self.drop(y) if self.training else y))

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: LayerKV | None = None,
        memory: torch.Tensor | None = None,  # (B, S, C)
        memory_mask: torch.Tensor | None = None,
        cross_cache: LayerKV | None = None,
        token_mask: torch.Tensor | None = None,  # (B, T) True for real tokens, for MoE statistics
        previous: torch.Tensor | None = None,  # the previous MoE layer's router logits (MoE++ gating residual)
    ) -> tuple[torch.Tensor, Any]:
        """The new hidden states and the FFN's routing record (None for a dense FFN)."""
        x = self._residual(x, self.attn_norm, lambda h: self.attn(h, mask, is_causal, rope, cache))
        if self.cross_attn is not None:
            x = self._residual(
                x, self.cross_norm, lambda h: self.cross_attn(h, memory_mask, cache=cross_cache, memory=memory)
            )
        record = None

        def ffn(h: torch.Tensor) -> torch.Tensor:
            nonlocal record
            out = self.ffn(h, token_mask, previous) if self.routed else self.ffn(h, token_mask)
            if isinstance(out, tuple):  # a routed FFN returns (output, routing record)
                out, record = out
            return out

        return self._residual(x, self.ffn_norm, ffn), record
