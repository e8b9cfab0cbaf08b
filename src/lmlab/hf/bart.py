"""BART: BartForConditionalGeneration, BartForSequenceClassification (dense + tanh + out_proj on the
final </s> state). Post-norm, learned positions offset by 2, final_logits_bias."""

from __future__ import annotations

from typing import Any

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.hf.common import ACTS_OUT, Adapter, Entry, act, fused, linear, norm, qkv_sizes


def _config_in(raw: dict[str, Any], source: str, common: dict[str, Any]) -> ModelConfig:
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if raw.get(a) != raw.get(b):
            raise CheckpointError(
                f"{source}: {a}={raw.get(a)} differs from {b}={raw.get(b)}; "
                "lmlab's encoder and decoder share these sizes"
            )
    if raw.get("normalize_before") or raw.get("add_final_layer_norm"):
        raise CheckpointError(f"{source}: pre-norm BART variants (mBART) are not supported")
    return ModelConfig(
        family="encoder-decoder",
        vocab_size=raw["vocab_size"],
        d_model=raw["d_model"],
        n_layers=raw["encoder_layers"],
        n_decoder_layers=raw["decoder_layers"],
        n_heads=raw["encoder_attention_heads"],
        d_ff=raw["encoder_ffn_dim"],
        max_seq_len=raw.get("max_position_embeddings", 1024),
        position_offset=2,
        norm_placement="post",
        embed_norm=True,
        final_norm=False,
        activation=act(raw.get("activation_function", "gelu"), source),
        scale_embeddings=bool(raw.get("scale_embedding", False)),
        lm_head_bias="lm" in common["heads"],
        dropout=raw.get("dropout", 0.1),
        attn_dropout=raw.get("attention_dropout", 0.0),
        init_std=raw.get("init_std", 0.02),
        decoder_start_token_id=raw.get("decoder_start_token_id", 2),
        **common,
    )


def _config_out(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        d_model=cfg.d_model,
        encoder_layers=cfg.n_layers,
        decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len,
        activation_function=ACTS_OUT.get(cfg.activation, cfg.activation),
        scale_embedding=cfg.scale_embeddings,
        dropout=cfg.dropout,
        attention_dropout=cfg.attn_dropout,
        init_std=cfg.init_std,
        is_encoder_decoder=True,
        decoder_start_token_id=cfg.decoder_start_token_id,
        forced_eos_token_id=cfg.eos_token_id,
    )


def _weights(cfg: ModelConfig, p: str) -> list[Entry]:
    t = [Entry("tok_embed.weight", (f"{p}shared.weight",))]
    q, kv, _ = qkv_sizes(cfg)
    for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        s = f"{p}{stack}."
        t += [Entry(f"{stack}.pos_embed.weight", (f"{s}embed_positions.weight",))]
        t += norm(f"{stack}.embed_norm", f"{s}layernorm_embedding", True)
        for i in range(n):
            o, a = f"{stack}.layers.{i}.", f"{s}layers.{i}."
            t += fused(f"{o}attn.qkv", tuple(f"{a}self_attn.{x}_proj" for x in "qkv"), (q, kv, kv), True)
            t += linear(f"{o}attn.out", f"{a}self_attn.out_proj", True)
            t += norm(f"{o}attn_norm", f"{a}self_attn_layer_norm", True)
            if stack == "decoder":
                t += linear(f"{o}cross_attn.q", f"{a}encoder_attn.q_proj", True)
                t += fused(f"{o}cross_attn.kv", tuple(f"{a}encoder_attn.{x}_proj" for x in "kv"), (kv, kv), True)
                t += linear(f"{o}cross_attn.out", f"{a}encoder_attn.out_proj", True)
                t += norm(f"{o}cross_norm", f"{a}encoder_attn_layer_norm", True)
            t += linear(f"{o}ffn.up", f"{a}fc1", True)
            t += linear(f"{o}ffn.down", f"{a}fc2", True)
            t += norm(f"{o}ffn_norm", f"{a}final_layer_norm", True)
    if "lm" in cfg.heads:
        t += [Entry("lm_head.bias", ("final_logits_bias",), "row")]
        if not cfg.tie_embeddings:
            t += [Entry("lm_head.weight", ("lm_head.weight",))]
    if "classify" in cfg.heads:
        if cfg.pooler:
            t += linear("pooler.dense", "classification_head.dense", True)
        t += linear("classifier", "classification_head.out_proj", True)
    return t


ADAPTER = Adapter(
    model_type="bart",
    architectures={
        "BartForConditionalGeneration": (("lm",), False),
        "BartForSequenceClassification": (("classify",), True),
    },
    default_architecture="BartForConditionalGeneration",
    config_in=_config_in,
    config_out=_config_out,
    weights=_weights,
    holds=lambda cfg: cfg.spec.seq2seq and cfg.position != "relative",
    prefix="model.",
)
