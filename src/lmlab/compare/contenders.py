"""The contenders of a comparison and the budget each one gets.

Every contender is the same body (width, depth, heads, FFN, pre-LN LayerNorm, GELU, the same position
scheme, tied embeddings, no dropout) on the same shared vocabulary; what differs is only what makes a
family (its stacks, its self-attention mask, its objective) and, for an MoE variant, the FFN slot. An
encoder-decoder has `n_layers` blocks in each stack, as in T5's comparison, so it has about twice the
parameters of a decoder for about the same FLOPs per token of input + target.

Training FLOPs are counted as the T5 paper counts them: each stack for the tokens it processes. For one
example, 6 x (weights of a stack's blocks x the tokens that stack reads) + 6 x (vocabulary projection x
the positions the loss reads) + the attention's 12 x layers x T_query x T_key x d_attn; the token counts
come from the contender's own objective (measured on its first training batches, padding excluded), so
span corruption's short decoder targets and the masked LM's 15-30% of scored positions count as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmlab.compare.settings import MOE_VARIANTS, CompareConfig
from lmlab.config import ModelConfig
from lmlab.errors import ConfigError
from lmlab.families import FAMILIES, IGNORE_INDEX
from lmlab.tokenizer import Tokenizer

# the objective each family is pre-trained with in a comparison by default: architecture and objective
# are two axes (T5's Table 2), and the default grid puts the three generative architectures on one
# language-modelling task (the decoder next-token, the prefix-LM and the encoder-decoder the rest of a
# window from a prefix), beside the encoder's masked LM (RoBERTa's dynamic masking without
# next-sentence prediction: docs/benchmarks.md, the tiny BERT's recipe). --objectives adds contenders on
# other objectives, e.g. encoder-decoder=span (T5's span corruption).
OBJECTIVE = {"encoder": "mlm", "decoder": "clm", "encoder-decoder": "prefix-seq2seq", "prefix-lm": "prefix-lm"}
# objectives that teach what held-out bits per byte asks (the rest of a text given its start): only
# contenders trained with one of these are ranked on it
LM_OBJECTIVES = frozenset({"clm", "prefix-lm", "prefix-seq2seq"})


@dataclass
class Contender:
    name: str  # "decoder", "decoder+switch"
    family: str
    moe: str | None
    objective: str
    changes: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields on top of the shared body

    @property
    def dense_twin(self) -> str | None:
        return self.family if self.moe else None

    @property
    def language_model(self) -> bool:
        """Trained to continue text: ranked on held-out bits per byte."""
        return self.objective in LM_OBJECTIVES


def contender_name(family: str, objective: str) -> str:
    return family if objective == OBJECTIVE[family] else f"{family}[{objective}]"


def contenders(cc: CompareConfig) -> list[Contender]:
    out = []
    extra = cc.extra_objectives()
    for fam in cc.families:
        out.append(Contender(fam, fam, None, OBJECTIVE[fam]))
        for objective in extra.get(fam, []):
            if objective != OBJECTIVE[fam]:
                out.append(Contender(contender_name(fam, objective), fam, None, objective))
        if fam in cc.moe_families:
            for variant in cc.variants:
                changes = dict(MOE_VARIANTS[variant])
                div = changes.pop("moe_d_ff_div", None)
                if div:
                    changes["moe_d_ff"] = max(cc.d_ff // div, 8)
                out.append(Contender(f"{fam}+{variant}", fam, variant, OBJECTIVE[fam], {"ffn": "moe", **changes}))
    return out


def model_config(cc: CompareConfig, c: Contender, tok: Tokenizer) -> ModelConfig:
    """The contender's ModelConfig on the shared body and vocabulary."""
    heads: dict[str, Any] = {"heads": ("mlm",), "pooler": False} if c.family == "encoder" else {"heads": ("lm",)}
    ids = tok.model_ids()
    base = dict(
        family=c.family,
        vocab_size=tok.vocab_size,
        d_model=cc.d_model,
        n_layers=cc.n_layers,
        n_heads=cc.n_heads,
        d_ff=cc.d_ff,
        max_seq_len=cc.seq_len,  # the context it is trained on is the context it is scored with (few-shot too)
        position=cc.position,
        norm="layernorm",
        norm_placement="pre",
        final_norm=True,
        activation="gelu",
        dropout=0.0,
        attn_dropout=0.0,
        tie_embeddings=True,
        init_std=cc.init_std,
        decoder_start_token_id=ids["pad_token_id"],
        name=c.name,
        **heads,
        **ids,
    )
    try:
        cfg = ModelConfig(**{**base, **c.changes})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"contender {c.name}: {e}") from None
    if cfg.ffn == "moe" and not any(cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
        raise ConfigError(
            f"contender {c.name}: with n_layers={cfg.n_layers} no layer gets an MoE FFN "
            f"(moe_every={cfg.moe_every}, moe_first_dense={cfg.moe_first_dense}); use more layers"
        )
    return cfg


def batch_tokens(batch: dict[str, Any], cfg: ModelConfig, pad_id: int | None) -> dict[str, float]:
    """Tokens one batch puts through each stack and through the vocabulary head, and the attention's
    query x key products, padding excluded."""
    ids = batch["input_ids"]
    real = (ids != pad_id) if pad_id is not None else np.ones(ids.shape, bool)
    if "attention_mask" in batch:
        real = batch["attention_mask"].astype(bool)
    labels = batch["labels"]
    scored = float((labels != IGNORE_INDEX).sum())
    spec = FAMILIES[cfg.family]
    out = {"encoder": 0.0, "decoder": 0.0, "head": scored, "attention": 0.0}
    lengths = real.sum(1).astype(np.float64)
    if spec.seq2seq:
        dec_real = labels != IGNORE_INDEX  # the decoder reads one position per target token
        dec_lengths = dec_real.sum(1).astype(np.float64)
        out["encoder"], out["decoder"] = float(lengths.sum()), float(dec_lengths.sum())
        out["attention"] = float(
            cfg.n_layers * (lengths**2).sum()
            + cfg.decoder_layers * ((dec_lengths**2).sum() + (dec_lengths * lengths).sum())
        )
    else:
        out["encoder" if not spec.has_decoder else "decoder"] = float(lengths.sum())
        out["attention"] = float(cfg.n_layers * (lengths**2).sum())
    return out


def train_flops_per_step(cfg: ModelConfig, weights: dict[str, int], tokens: dict[str, float]) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one step with `tokens` (from batch_tokens,
    averaged over a few batches) and `weights` (lmlab.info.stack_matmul_weights)."""
    d_attn = cfg.n_heads * cfg.dim_head
    forward = 2 * (
        weights["encoder"] * tokens["encoder"]
        + weights["decoder"] * tokens["decoder"]
        + weights["head"] * tokens["head"]
    )
    forward += 4 * d_attn * tokens["attention"]
    return 3.0 * forward
