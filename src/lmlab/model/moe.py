"""Mixture-of-Experts FFN: a router sends each token to a few experts; their outputs are mixed back.

Routers (`moe_router`):
  "topk"           softmax over the experts, then the k largest (k=1 Switch, k=2 GShard / Mixtral);
  "noisy"          Shazeer et al. 2017: learned, softplus-scaled Gaussian noise on the logits while
                   training, then top-k;
  "dense"          every expert, softmax-weighted (the dense-gating baseline);
  "expert-choice"  Zhou et al. 2022: each expert takes its top-C tokens, C = capacity_factor * T * k / E;
  "soft"           Soft MoE (Puigcerver et al. 2023): each expert's `moe_slots` slots are learned convex
                   combinations of a sequence's tokens; token outputs are convex combinations of the
                   slots' outputs. It mixes tokens across positions, so it is offered for encoders only.
Token-choice weights: `moe_renormalize` None (default) rescales the k chosen probabilities to sum to
1 for k > 1 (GShard, Mixtral) and keeps Switch's raw probability at k = 1; True rescales at k = 1 too
(weight 1, as Mixtral's code does); False never rescales (DeepSeekMoE, Qwen2-MoE).

Dispatch is dropless by default and never builds a [tokens x experts x capacity] one-hot: the
(token, expert) assignments are sorted by expert, each expert multiplies one contiguous slice of
tokens (one grouped GEMM, `torch.nn.functional.grouped_mm`, where torch has it for the device and
dtype; else one GEMM per expert), and outputs are added back with index_add. With a capacity factor,
an FFN expert takes at most capacity = ceil(factor * T * k / E) assignments of each sequence of T
tokens (the sequence is the group, as in GShard and Switch), in token order; `moe_capacity` fixes
that number instead. The overflow is dropped and those tokens ride the residual.

MoE++ (Jin et al. 2024) zero-computation experts sit beside the FFN experts under the same router:
zero experts (output 0), copy experts (output the input) and constant experts (alpha_1 x + alpha_2 v,
with v learned and alpha = softmax(W_c x)); with `moe_gating_residual` a layer's router logits add a
learned projection of the previous MoE layer's. DeepSeekMoE is configuration: fine-grained experts
(small `moe_d_ff`, larger k) plus `moe_shared_experts` every token passes through (Qwen2-MoE also
gates the shared expert with a sigmoid: `moe_shared_gate`).

Auxiliary losses, summed in `aux_loss` (the Model adds it to the training loss whenever a weight is
non-zero) and each kept in `stats`: Switch load balancing alpha * N * sum_i f_i * P_i; Shazeer's
CV^2 importance loss and (noisy router) CV^2 load loss; the ST-MoE router z-loss
mean(logsumexp(logits)^2). Padding tokens count in neither the losses nor the statistics.

Tensor names carry their shape: T tokens, D model width, E experts, K chosen per token,
A assignments, S slots, B sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ACTIVATIONS, ModelConfig
from lmlab.model.ffn import DenseFFN, activation_fn, gated_activation, register_ffn

_GROUPED_MM = getattr(F, "grouped_mm", None)


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1) \
        and t.stride(-1) == 1


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
        out.append(x_AD[start:start + n] @ w_EDF[e])
        start += n
    return torch.cat(out) if out else x_AD.new_zeros(0, w_EDF.shape[-1])


def _count(index: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in index: bincount without the host sync that CUDA's bincount
    makes (it reads the maximum back to size its output)."""
    return torch.zeros(n, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, has_previous: bool = False) -> None:
        super().__init__()
        self.kind = cfg.moe_router
        self.n_ffn = cfg.moe_experts  # FFN experts come first in the router's output ...
        self.n_zero, self.n_copy, self.n_const = cfg.moe_zero_experts, cfg.moe_copy_experts, cfg.moe_constant_experts
        self.n_experts = cfg.moe_total_experts  # ... then zero, copy and constant experts
        self.top_k = self.n_experts if self.kind == "dense" else cfg.moe_top_k
        self.renormalize, self.capacity_factor = cfg.moe_renormalize, cfg.moe_capacity_factor
        self.capacity = cfg.moe_capacity  # a fixed per-sequence capacity (Switch checkpoints' expert_capacity)
        self.slots = cfg.moe_slots
        self.jitter = cfg.moe_jitter
        self.weights = dict(lb=cfg.moe_aux_weight, z=cfg.moe_z_weight, importance=cfg.moe_importance_weight,
                            load=cfg.moe_load_weight)
        d, d_ff = cfg.d_model, cfg.moe_d_ff or cfg.d_ff
        activation = cfg.moe_activation or cfg.activation
        self.act_name, self.gated = ACTIVATIONS[activation]
        self.act = activation_fn(activation)
        n_out = self.n_ffn * self.slots if self.kind == "soft" else self.n_experts
        self.router = nn.Linear(d, n_out, bias=False)  # Soft MoE: the slot parameters Phi, (E*S, D)
        self.noise = nn.Linear(d, self.n_experts, bias=False) if self.kind == "noisy" else None
        self.gate_residual = nn.Linear(self.n_experts, self.n_experts, bias=False) \
            if cfg.moe_gating_residual and has_previous else None
        # expert weights stored grouped, (E, in, out), as grouped-GEMM kernels want them
        self.w_up = nn.Parameter(torch.empty(self.n_ffn, d, (2 if self.gated else 1) * d_ff))
        self.w_down = nn.Parameter(torch.empty(self.n_ffn, d_ff, d))
        nn.init.normal_(self.w_up, std=cfg.init_std)
        nn.init.normal_(self.w_down, std=cfg.init_std)
        if self.n_const:  # MoE++ constant experts: a learned vector v_j and a 2-way mixing gate W_c
            self.const_vec = nn.Parameter(torch.empty(self.n_const, d))
            self.const_gate = nn.Linear(d, 2 * self.n_const, bias=False)
            nn.init.normal_(self.const_vec, std=cfg.init_std)
        self.shared = None
        if cfg.moe_shared_experts:
            shared_d_ff = cfg.moe_shared_d_ff or d_ff * cfg.moe_shared_experts
            self.shared = DenseFFN(cfg.replace(activation=activation, bias=False), d_ff=shared_d_ff)
        self.shared_gate = nn.Linear(d, 1, bias=False) if cfg.moe_shared_experts and cfg.moe_shared_gate else None
        self.previous: list[MoE] = []  # the stack's previous MoE layer (gating residual); set by the Model
        self.last_logits: torch.Tensor | None = None
        self.record_routing = False  # when set, `routing` keeps the (T, E) weight each token got from each expert
        self.routing: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self._stat_inputs: tuple | None = None  # what `stats` is computed from, kept by the last forward

    def expert_name(self, e: int) -> str:
        """e3 for FFN expert 3; zero0, copy0, const1 for MoE++ experts."""
        for prefix, n in (("e", self.n_ffn), ("zero", self.n_zero), ("copy", self.n_copy), ("const", self.n_const)):
            if e < n:
                return f"{prefix}{e}"
            e -= n
        raise IndexError(e)

    # ---- routing ------------------------------------------------------------------------------
    def router_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Clean router logits (T, E), float32, the gating residual included."""
        if self.jitter and self.training:  # Switch: multiplicative jitter on the router's input
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits_TE = self.router(x_TD).float()
        if self.gate_residual is not None and self.previous and self.previous[0].last_logits is not None:
            prev = self.previous[0].last_logits
            if prev.shape == logits_TE.shape:
                logits_TE = logits_TE + self.gate_residual(prev.to(self.gate_residual.weight.dtype)).float()
        self.last_logits = logits_TE
        return logits_TE

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token-choice routing: (router logits TE, chosen weights TK, chosen experts TK)."""
        logits_TE = self.router_logits(x_TD)
        self._noise_TE = None
        chosen_TE = logits_TE
        if self.noise is not None and self.training:
            self._noise_TE = F.softplus(self.noise(x_TD).float()) + 1e-2  # Shazeer's noise epsilon
            chosen_TE = logits_TE + torch.randn_like(logits_TE) * self._noise_TE
        self._chosen_TE = chosen_TE
        probs_TE = chosen_TE.softmax(-1)
        if self.kind == "dense":
            experts_TK = torch.arange(self.n_experts, device=x_TD.device).expand(x_TD.shape[0], -1)
            return logits_TE, probs_TE, experts_TK
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.renormalize or (self.renormalize is None and self.top_k > 1):
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return logits_TE, weights_TK, experts_TK

    # ---- experts ------------------------------------------------------------------------------
    def _ffn(self, x_AD: torch.Tensor, counts_E: torch.Tensor, w_A: torch.Tensor | None = None) -> torch.Tensor:
        """The FFN experts over rows grouped by expert, each row scaled by its routing weight w_A. The
        weight multiplies whichever is narrower, the hidden activation or the output (same result: the
        down projection is linear), which matters for fine-grained experts."""
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

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e (any kind) on rows x: the plain definition, used by tests as the reference."""
        if e < self.n_ffn:
            return self._ffn(x, torch.tensor([len(x) if i == e else 0 for i in range(self.n_ffn)], device=x.device))
        e -= self.n_ffn
        if e < self.n_zero:
            return torch.zeros_like(x)
        e -= self.n_zero
        if e < self.n_copy:
            return x
        j = e - self.n_copy
        alpha = self.const_gate(x).view(len(x), self.n_const, 2)[:, j].softmax(-1)
        return alpha[:, :1] * x + alpha[:, 1:] * self.const_vec[j]

    def _zero_compute(self, x_AD: torch.Tensor, expert_A: torch.Tensor) -> torch.Tensor:
        """Copy and constant experts (zero experts never reach here) on their assignments."""
        j_A = expert_A - (self.n_ffn + self.n_zero + self.n_copy)  # constant-expert index, < 0 for copy
        if not self.n_const:
            return x_AD
        is_const = (j_A >= 0)[:, None]
        j_A = j_A.clamp(min=0)
        gate_A2 = self.const_gate(x_AD).view(len(x_AD), self.n_const, 2)
        alpha_A2 = gate_A2.gather(1, j_A[:, None, None].expand(-1, 1, 2)).squeeze(1).softmax(-1)
        const_AD = alpha_A2[:, :1] * x_AD + alpha_A2[:, 1:] * self.const_vec[j_A]
        return torch.where(is_const, const_AD, x_AD)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        if self.kind == "soft":
            y = self._soft(x.reshape(-1, shape[-2], shape[-1]), token_mask)
        else:
            x_TD = x.reshape(-1, shape[-1])
            if self.kind == "expert-choice":
                y = self._expert_choice(x_TD, token_mask)
            else:
                y = self._token_choice(x_TD, token_mask, seq_len=shape[-2] if x.dim() > 2 else x_TD.shape[0])
        y = y.reshape(shape)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + shared
        return y

    def _token_choice(self, x_TD: torch.Tensor, token_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor:
        T, K = x_TD.shape[0], self.top_k
        logits_TE, weights_TK, experts_TK = self.route(x_TD)
        # sort the T*K assignments by expert; a stable sort keeps token order inside each expert
        expert_A = experts_TK.reshape(-1)
        order_A = torch.argsort(expert_A, stable=True)
        token_A, expert_A = order_A // K, expert_A[order_A]
        counts_E = routed_E = _count(expert_A, self.n_experts)
        kept_TK = None
        if self.capacity is not None or self.capacity_factor is not None:
            # per sequence (GShard's and Switch's group), each FFN expert keeps its first `capacity`
            # assignments in token order; zero-computation experts cost nothing and keep all theirs
            capacity = self.capacity or math.ceil(self.capacity_factor * seq_len * K / self.n_ffn)
            n_seq = T // seq_len
            group_A = expert_A * n_seq + token_A // seq_len  # (expert, sequence) groups are contiguous
            counts_G = _count(group_A, self.n_experts * n_seq)
            starts_G = torch.cumsum(counts_G, 0) - counts_G
            rank_A = torch.arange(len(order_A), device=x_TD.device) - starts_G[group_A]
            keep_A = (rank_A < capacity) | (expert_A >= self.n_ffn)
            kept_TK = torch.zeros(T * K, dtype=torch.bool, device=x_TD.device)
            kept_TK[order_A[keep_A]] = True
            kept_TK = kept_TK.view(T, K)
            order_A, token_A, expert_A = order_A[keep_A], token_A[keep_A], expert_A[keep_A]
            counts_E = _count(expert_A, self.n_experts)
        w_A = weights_TK.reshape(-1)[order_A].to(x_TD.dtype)
        n_ffn = int(counts_E[:self.n_ffn].sum()) if self.n_experts > self.n_ffn else len(order_A)
        y_AD = self._ffn(x_TD.index_select(0, token_A[:n_ffn]), counts_E[:self.n_ffn], w_A[:n_ffn])
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_A[:n_ffn], y_AD.to(x_TD.dtype))
        if self.n_copy or self.n_const:  # zero-computation experts after the FFN experts, zero experts first
            start = n_ffn + int(counts_E[self.n_ffn:self.n_ffn + self.n_zero].sum())
            tok = token_A[start:]
            y_TD = y_TD.index_add(0, tok, self._zero_compute(x_TD[tok], expert_A[start:]) * w_A[start:, None])
        if self.record_routing:
            kept = weights_TK if kept_TK is None else weights_TK * kept_TK
            self.routing = torch.zeros(T, self.n_experts, device=x_TD.device).scatter_(1, experts_TK, kept.float())
        self._losses_and_stats(logits_TE, weights_TK, experts_TK, kept_TK, token_mask, routed_E)
        return y_TD

    def _expert_choice(self, x_TD: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        T, E = x_TD.shape[0], self.n_ffn
        logits_TE = self.router_logits(x_TD)
        scores_TE = logits_TE.softmax(-1)
        real_T = token_mask.reshape(-1).bool() if token_mask is not None else None
        pick_TE = scores_TE if real_T is None else scores_TE.masked_fill(~real_T[:, None], -1.0)  # padding last
        capacity = min(T, math.ceil((self.capacity_factor or 1.0) * T * self.top_k / E))
        weights_EC, token_EC = pick_TE.t().topk(capacity, dim=-1)  # each expert's best tokens
        weights_EC = scores_TE.t().gather(1, token_EC)
        token_A = token_EC.reshape(-1)
        counts_E = torch.full((E,), capacity, device=x_TD.device, dtype=torch.long)
        y_AD = self._ffn(x_TD.index_select(0, token_A), counts_E, weights_EC.reshape(-1).to(x_TD.dtype))
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_A, y_AD.to(x_TD.dtype))
        chosen_TE = torch.zeros_like(scores_TE).index_put_(
            (token_EC.reshape(-1), torch.arange(E, device=x_TD.device).repeat_interleave(capacity)),
            torch.ones_like(token_A, dtype=scores_TE.dtype))
        if self.record_routing:
            self.routing = (chosen_TE * scores_TE).detach()
        if real_T is not None:
            logits_TE, chosen_TE = logits_TE[real_T], chosen_TE[real_T]
        n = max(logits_TE.shape[0], 1)
        load_E = chosen_TE.sum(0) / chosen_TE.sum().clamp(min=1)
        losses = {"z": self._z_loss(logits_TE)}
        self._finish(losses, logits_TE.softmax(-1), load_E,
                     dropped=(chosen_TE.sum(-1) == 0).sum() / n)
        return y_TD

    def _soft(self, x_BTD: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        E, S = self.n_ffn, self.slots
        logits_BTX = self.router(x_BTD).float()  # X = E * S slots
        if token_mask is not None:  # padding tokens feed no slot
            dispatch_logits = logits_BTX.masked_fill(~token_mask.reshape(B, T, 1).bool(), float("-inf"))
        else:
            dispatch_logits = logits_BTX
        dispatch_BTX = dispatch_logits.softmax(1).nan_to_num(0.0)  # each slot: a convex mix of the tokens
        # (a sequence that is all padding feeds its slots nothing instead of NaN)
        combine_BTX = logits_BTX.softmax(-1)  # each token: a convex combination of the slots
        slots_BXD = torch.einsum("btx,btd->bxd", dispatch_BTX.to(x_BTD.dtype), x_BTD)
        slots_AD = slots_BXD.view(B, E, S, D).transpose(0, 1).reshape(E * B * S, D)  # grouped by expert
        out_AD = self._ffn(slots_AD, torch.full((E,), B * S, device=x_BTD.device, dtype=torch.long))
        out_BXD = out_AD.view(E, B, S, D).transpose(0, 1).reshape(B, E * S, D)
        y = torch.einsum("btx,bxd->btd", combine_BTX.to(out_BXD.dtype), out_BXD)
        probs = combine_BTX.view(B * T, E, S).sum(-1)  # a token's weight on each expert
        if self.record_routing:
            self.routing = probs.detach()
        if token_mask is not None:
            probs = probs[token_mask.reshape(-1).bool()]
        self._finish({}, probs, probs.mean(0) if len(probs) else probs.new_zeros(E), dropped=0.0)
        return y

    # ---- losses and statistics ----------------------------------------------------------------
    def _z_loss(self, logits_TE: torch.Tensor) -> torch.Tensor | None:
        if not self.weights["z"] or not logits_TE.shape[0]:
            return None
        return self.weights["z"] * torch.logsumexp(logits_TE, -1).pow(2).mean()

    @staticmethod
    def _cv_squared(v: torch.Tensor) -> torch.Tensor:
        return v.var(correction=0) / (v.mean().pow(2) + 1e-10) if v.numel() > 1 else v.new_zeros(())

    def _losses_and_stats(self, logits_TE: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
                          kept_TK: torch.Tensor | None, token_mask: torch.Tensor | None,
                          routed_E: torch.Tensor | None = None) -> None:
        chosen_TE, noise_TE = self._chosen_TE, self._noise_TE
        if token_mask is not None:  # padding tokens count in neither the losses nor the statistics
            real_T = token_mask.reshape(-1).bool()
            logits_TE, weights_TK, experts_TK, chosen_TE = (t[real_T] for t in (logits_TE, weights_TK, experts_TK,
                                                                                  chosen_TE))
            noise_TE = noise_TE[real_T] if noise_TE is not None else None
            kept_TK = kept_TK[real_T] if kept_TK is not None else None
        E, n = self.n_experts, max(logits_TE.shape[0], 1)
        probs_TE = logits_TE.softmax(-1)
        if token_mask is not None or routed_E is None:  # assignments per expert, padding left out
            routed_E = _count(experts_TK.reshape(-1), E)
        load_E = routed_E.float() / (n * self.top_k)  # f_i
        importance_E = probs_TE.mean(0) if logits_TE.shape[0] else probs_TE.new_zeros(E)  # P_i
        losses = {"z": self._z_loss(logits_TE)}
        if self.weights["lb"]:
            losses["lb"] = self.weights["lb"] * E * (load_E * importance_E).sum()
        if self.weights["importance"]:  # Shazeer: CV^2 of the summed gate values
            gates_TE = torch.zeros_like(probs_TE).scatter_(1, experts_TK, weights_TK)
            losses["importance"] = self.weights["importance"] * self._cv_squared(gates_TE.sum(0))
        if self.weights["load"] and noise_TE is not None and logits_TE.shape[0]:
            losses["load"] = self.weights["load"] * self._cv_squared(
                self._smooth_load(logits_TE, chosen_TE, noise_TE).sum(0))
        dropped = 1.0 - kept_TK.float().mean() if kept_TK is not None and kept_TK.numel() else 0.0
        self._finish(losses, probs_TE, load_E, dropped)

    def _smooth_load(self, clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_TE: torch.Tensor) -> torch.Tensor:
        """Shazeer's differentiable load: P(expert i stays in the top k if its noise were drawn again)."""
        k = self.top_k
        top_TK1 = noisy_TE.topk(min(k + 1, self.n_experts), dim=-1).values
        in_top_TE = noisy_TE >= top_TK1[:, k - 1:k]
        threshold_if_in = top_TK1[:, -1:]  # (k+1)-th largest: what i must beat when it is in the top k
        threshold_if_out = top_TK1[:, k - 1:k]  # k-th largest otherwise
        threshold_TE = torch.where(in_top_TE, threshold_if_in, threshold_if_out)
        normal = torch.distributions.Normal(0.0, 1.0)
        return normal.cdf((clean_TE - threshold_TE) / noise_TE)

    def _finish(self, losses: dict[str, torch.Tensor | None], probs_TE: torch.Tensor, load_E: torch.Tensor,
                dropped: torch.Tensor | float) -> None:
        losses = {k: v for k, v in losses.items() if v is not None}
        self.aux_loss = torch.stack(list(losses.values())).sum() if losses else None
        self._stat_inputs = (probs_TE.detach(), load_E.detach(), dropped,
                             {k: v.detach() for k, v in losses.items()})

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """The last forward's routing statistics: expert load (fraction of assignments), its coefficient of
        variation, mean router entropy, dropped fraction and each auxiliary loss. Computed when read, so a
        forward that nobody inspects (inference, generation) launches no extra kernels for them."""
        if self._stat_inputs is None:
            return {}
        probs_TE, load_E, dropped, losses = self._stat_inputs
        with torch.no_grad():
            entropy = -(probs_TE * probs_TE.clamp(min=1e-9).log()).sum(-1).mean() if probs_TE.shape[0] \
                else probs_TE.new_zeros(())
            return {"load": load_E, "cv": load_E.std() / load_E.mean().clamp(min=1e-9), "entropy": entropy,
                    "dropped": torch.as_tensor(dropped, dtype=torch.float32, device=load_E.device).detach(),
                    **{f"{k}_loss": v for k, v in losses.items()}}


def is_moe_layer(cfg: ModelConfig, layer_index: int) -> bool:
    """MoE in every moe_every-th layer (the last of each group) after the first moe_first_dense layers."""
    return cfg.ffn == "moe" and layer_index >= cfg.moe_first_dense and layer_index % cfg.moe_every == cfg.moe_every - 1


def _build(cfg: ModelConfig, layer_index: int) -> nn.Module:
    if is_moe_layer(cfg, layer_index):
        return MoE(cfg, has_previous=any(is_moe_layer(cfg, i) for i in range(layer_index)))
    return DenseFFN(cfg, layer_index)


register_ffn("moe", _build)
