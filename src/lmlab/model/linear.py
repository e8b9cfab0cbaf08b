"""Linear layers that are fast with few rows on the CPU, which is what decoding feeds them.

`F.linear(x, W)` asks the BLAS for x @ W^T. With few rows (a decode step: one token per sequence)
MKL runs that orientation far below the memory bandwidth the weights need; asked for the same
product as (W @ x^T)^T it runs faster for a few rows and the same for one row or for thousands
(bench/linear_orientation.py; the measurements are in docs/benchmarks.md, "Decoding speed"). Only float32 on the CPU outside autocast takes
the other orientation; everything else is `F.linear` unchanged. The result equals F.linear's up to
the summation order of the GEMM (float32 rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SKINNY_ROWS = 256  # above this the two orientations run at the same speed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed as (weight @ x^T)^T when x has few rows on the CPU."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        1 < rows <= SKINNY_ROWS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    ):
        xt = x.reshape(rows, x.shape[-1]).t()
        y = torch.addmm(bias[:, None], weight, xt) if bias is not None else weight @ xt
        return y.t().contiguous().view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
