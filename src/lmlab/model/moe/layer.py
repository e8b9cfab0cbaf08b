"""The MoE FFN: route, dispatch sorted by expert, run the experts, combine; plus shared experts.

A layer composes a router (router.py), the dispatch (dispatch.py), the grouped FFN experts and
MoE++'s zero-computation experts (experts.py) and the losses (losses.py). Its forward returns the
output and a RoutingRecord; the layer keeps nothing from one forward to the next.

Router outputs are ordered FFN experts first, then zero, copy and constant experts. DeepSeekMoE is
configuration: fine-grained experts (small `moe_d_ff`, larger k) plus `moe_shared_experts` every
token passes through (Qwen2-MoE also gates the shared expert with a sigmoid: `moe_shared_gate`).

Tensor names carry their shape: T tokens, D model width, E experts, K chosen per token, A assignments.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.model.ffn import DenseFFN
from lmlab.model.moe import dispatch, losses
from lmlab.model.moe.experts import GroupedExperts, ZeroComputeExperts
from lmlab.model.moe.losses import RoutingRecord
from lmlab.model.moe.router import ExpertChoiceRouter, TokenChoiceRouter, TokenRouting


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, has_previous: bool = False) -> None:
        super().__init__()
        self.kind = cfg.moe_router
        self.n_ffn = cfg.moe_experts  # FFN experts come first in the router's output ...
        self.n_zero, self.n_copy, self.n_const = cfg.moe_zero_experts, cfg.moe_copy_experts, cfg.moe_constant_experts
        self.n_experts = cfg.moe_total_experts  # ... then zero, copy and constant experts
        self.top_k = self.n_experts if self.kind == "dense" else cfg.moe_top_k
        self.capacity_factor, self.capacity = cfg.moe_capacity_factor, cfg.moe_capacity
        self.weights = dict(
            lb=cfg.moe_aux_weight, z=cfg.moe_z_weight, importance=cfg.moe_importance_weight, load=cfg.moe_load_weight
        )
        self.router = ExpertChoiceRouter(cfg) if self.kind == "expert-choice" else TokenChoiceRouter(cfg, has_previous)
        self.experts = GroupedExperts(cfg)
        self.zero_compute = ZeroComputeExperts(cfg) if self.n_copy or self.n_const else None
        self.shared = None
        if cfg.moe_shared_experts:
            self.shared = DenseFFN(cfg.replace(activation=cfg.expert_activation, bias=False), d_ff=cfg.shared_d_ff)
        # (routed_E, tokens, probs_sum_E) -> the same over every training process; set by
        # lmlab.train.distributed.use_global_routing_stats, None in one process
        self.reduce_stats: Callable[[torch.Tensor, int, torch.Tensor], tuple[torch.Tensor, int, torch.Tensor]] | None
        self.reduce_stats = None
        self.shared_gate = (
            nn.Linear(cfg.d_model, 1, bias=False) if cfg.moe_shared_experts and cfg.moe_shared_gate else None
        )

    def expert_name(self, e: int) -> str:
        """e3 for FFN expert 3; zero0, copy0, const1 for MoE++ experts."""
        for prefix, n in (("e", self.n_ffn), ("zero", self.n_zero), ("copy", self.n_copy), ("const", self.n_const)):
            if e < n:
                return f"{prefix}{e}"
            e -= n
        raise IndexError(e)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e (any kind) on rows x: the plain definition, used by tests as the reference."""
        if e < self.n_ffn:
            return self.experts.one(e, x)
        if e < self.n_ffn + self.n_zero:
            return torch.zeros_like(x)
        return self.zero_compute.one(e - self.n_ffn, x)

    def route(self, x_TD: torch.Tensor, previous_TE: torch.Tensor | None = None) -> TokenRouting:
        return self.router(x_TD, previous_TE)

    # ---- forward ------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None, previous: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoutingRecord]:
        """(B, T, D) or (T, D) -> the same shape, and the routing record. `previous` is the previous MoE
        layer's router logits (MoE++ gating residual)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        real_T = token_mask.reshape(-1).bool() if token_mask is not None else None
        if self.kind == "expert-choice":
            y_TD, record = self._expert_choice(x_TD, real_T)
        else:
            y_TD, record = self._token_choice(x_TD, real_T, previous, seq_len=shape[-2] if x.dim() > 2 else shape[0])
        y = y_TD.reshape(shape)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + shared
        return y, record

    def _token_choice(
        self, x_TD: torch.Tensor, real_T: torch.Tensor | None, previous: torch.Tensor | None, seq_len: int
    ) -> tuple[torch.Tensor, RoutingRecord]:
        K = self.top_k
        r = self.router(x_TD, previous)
        d = dispatch.sort_by_expert(r.experts_TK, self.n_experts)
        if self.capacity is not None or self.capacity_factor is not None:
            capacity = self.capacity or math.ceil(self.capacity_factor * seq_len * K / self.n_ffn)
            d = dispatch.apply_capacity(d, capacity, seq_len, self.n_ffn, K)
        w_A = r.weights_TK.reshape(-1)[d.order_A].to(x_TD.dtype)
        n_ffn = int(d.counts_E[: self.n_ffn].sum()) if self.n_experts > self.n_ffn else len(d.order_A)
        tok = d.token_A[:n_ffn]
        y_AD = self.experts(x_TD.index_select(0, tok), d.counts_E[: self.n_ffn], w_A[:n_ffn])
        y_TD = dispatch.combine(y_AD, tok, torch.zeros_like(x_TD))
        if self.zero_compute is not None:  # after the FFN experts; zero experts (first) add nothing
            start = n_ffn + int(d.counts_E[self.n_ffn : self.n_ffn + self.n_zero].sum())
            tok = d.token_A[start:]
            y_ZD = self.zero_compute(x_TD[tok], d.expert_A[start:] - self.n_ffn) * w_A[start:, None]
            y_TD = dispatch.combine(y_ZD, tok, y_TD)
        kept_TK = r.weights_TK if d.kept_TK is None else r.weights_TK * d.kept_TK
        return y_TD, self._token_choice_record(r, d, real_T, kept_TK.detach())

    def _token_choice_record(
        self, r: TokenRouting, d: dispatch.Dispatch, real_T: torch.Tensor | None, kept_weights_TK: torch.Tensor
    ) -> RoutingRecord:
        logits_TE, chosen_TE, noise_TE, weights_TK, experts_TK, kept_TK = (
            r.logits_TE,
            r.chosen_TE,
            r.noise_TE,
            r.weights_TK,
            r.experts_TK,
            d.kept_TK,
        )
        routed_E = d.routed_E
        if real_T is not None:  # padding tokens count in neither the losses nor the statistics
            logits_TE, chosen_TE, weights_TK, experts_TK = (
                t[real_T] for t in (logits_TE, chosen_TE, weights_TK, experts_TK)
            )
            noise_TE = noise_TE[real_T] if noise_TE is not None else None
            kept_TK = kept_TK[real_T] if kept_TK is not None else None
            routed_E = dispatch.count(experts_TK.reshape(-1), self.n_experts)
        n = max(logits_TE.shape[0], 1)
        probs_TE = logits_TE.softmax(-1)
        if self.reduce_stats is not None and self.training:  # counts over every rank (set from outside)
            routed_E, tokens, probs_sum_E = self.reduce_stats(routed_E, logits_TE.shape[0], probs_TE.sum(0))
            n = max(tokens, 1)
            load_E, importance_E = routed_E.float() / (n * self.top_k), probs_sum_E / n
        else:
            load_E = routed_E.float() / (n * self.top_k)  # f_i
            importance_E = probs_TE.mean(0) if logits_TE.shape[0] else probs_TE.new_zeros(self.n_experts)  # P_i
        w = self.weights
        out: dict[str, torch.Tensor | None] = {"z": w["z"] * losses.z_loss(logits_TE) if w["z"] and n else None}
        if w["lb"]:
            out["lb"] = w["lb"] * losses.load_balancing(load_E, importance_E)
        if w["importance"]:  # Shazeer: CV^2 of the summed gate values
            gates_TE = torch.zeros_like(probs_TE).scatter_(1, experts_TK, weights_TK)
            out["importance"] = w["importance"] * losses.cv_squared(gates_TE.sum(0))
        if w["load"] and noise_TE is not None and logits_TE.shape[0]:
            out["load"] = w["load"] * losses.cv_squared(
                losses.smooth_load(logits_TE, chosen_TE, noise_TE, self.top_k).sum(0)
            )
        dropped = 1.0 - kept_TK.float().mean() if kept_TK is not None and kept_TK.numel() else 0.0
        return RoutingRecord(
            kept_weights_TK,
            probs_TE,
            load_E,
            dropped,
            {k: v for k, v in out.items() if v is not None},
            router_logits_TE=r.logits_TE,
            experts_TK=r.experts_TK,
        )

    def _expert_choice(self, x_TD: torch.Tensor, real_T: torch.Tensor | None) -> tuple[torch.Tensor, RoutingRecord]:
        E = self.n_ffn
        logits_TE, scores_TE, token_EC, weights_EC = self.router(x_TD, real_T)
        capacity = token_EC.shape[1]
        token_A = token_EC.reshape(-1)
        counts_E = torch.full((E,), capacity, device=x_TD.device, dtype=torch.long)
        y_AD = self.experts(x_TD.index_select(0, token_A), counts_E, weights_EC.reshape(-1).to(x_TD.dtype))
        y_TD = dispatch.combine(y_AD, token_A, torch.zeros_like(x_TD))
        chosen_TE = torch.zeros_like(scores_TE).index_put_(
            (token_A, torch.arange(E, device=x_TD.device).repeat_interleave(capacity)),
            torch.ones_like(token_A, dtype=scores_TE.dtype),
        )
        weights_TE = (chosen_TE * scores_TE).detach()
        if real_T is not None:
            logits_TE, chosen_TE = logits_TE[real_T], chosen_TE[real_T]
        n = max(logits_TE.shape[0], 1)
        load_E = chosen_TE.sum(0) / chosen_TE.sum().clamp(min=1)
        z = self.weights["z"] * losses.z_loss(logits_TE) if self.weights["z"] and logits_TE.shape[0] else None
        return y_TD, RoutingRecord(
            weights_TE,
            logits_TE.softmax(-1),
            load_E,
            (chosen_TE.sum(-1) == 0).sum() / n,
            {"z": z} if z is not None else {},
            router_logits_TE=logits_TE,
        )
