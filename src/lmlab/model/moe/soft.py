"""Soft MoE (Puigcerver et al. 2023): each expert's `moe_slots` slots are learned convex combinations
of a sequence's tokens; each token's output is a convex combination of the slots' outputs. It mixes
tokens across positions, so it is offered for encoders only (a causal model would see the future)."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.model.moe.experts import GroupedExperts
from lmlab.model.moe.losses import RoutingRecord


class SoftMoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_ffn, self.n_slots = cfg.moe_experts, cfg.moe_slots
        self.slots = nn.Linear(cfg.d_model, self.n_ffn * self.n_slots, bias=False)  # Phi, (E*S, D)
        self.experts = GroupedExperts(cfg)
        self.n_experts = self.n_ffn

    def expert_name(self, e: int) -> str:
        return f"e{e}"

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None, previous: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoutingRecord]:
        shape = x.shape
        x_BTD = x.reshape(-1, shape[-2], shape[-1])
        B, T, D = x_BTD.shape
        E, S = self.n_ffn, self.n_slots
        logits_BTX = self.slots(x_BTD).float()  # X = E * S slots
        if token_mask is not None:  # padding tokens feed no slot
            dispatch_logits = logits_BTX.masked_fill(~token_mask.reshape(B, T, 1).bool(), float("-inf"))
        else:
            dispatch_logits = logits_BTX
        dispatch_BTX = dispatch_logits.softmax(1).nan_to_num(0.0)  # each slot: a convex mix of the tokens
        # (a sequence that is all padding feeds its slots nothing instead of NaN)
        combine_BTX = logits_BTX.softmax(-1)  # each token: a convex combination of the slots
        slots_BXD = torch.einsum("btx,btd->bxd", dispatch_BTX.to(x_BTD.dtype), x_BTD)
        slots_AD = slots_BXD.view(B, E, S, D).transpose(0, 1).reshape(E * B * S, D)  # grouped by expert
        out_AD = self.experts(slots_AD, torch.full((E,), B * S, device=x_BTD.device, dtype=torch.long))
        out_BXD = out_AD.view(E, B, S, D).transpose(0, 1).reshape(B, E * S, D)
        y = torch.einsum("btx,bxd->btd", combine_BTX.to(out_BXD.dtype), out_BXD)
        probs = combine_BTX.view(B * T, E, S).sum(-1)  # a token's weight on each expert
        weights = probs.detach()
        if token_mask is not None:
            probs = probs[token_mask.reshape(-1).bool()]
        record = RoutingRecord(weights, probs, probs.mean(0) if len(probs) else probs.new_zeros(E), 0.0)
        return y.reshape(shape), record
