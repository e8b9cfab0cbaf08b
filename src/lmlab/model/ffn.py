"""Feed-forward layers and the FFN slot's registry.

A Block asks `build_ffn(cfg)` for its FFN. Dense FFNs live here; Mixture-of-Experts layers
register themselves under their own names, so the Block never changes when a new kind arrives.
An FFN module maps (B, T, C) -> (B, T, C); it may take `token_mask` (B, T), True for real tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ACTIVATIONS, FFN_KINDS, ModelConfig
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


# the backward of each element-wise function, writing into a given tensor: (grad_out, input, out)
_ACT_BACKWARD_INTO: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "silu": lambda g, x, out: torch.ops.aten.silu_backward.grad_input(g, x, grad_input=out),
    "gelu": lambda g, x, out: torch.ops.aten.gelu_backward.grad_input(g, x, approximate="none", grad_input=out),
    "gelu_tanh": lambda g, x, out: torch.ops.aten.gelu_backward.grad_input(g, x, approximate="tanh", grad_input=out),
    "relu": lambda g, x, out: torch.ops.aten.threshold_backward.grad_input(g, x, 0, grad_input=out),
}


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up [* scale] over h = [gate | up], with a hand-written backward.

    Left to autograd, the same expression keeps act(gate) and the product alive for the backward and
    ends it by concatenating the gate's and the up half's gradients into a new (.., 2F) tensor. Here
    only h (and scale) is kept, act(gate) is recomputed, and both halves of the gradient are written
    straight into one tensor: fewer passes over the largest activations of the layer and less memory.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, scale: torch.Tensor | None, act: str) -> torch.Tensor:
        f = h.shape[-1] // 2
        out = ACT_FNS[act](h[..., :f]).mul_(h[..., f:])
        if scale is not None:
            out.mul_(scale)
        ctx.act = act
        ctx.save_for_backward(h, scale)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, scale = ctx.saved_tensors
        f = h.shape[-1] // 2
        gate, up = h[..., :f], h[..., f:]
        grad = grad.contiguous()
        a = ACT_FNS[ctx.act](gate)
        grad_scale = None
        if scale is not None and ctx.needs_input_grad[1]:  # d/d scale = sum over the hidden of grad * act(gate) * up
            grad_scale = torch.linalg.vecdot(a * up, grad).unsqueeze(-1).sum_to_size(scale.shape)
        grad_out = grad * scale if scale is not None else grad
        grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
        torch.mul(grad_out, a, out=grad_h[..., f:])  # d up
        torch.mul(grad_out, up, out=a)  # reuse the buffer: d act(gate)
        _ACT_BACKWARD_INTO[ctx.act](a, gate, grad_h[..., :f])  # d gate
        return grad_h, grad_scale, None


def gated_activation(h: torch.Tensor, act: str, scale: torch.Tensor | None = None) -> torch.Tensor:
    """act(gate) * up (times scale, broadcast over the hidden) for h = [gate | up] on its last dimension:
    the hidden activation of SwiGLU / GeGLU / ReGLU. `act` is an ACT_FNS name."""
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or (scale is not None and scale.requires_grad))
    if torch.compiler.is_compiling() or not needs_grad:
        # inductor fuses the plain expression itself; without autograd there is nothing to save
        gate, up = h.chunk(2, dim=-1)
        out = ACT_FNS[act](gate) * up
        return out * scale if scale is not None else out
    return _GatedActivation.apply(h, scale, act)


class DenseFFN(nn.Module):
    """down(act(up(x))), or for gated kinds (SwiGLU, GeGLU) down(act(gate(x)) * up(x)).

    The gated kinds keep gate and up in one matrix, `up`, of 2 * d_ff rows (gate first): one GEMM.
    """

    def __init__(self, cfg: ModelConfig, layer_index: int = 0, *, d_ff: int | None = None) -> None:
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.act_name, self.gated = ACTIVATIONS[cfg.activation]
        self.act = ACT_FNS[self.act_name]
        self.up = Linear(cfg.d_model, 2 * d_ff if self.gated else d_ff, bias=cfg.bias)
        self.down = Linear(d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.up(x)
        return self.down(gated_activation(h, self.act_name) if self.gated else self.act(h))


def register_ffn(name: str, builder: Callable[[ModelConfig, int], nn.Module]) -> None:
    """Make `ModelConfig(ffn=name)` build its FFN slots with `builder(cfg, layer_index)`. The layer index
    lets a kind vary by depth (an MoE layer every k-th block, dense elsewhere)."""
    FFN_KINDS[name] = builder


register_ffn("dense", DenseFFN)


def build_ffn(cfg: ModelConfig, layer_index: int) -> nn.Module:
    return FFN_KINDS[cfg.ffn](cfg, layer_index)
