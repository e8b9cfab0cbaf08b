"""Router auxiliary losses and the routing record a MoE layer returns.

Losses (each multiplied by its weight in the config; zero weights are skipped):
- Switch load balancing (Fedus et al. 2021): alpha * E * sum_i f_i * P_i, f_i the fraction of
  assignments expert i got, P_i its mean router probability;
- Shazeer et al. 2017: CV^2 of the summed gate values (importance) and, for the noisy router,
  CV^2 of the smooth load estimate P(expert i stays in the top k under fresh noise);
- ST-MoE router z-loss (Zoph et al. 2022): mean(logsumexp(logits)^2).
Padding tokens are removed before any of them is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor | None:
    return torch.logsumexp(logits_TE, -1).pow(2).mean() if logits_TE.shape[0] else None


def load_balancing(load_E: torch.Tensor, importance_E: torch.Tensor) -> torch.Tensor:
    return load_E.shape[0] * (load_E * importance_E).sum()


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    return v.var(correction=0) / (v.mean().pow(2) + 1e-10) if v.numel() > 1 else v.new_zeros(())


def smooth_load(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer's differentiable load: P(expert i stays in the top k if its noise were drawn again)."""
    top_TK1 = noisy_TE.topk(min(k + 1, noisy_TE.shape[-1]), dim=-1).values
    in_top_TE = noisy_TE >= top_TK1[:, k - 1 : k]
    threshold_if_in = top_TK1[:, -1:]  # (k+1)-th largest: what i must beat when it is in the top k
    threshold_if_out = top_TK1[:, k - 1 : k]  # k-th largest otherwise
    threshold_TE = torch.where(in_top_TE, threshold_if_in, threshold_if_out)
    return torch.distributions.Normal(0.0, 1.0).cdf((clean_TE - threshold_TE) / noise_TE)


@dataclass
class RoutingRecord:
    """What one MoE layer's forward decided, returned beside its output (modules keep no per-forward
    state, so activation checkpointing, which re-runs forwards, cannot double-count anything).

    `expert_weights()` is the weight each token got from each expert (0 where it was not routed or
    was dropped); probs_TE the router's softmax over the real tokens; load_E the fraction of
    assignments per expert (f_i); router_logits_TE the clean logits the next layer's gating residual
    reads. Token-choice layers keep (experts_TK, weights_TK) and expand them only when asked.
    """

    weights: torch.Tensor  # (T, E), or (T, K) chosen weights beside experts_TK; T counts padding too
    probs_TE: torch.Tensor  # (N, E) over real tokens only
    load_E: torch.Tensor
    dropped: torch.Tensor | float
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted, differentiable
    router_logits_TE: torch.Tensor | None = None
    experts_TK: torch.Tensor | None = None  # token choice: the chosen experts, beside (T, K) weights
    layer: str = ""  # module name, filled in by the Stack: "decoder.layers.1.ffn"

    def expert_weights(self) -> torch.Tensor:
        """(T, E) float32: the weight each token got from each expert, 0 where none (or dropped)."""
        w = self.weights.detach().float()
        if self.experts_TK is None:
            return w
        return torch.zeros(w.shape[0], self.load_E.shape[0], device=w.device).scatter_(1, self.experts_TK, w)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return torch.stack(list(self.losses.values())).sum() if self.losses else None

    def stats(self) -> dict[str, torch.Tensor]:
        """Expert load, its coefficient of variation, mean router entropy, dropped fraction and each
        auxiliary loss. Computed when asked for, so inference launches no kernels for them."""
        with torch.no_grad():
            probs, load = self.probs_TE.detach(), self.load_E.detach()
            entropy = -(probs * probs.clamp(min=1e-9).log()).sum(-1).mean() if probs.shape[0] else probs.new_zeros(())
            return {
                "load": load,
                "cv": load.std() / load.mean().clamp(min=1e-9),
                "entropy": entropy,
                "dropped": torch.as_tensor(self.dropped, dtype=torch.float32, device=load.device).detach(),
                **{f"{k}_loss": v.detach() for k, v in self.losses.items()},
            }
