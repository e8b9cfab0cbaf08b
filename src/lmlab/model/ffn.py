"""Feed-forward layers and the FFN slot's registry.

A Block asks `build_ffn(cfg)` for its FFN. Dense FFNs live here; Mixture-of-Experts layers
register themselves under their own names, so the Block never changes when a new kind arrives.
An FFN module maps (B, T, C) -> (B, T, C); it may take `token_mask` (B, T), True for real tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ACTIVATIONS, ModelConfig
from lmlab.model.linear import Linear


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The element-wise function of an activation name ("swiglu" -> silu)."""
    return ACT_FNS[ACTIVATIONS[name][0]]


class DenseFFN(nn.Module):
    """down(act(up(x))), or for gated kinds (SwiGLU, GeGLU) down(act(gate(x)) * up(x)).

    The gated kinds keep gate and up in one matrix, `up`, of 2 * d_ff rows (gate first): one GEMM.
    """

    def __init__(self, cfg: ModelConfig, layer_index: int = 0, *, d_ff: int | None = None) -> None:
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.act = activation_fn(cfg.activation)
        self.gated = ACTIVATIONS[cfg.activation][1]
        self.up = Linear(cfg.d_model, 2 * d_ff if self.gated else d_ff, bias=cfg.bias)
        self.down = Linear(d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down(h)


# name -> builder(cfg, layer_index) -> module. The layer index lets a kind vary by depth
# (an MoE layer every k-th block, dense elsewhere).
FFN_KINDS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {"dense": DenseFFN}


def register_ffn(name: str, builder: Callable[[ModelConfig, int], nn.Module]) -> None:
    """Make `ModelConfig(ffn=name)` build its FFN slots with `builder(cfg, layer_index)`."""
    FFN_KINDS[name] = builder


def build_ffn(cfg: ModelConfig, layer_index: int) -> nn.Module:
    return FFN_KINDS[cfg.ffn](cfg, layer_index)
