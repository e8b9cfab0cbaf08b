"""Size and cost of a model: parameter counts and forward FLOPs per token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmlab.config import ModelConfig
from lmlab.model import Model
from lmlab.model.moe import MOE_LAYERS, SoftMoE


@dataclass
class ModelStats:
    total_params: int
    embedding_params: int  # token, position and segment tables
    non_embedding_params: int
    matmul_params: int  # weights used in matrix products per token, the output projection included
    active_params: int  # parameters a token uses: all but the experts it is not routed to
    context: int
    flops_per_token: int  # forward pass, at `context` tokens of attention

    @property
    def train_flops_per_token(self) -> int:
        """Forward + backward: the usual 3x the forward."""
        return 3 * self.flops_per_token


def _matmul_weights(module: nn.Module, context: int) -> tuple[int, int]:
    """(weights a token multiplies in `module`'s Linears and active experts, weights of experts it skips)."""
    matmul = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    inactive = 0
    for m in module.modules():  # an MoE layer multiplies each token by its k chosen experts only
        if isinstance(m, MOE_LAYERS):
            per_expert = m.experts.w_up[0].numel() + m.experts.w_down[0].numel()
            # Soft MoE: E*S slots per sequence of `context` tokens; zero-computation picks counted as FFN
            active = m.n_ffn * m.n_slots / context if isinstance(m, SoftMoE) else min(m.top_k, m.n_ffn)
            matmul += round(active * per_expert)
            inactive += round((m.n_ffn - min(active, m.n_ffn)) * per_expert)
    return matmul, inactive


def stack_matmul_weights(cfg: ModelConfig, context: int | None = None) -> dict[str, int]:
    """Weights one token multiplies in each stack ("encoder", "decoder": blocks, embeddings' Linears
    excluded) and in the vocabulary projection ("head"), MoE layers counting their active experts."""
    context = context or cfg.max_seq_len
    with torch.device("meta"):
        model = Model(cfg)
    out = {}
    for name in ("encoder", "decoder"):
        stack = getattr(model, name)
        out[name] = _matmul_weights(stack, context)[0] if stack is not None else 0
    out["head"] = cfg.vocab_size * cfg.d_model if (model.lm_head is not None or model.mlm_head is not None) else 0
    return out


def model_stats(cfg: ModelConfig, context: int | None = None) -> ModelStats:
    """Count parameters and FLOPs of `cfg` without allocating it (the model is built on the meta device).

    For MoE layers, a token's active parameters and FLOPs count k experts (Soft MoE: E x slots / context);
    with MoE++ zero-computation experts this is an upper bound, as a token routed to them skips the FFN.
    Forward FLOPs per token = 2 x matmul weights (every Linear, plus the vocabulary projection of an lm/mlm
    head even when it is tied to the embedding) + 4 x layers x context x (heads x head_dim) for the
    attention scores and the weighted sum, counted over the full context as in PaLM's MFU formula.
    For encoder-decoder models a "token" is one source token through the encoder plus one target token
    through the decoder, with source and target both `context` long (cross-attention counted too).
    """
    context = context or cfg.max_seq_len
    with torch.device("meta"):
        model = Model(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.tok_embed.weight.numel()
    for stack in (model.encoder, model.decoder):
        if stack is None:
            continue
        for table in (stack.pos_embed, stack.type_embed):
            if table is not None:
                embedding += table.weight.numel()
    matmul, inactive = _matmul_weights(model, context)
    if model.lm_head is not None or model.mlm_head is not None:
        matmul += cfg.vocab_size * cfg.d_model
    d_attn = cfg.n_heads * cfg.dim_head
    attn_layers = cfg.n_layers + (2 * cfg.decoder_layers if cfg.spec.seq2seq else 0)
    flops = 2 * matmul + 4 * attn_layers * context * d_attn
    return ModelStats(total, embedding, total - embedding, matmul, total - inactive, context, flops)
