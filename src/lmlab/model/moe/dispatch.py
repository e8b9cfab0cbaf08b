"""Token dispatch: sort the (token, expert) assignments by expert, apply a capacity, combine back.

Dispatch never builds a [tokens x experts x capacity] one-hot (MegaBlocks' dropless layout): the
T*K assignments are sorted by expert with a stable sort (token order kept inside each expert), so
each expert reads one contiguous slice, and outputs are added back to their tokens with index_add.
With a capacity, an FFN expert keeps at most `capacity` assignments of each sequence (the sequence is
the group, as in GShard and Switch), in token order; the overflow is dropped and rides the residual.
Zero-computation experts cost nothing and keep all their assignments.

Names: T tokens, K chosen per token, E experts, A assignments, G (expert, sequence) groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def count(index: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in index: bincount without the host sync that CUDA's bincount
    makes (it reads the maximum back to size its output)."""
    return torch.zeros(n, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))


@dataclass
class Dispatch:
    order_A: torch.Tensor  # positions in the flattened (T, K) choices, sorted by expert
    token_A: torch.Tensor  # the token of each assignment
    expert_A: torch.Tensor  # its expert (non-decreasing)
    counts_E: torch.Tensor  # assignments per expert after capacity
    routed_E: torch.Tensor  # assignments per expert before capacity
    kept_TK: torch.Tensor | None = None  # (T, K) False where capacity dropped a choice; None = dropless


def sort_by_expert(experts_TK: torch.Tensor, n_experts: int) -> Dispatch:
    K = experts_TK.shape[1]
    expert_A = experts_TK.reshape(-1)
    order_A = torch.argsort(expert_A, stable=True)
    expert_A = expert_A[order_A]
    counts_E = count(expert_A, n_experts)
    return Dispatch(order_A, order_A // K, expert_A, counts_E, counts_E)


def apply_capacity(d: Dispatch, capacity: int, seq_len: int, n_ffn: int, K: int) -> Dispatch:
    """Keep each FFN expert's first `capacity` assignments of every sequence of `seq_len` tokens."""
    n_experts = d.counts_E.shape[0]
    T = d.order_A.shape[0] // K
    n_seq = T // seq_len
    group_A = d.expert_A * n_seq + d.token_A // seq_len  # (expert, sequence) groups are contiguous
    counts_G = count(group_A, n_experts * n_seq)
    starts_G = torch.cumsum(counts_G, 0) - counts_G
    rank_A = torch.arange(len(d.order_A), device=d.order_A.device) - starts_G[group_A]
    keep_A = (rank_A < capacity) | (d.expert_A >= n_ffn)
    kept_TK = torch.zeros(T * K, dtype=torch.bool, device=d.order_A.device)
    kept_TK[d.order_A[keep_A]] = True
    expert_A = d.expert_A[keep_A]
    return Dispatch(
        d.order_A[keep_A], d.token_A[keep_A], expert_A, count(expert_A, n_experts), d.routed_E, kept_TK.view(T, K)
    )


def combine(y_AD: torch.Tensor, token_A: torch.Tensor, out_TD: torch.Tensor) -> torch.Tensor:
    """out_TD plus each assignment's output added to its token (a new tensor; autograd-safe)."""
    return out_TD.index_add(0, token_A, y_AD.to(out_TD.dtype))
