"""Routers: which experts each token goes to, and with what weight.

Token choice (`moe_router`):
  "topk"   softmax over the experts, then the k largest (k=1 Switch, k=2 GShard / Mixtral);
  "noisy"  Shazeer et al. 2017: learned, softplus-scaled Gaussian noise on the logits while
           training, then top-k;
  "dense"  every expert, softmax-weighted (the dense-gating baseline).
Weights: `moe_renormalize` None (default) rescales the k chosen probabilities to sum to 1 for k > 1
(GShard, Mixtral) and keeps Switch's raw probability at k = 1; True rescales at k = 1 too (weight 1,
as Mixtral's code does); False never rescales (DeepSeekMoE, Qwen2-MoE). Switch's jitter multiplies
the router's input by U(1-eps, 1+eps) while training. MoE++'s gating residual adds a learned
projection of the previous MoE layer's logits to this layer's.

Expert choice (Zhou et al. 2022): each expert takes its top-C tokens, C = capacity_factor * T * k / E.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig


@dataclass
class TokenRouting:
    logits_TE: torch.Tensor  # clean router logits, float32, gating residual included
    chosen_TE: torch.Tensor  # what top-k ran on: the logits plus noise (noisy router, training) or the logits
    noise_TE: torch.Tensor | None  # the noise scale (noisy router, training)
    weights_TK: torch.Tensor
    experts_TK: torch.Tensor


class TokenChoiceRouter(nn.Module):
    def __init__(self, cfg: ModelConfig, has_previous: bool = False) -> None:
        super().__init__()
        self.n_experts = cfg.moe_total_experts
        self.kind = cfg.moe_router
        self.top_k = self.n_experts if self.kind == "dense" else cfg.moe_top_k
        self.renormalize = cfg.moe_renormalizes
        self.jitter = cfg.moe_jitter
        self.gate = nn.Linear(cfg.d_model, self.n_experts, bias=False)
        self.noise = nn.Linear(cfg.d_model, self.n_experts, bias=False) if self.kind == "noisy" else None
        self.residual = (
            nn.Linear(self.n_experts, self.n_experts, bias=False) if cfg.moe_gating_residual and has_previous else None
        )
        # (rank, world size) of a data-parallel run, set by lmlab.train.distributed.share_router_noise:
        # the training noise is then drawn for every rank's tokens and this rank keeps its own, so N
        # processes draw what one process draws for the global batch
        self.noise_shard: tuple[int, int] | None = None

    def _noise(self, like: torch.Tensor, draw: str) -> torch.Tensor:
        """Noise shaped like `like` (this rank's tokens x features): U(1-eps, 1+eps) or N(0, 1)."""
        rank, size = self.noise_shard or (0, 1)
        T = like.shape[0]
        full = torch.empty((size * T, *like.shape[1:]), dtype=like.dtype, device=like.device)
        full = full.uniform_(1.0 - self.jitter, 1.0 + self.jitter) if draw == "jitter" else full.normal_()
        return full[rank * T : (rank + 1) * T]

    def logits(self, x_TD: torch.Tensor, previous_TE: torch.Tensor | None = None) -> torch.Tensor:
        """Clean router logits (T, E), float32, the gating residual included."""
        if self.jitter and self.training:
            x_TD = x_TD * self._noise(x_TD, "jitter")
        logits_TE = self.gate(x_TD).float()
        if self.residual is not None and previous_TE is not None and previous_TE.shape == logits_TE.shape:
            logits_TE = logits_TE + self.residual(previous_TE.to(self.residual.weight.dtype)).float()
        return logits_TE

    def forward(self, x_TD: torch.Tensor, previous_TE: torch.Tensor | None = None) -> TokenRouting:
        logits_TE = self.logits(x_TD, previous_TE)
        noise_TE, chosen_TE = None, logits_TE
        if self.noise is not None and self.training:
            noise_TE = F.softplus(self.noise(x_TD).float()) + 1e-2  # Shazeer's noise epsilon
            chosen_TE = logits_TE + self._noise(logits_TE, "normal") * noise_TE
        probs_TE = chosen_TE.softmax(-1)
        if self.kind == "dense":
            experts_TK = torch.arange(self.n_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
            return TokenRouting(logits_TE, chosen_TE, noise_TE, probs_TE, experts_TK)
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return TokenRouting(logits_TE, chosen_TE, noise_TE, weights_TK, experts_TK)


class ExpertChoiceRouter(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.capacity_factor = cfg.moe_capacity_factor or 1.0
        self.gate = nn.Linear(cfg.d_model, self.n_experts, bias=False)

    def forward(
        self, x_TD: torch.Tensor, real_T: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean logits TE, softmax scores TE, each expert's tokens EC, their scores EC). Padding
        tokens are picked last."""
        T = x_TD.shape[0]
        logits_TE = self.gate(x_TD).float()
        scores_TE = logits_TE.softmax(-1)
        pick_TE = scores_TE if real_T is None else scores_TE.masked_fill(~real_T[:, None], -1.0)
        capacity = min(T, math.ceil(self.capacity_factor * T * self.top_k / self.n_experts))
        token_EC = pick_TE.t().topk(capacity, dim=-1).indices
        return logits_TE, scores_TE, token_EC, scores_TE.t().gather(1, token_EC)
