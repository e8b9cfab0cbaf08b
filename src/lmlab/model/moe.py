"""Mixture-of-Experts FFN: a router sends each token to k expert FFNs; their outputs are mixed back.

Routers: "topk" (softmax, then the k largest; k=1 is Switch, k=2 GShard / Mixtral) and "noisy"
(Shazeer et al. 2017: learned, softplus-scaled Gaussian noise on the logits while training).
With `moe_renormalize` the k chosen weights are rescaled to sum to 1 (Mixtral).

Dispatch is dropless by default: the (token, expert) assignments are sorted by expert, every
expert multiplies one contiguous slice of tokens (one GEMM per expert, no loop over tokens, no
[tokens x experts x capacity] one-hot), and outputs are added back with index_add. With a capacity
factor, each expert takes at most capacity = ceil(factor * tokens * k / experts) assignments in
token order; the overflow is dropped and those tokens pass through on the residual.

Auxiliary losses (kept in `aux_loss`, added to the training loss by the Model whenever a weight is
non-zero): Switch load balancing alpha * E * sum_i f_i * P_i, and the ST-MoE router z-loss
mean(logsumexp(logits)^2). Padding tokens count in neither the losses nor the statistics.

Tensor names carry their shape: T tokens, D model width, E experts, K chosen experts, A assignments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ACTIVATIONS, ModelConfig
from lmlab.model.ffn import DenseFFN, activation_fn, register_ffn


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.noisy, self.renormalize = cfg.moe_router == "noisy", cfg.moe_renormalize
        self.capacity_factor = cfg.moe_capacity_factor
        self.aux_weight, self.z_weight = cfg.moe_aux_weight, cfg.moe_z_weight
        d, d_ff = cfg.d_model, cfg.moe_d_ff or cfg.d_ff
        self.act, self.gated = activation_fn(cfg.activation), ACTIVATIONS[cfg.activation][1]
        self.router = nn.Linear(d, self.n_experts, bias=False)
        self.noise = nn.Linear(d, self.n_experts, bias=False) if self.noisy else None
        # expert weights stored grouped, (E, in, out), as grouped-GEMM kernels want them
        self.w_up = nn.Parameter(torch.empty(self.n_experts, d, (2 if self.gated else 1) * d_ff))
        self.w_down = nn.Parameter(torch.empty(self.n_experts, d_ff, d))
        nn.init.normal_(self.w_up, std=cfg.init_std)
        nn.init.normal_(self.w_down, std=cfg.init_std)
        self.shared = DenseFFN(cfg, d_ff=d_ff * cfg.moe_shared_experts) if cfg.moe_shared_experts else None
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits TE, chosen weights TK, chosen experts TK)."""
        logits_TE = self.router(x_TD).float()
        if self.noise is not None and self.training:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * F.softplus(self.noise(x_TD).float())
        probs_TE = logits_TE.softmax(-1)
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.renormalize and self.top_k > 1:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return logits_TE, weights_TK, experts_TK

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w_up[e]
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return h @ self.w_down[e]

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]
        logits_TE, weights_TK, experts_TK = self.route(x_TD)

        # sort the T*K assignments by expert; a stable sort keeps token order inside each expert
        expert_A = experts_TK.reshape(-1)
        order_A = torch.argsort(expert_A, stable=True)
        token_A, expert_sorted_A = order_A // self.top_k, expert_A[order_A]
        counts_E = torch.bincount(expert_A, minlength=self.n_experts)
        kept_TK = None
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * T * self.top_k / self.n_experts)
            starts_E = torch.cumsum(counts_E, 0) - counts_E
            rank_A = torch.arange(len(order_A), device=x.device) - starts_E[expert_sorted_A]
            keep_A = rank_A < capacity  # in sorted order
            kept_TK = torch.zeros(T * self.top_k, dtype=torch.bool, device=x.device)
            kept_TK[order_A[keep_A]] = True
            kept_TK = kept_TK.view(T, self.top_k)
            counts_E = counts_E.clamp(max=capacity)
            order_A, token_A = order_A[keep_A], token_A[keep_A]
        x_AD = x_TD[token_A]
        y_AD = torch.empty_like(x_AD)
        start = 0
        for e, n in enumerate(counts_E.tolist()):  # one GEMM pair per expert over a contiguous slice
            if n:
                y_AD[start:start + n] = self._expert(e, x_AD[start:start + n])
            start += n
        w_A = weights_TK.reshape(-1)[order_A].to(y_AD.dtype)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_A, y_AD * w_A[:, None])
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        self._losses_and_stats(logits_TE, experts_TK, kept_TK, token_mask)
        return y_TD.reshape(shape)

    def _losses_and_stats(self, logits_TE: torch.Tensor, experts_TK: torch.Tensor, kept_TK: torch.Tensor | None,
                          token_mask: torch.Tensor | None) -> None:
        if token_mask is not None:  # padding tokens count in neither the losses nor the statistics
            real_T = token_mask.reshape(-1).bool()
            logits_TE, experts_TK = logits_TE[real_T], experts_TK[real_T]
            kept_TK = kept_TK[real_T] if kept_TK is not None else None
        E, n = self.n_experts, max(logits_TE.shape[0], 1)
        probs_TE = logits_TE.softmax(-1)
        load_E = torch.bincount(experts_TK.reshape(-1), minlength=E).float() / (n * self.top_k)  # f_i
        importance_E = probs_TE.mean(0) if logits_TE.shape[0] else torch.zeros(E, device=logits_TE.device)  # P_i
        loss = logits_TE.new_zeros(())
        if self.aux_weight:
            loss = loss + self.aux_weight * E * (load_E * importance_E).sum()
        if self.z_weight and logits_TE.shape[0]:
            loss = loss + self.z_weight * torch.logsumexp(logits_TE, -1).pow(2).mean()
        self.aux_loss = loss if (self.aux_weight or self.z_weight) else None
        with torch.no_grad():
            dropped = 1.0 - kept_TK.float().mean().item() if kept_TK is not None and kept_TK.numel() else 0.0
            self.stats = {"load": load_E.detach(), "cv": (load_E.std() / load_E.mean().clamp(min=1e-9)).detach(),
                          "entropy": -(probs_TE * probs_TE.clamp(min=1e-9).log()).sum(-1).mean().detach(),
                          "dropped": torch.tensor(dropped)}


def _build(cfg: ModelConfig, layer_index: int) -> nn.Module:
    """MoE in every moe_every-th layer (the last of each group), dense FFNs elsewhere."""
    if layer_index % cfg.moe_every == cfg.moe_every - 1:
        return MoE(cfg)
    return DenseFFN(cfg, layer_index)


register_ffn("moe", _build)
