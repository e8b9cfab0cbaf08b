"""The experts: FFN experts stored grouped, and MoE++'s zero-computation experts.

`GroupedExperts.forward(x_sorted, counts)` is the seam expert parallelism wraps: it takes rows already
grouped by expert (counts_E rows for expert e, in expert order) and returns their outputs in the same
order. An expert-parallel wrapper exchanges the rows between ranks (all-to-all) around this call and
the rest of the layer does not change (MegaBlocks' forward_once / parallel_forward_once split).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ACTIVATIONS, ModelConfig
from lmlab.model.ffn import activation_fn, gated_activation

_GROUPED_MM = getattr(F, "grouped_mm", None)


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return (
        t.data_ptr() % 16 == 0
        and all(s * size % 16 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
        and t.stride(-1) == 1
    )


def grouped_matmul(x_AD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Rows of x_AD in contiguous groups (counts_E rows for expert e, in expert order) times w_EDF[e].

    One grouped GEMM where torch offers one for this device and dtype (CPU float32/bfloat16, CUDA
    bfloat16, 16-byte aligned rows); otherwise one GEMM per expert over its slice.
    """
    device = x_AD.device.type
    if torch.is_autocast_enabled(device):  # run the experts in the autocast dtype, as nn.Linear would
        x_AD = x_AD.to(torch.get_autocast_dtype(device))
    w_EDF = w_EDF.to(x_AD.dtype)
    fast_dtype = x_AD.dtype == torch.bfloat16 or (x_AD.device.type == "cpu" and x_AD.dtype == torch.float32)
    if _GROUPED_MM is not None and fast_dtype and _aligned(x_AD) and _aligned(w_EDF):
        return _GROUPED_MM(x_AD, w_EDF, offs=torch.cumsum(counts_E, 0).to(torch.int32))
    out, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        out.append(x_AD[start : start + n] @ w_EDF[e])
        start += n
    return torch.cat(out) if out else x_AD.new_zeros(0, w_EDF.shape[-1])


class GroupedExperts(nn.Module):
    """E FFN experts with weights stored grouped, (E, in, out), as grouped-GEMM kernels want them."""

    def __init__(self, cfg: ModelConfig, n_experts: int | None = None) -> None:
        super().__init__()
        n = cfg.moe_experts if n_experts is None else n_experts
        d, d_ff = cfg.d_model, cfg.expert_d_ff
        self.act_name, self.gated = ACTIVATIONS[cfg.expert_activation]
        self.act = activation_fn(cfg.expert_activation)
        self.w_up = nn.Parameter(torch.empty(n, d, (2 if self.gated else 1) * d_ff))
        self.w_down = nn.Parameter(torch.empty(n, d_ff, d))
        self.init_std = cfg.init_std
        self.init_weights()

    @property
    def n_experts(self) -> int:
        return self.w_up.shape[0]

    def init_weights(self) -> None:
        nn.init.normal_(self.w_up, std=self.init_std)
        nn.init.normal_(self.w_down, std=self.init_std)

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor, w_A: torch.Tensor | None = None) -> torch.Tensor:
        """Rows grouped by expert -> their outputs, each scaled by its routing weight w_A. The weight
        multiplies whichever is narrower, the hidden activation or the output (same result: the down
        projection is linear), which matters for fine-grained experts."""
        h = grouped_matmul(x_AD, self.w_up, counts_E)
        d_ff = self.w_down.shape[1]
        scale_hidden = w_A is not None and d_ff <= x_AD.shape[-1]
        if self.gated:
            h = gated_activation(h, self.act_name, w_A[:, None] if scale_hidden else None)
        else:
            h = self.act(h)
            if scale_hidden:
                h = h * w_A[:, None]
        y = grouped_matmul(h, self.w_down, counts_E)
        return y * w_A[:, None] if w_A is not None and not scale_hidden else y

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on rows x: the plain definition, for tests and references."""
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
        counts[e] = len(x)
        return self(x, counts)


class ZeroComputeExperts(nn.Module):
    """MoE++ (Jin et al. 2024): zero experts output 0, copy experts the input, constant experts
    alpha_1 x + alpha_2 v_j with v_j learned and alpha = softmax(W_c x). Indices are local: zero
    experts first, then copy, then constant."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_zero, self.n_copy, self.n_const = cfg.moe_zero_experts, cfg.moe_copy_experts, cfg.moe_constant_experts
        self.init_std = cfg.init_std
        if self.n_const:
            self.const_vec = nn.Parameter(torch.empty(self.n_const, cfg.d_model))
            self.const_gate = nn.Linear(cfg.d_model, 2 * self.n_const, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        if self.n_const:
            nn.init.normal_(self.const_vec, std=self.init_std)
            nn.init.normal_(self.const_gate.weight, std=self.init_std)

    def forward(self, x_AD: torch.Tensor, j_A: torch.Tensor) -> torch.Tensor:
        """Copy and constant experts (zero experts never reach here) on their assignments; j_A is the
        local index (n_zero + i for copy expert i, n_zero + n_copy + j for constant expert j)."""
        c_A = j_A - (self.n_zero + self.n_copy)  # constant-expert index, < 0 for copy
        if not self.n_const:
            return x_AD
        is_const = (c_A >= 0)[:, None]
        c_A = c_A.clamp(min=0)
        gate_A2 = self.const_gate(x_AD).view(len(x_AD), self.n_const, 2)
        alpha_A2 = gate_A2.gather(1, c_A[:, None, None].expand(-1, 1, 2)).squeeze(1).softmax(-1)
        const_AD = alpha_A2[:, :1] * x_AD + alpha_A2[:, 1:] * self.const_vec[c_A]
        return torch.where(is_const, const_AD, x_AD)

    def one(self, j: int, x: torch.Tensor) -> torch.Tensor:
        if j < self.n_zero:
            return torch.zeros_like(x)
        return self(x, torch.full((len(x),), j, dtype=torch.long, device=x.device))
