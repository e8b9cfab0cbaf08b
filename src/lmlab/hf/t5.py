"""T5: T5ForConditionalGeneration (v1.0 and v1.1 / gated FFNs). The layout (RMSNorm, relative
position bias in the first layer of each stack, no biases) is shared with Switch Transformers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.hf.common import ACTS_OUT, Adapter, Entry, act, fused, linear, norm, qkv_sizes

GATED = {
    "relu": "reglu",
    "gelu": "geglu",
    "gelu_new": "geglu_tanh",
    "gelu_tanh": "geglu_tanh",
    "gelu_pytorch_tanh": "geglu_tanh",
    "silu": "swiglu",
}


def t5_layout(
    raw: dict[str, Any], activation: str, scale_output: bool, common: dict[str, Any], **extra: Any
) -> ModelConfig:
    """The T5 v1.0 / v1.1 layout (T5 and Switch Transformers): RMSNorm, relative bias, no biases."""
    d = raw["d_model"]
    return ModelConfig(
        family="encoder-decoder",
        vocab_size=raw["vocab_size"],
        d_model=d,
        n_layers=raw["num_layers"],
        n_decoder_layers=raw.get("num_decoder_layers") or raw["num_layers"],
        n_heads=raw["num_heads"],
        head_dim=raw["d_kv"],
        d_ff=raw["d_ff"],
        max_seq_len=raw.get("n_positions", 512),
        position="relative",
        rel_buckets=raw.get("relative_attention_num_buckets", 32),
        rel_max_distance=raw.get("relative_attention_max_distance", 128),
        norm="rmsnorm",
        norm_eps=raw.get("layer_norm_epsilon", 1e-6),
        activation=activation,
        bias=False,
        attn_scale=1.0,
        head_input_scale=d**-0.5 if scale_output else 1.0,
        dropout=raw.get("dropout_rate", 0.1),
        attn_dropout=raw.get("dropout_rate", 0.1),
        decoder_start_token_id=raw.get("decoder_start_token_id", raw.get("pad_token_id", 0)),
        **{**common, "pad_token_id": raw.get("pad_token_id", 0), "eos_token_id": raw.get("eos_token_id", 1)},
        **extra,
    )


def t5_layout_out(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        d_model=cfg.d_model,
        d_kv=cfg.dim_head,
        d_ff=cfg.d_ff,
        num_layers=cfg.n_layers,
        num_decoder_layers=cfg.decoder_layers,
        num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.rel_buckets,
        relative_attention_max_distance=cfg.rel_max_distance,
        dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        is_encoder_decoder=True,
        n_positions=cfg.max_seq_len,
        decoder_start_token_id=cfg.decoder_start_token_id,
    )


def t5_weights(cfg: ModelConfig, p: str, ffn: Callable[[str, str, int], list[Entry]]) -> list[Entry]:
    """Both stacks; `ffn(ours, theirs, layer)` gives the FFN's entries of one layer."""
    t = [Entry("tok_embed.weight", (f"{p}shared.weight",))]
    q, kv, _ = qkv_sizes(cfg)
    for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        t += [
            Entry(
                f"{stack}.rel_bias.weight",
                (f"{p}{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
            )
        ]
        for i in range(n):
            o, a = f"{stack}.layers.{i}.", f"{p}{stack}.block.{i}.layer."
            t += fused(f"{o}attn.qkv", tuple(f"{a}0.SelfAttention.{x}" for x in "qkv"), (q, kv, kv), False)
            t += linear(f"{o}attn.out", f"{a}0.SelfAttention.o", False)
            t += norm(f"{o}attn_norm", f"{a}0.layer_norm", False)
            ff = 1
            if stack == "decoder":
                ff = 2
                t += linear(f"{o}cross_attn.q", f"{a}1.EncDecAttention.q", False)
                t += fused(f"{o}cross_attn.kv", tuple(f"{a}1.EncDecAttention.{x}" for x in "kv"), (kv, kv), False)
                t += linear(f"{o}cross_attn.out", f"{a}1.EncDecAttention.o", False)
                t += norm(f"{o}cross_norm", f"{a}1.layer_norm", False)
            t += ffn(f"{o}ffn", f"{a}{ff}", i)
            t += norm(f"{o}ffn_norm", f"{a}{ff}.layer_norm", False)
        t += norm(f"{stack}.final_norm", f"{p}{stack}.final_layer_norm", False)
    if "lm" in cfg.heads and not cfg.tie_embeddings:
        t += [Entry("lm_head.weight", ("lm_head.weight",))]
    return t


def _config_in(raw: dict[str, Any], source: str, common: dict[str, Any]) -> ModelConfig:
    proj = raw.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated = parts[0] == "gated"
    name = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if name not in GATED:
        raise CheckpointError(f"{source}: feed_forward_proj {proj!r} is not supported")
    activation = GATED[name] if gated else act(name, source)
    scale = raw.get("scale_decoder_outputs", raw.get("tie_word_embeddings", True) is not False)
    return t5_layout(raw, activation, scale, common)


def _config_out(cfg: ModelConfig) -> dict[str, Any]:
    gated = {v: k for k, v in GATED.items() if k not in ("gelu_pytorch_tanh", "gelu_tanh")}
    proj = f"gated-{gated[cfg.activation]}" if cfg.activation in gated else ACTS_OUT.get(cfg.activation, "?")
    return {**t5_layout_out(cfg), "feed_forward_proj": proj, "scale_decoder_outputs": cfg.head_input_scale != 1.0}


def _weights(cfg: ModelConfig, p: str) -> list[Entry]:
    gated = cfg.activation in GATED.values()

    def ffn(ours: str, theirs: str, i: int) -> list[Entry]:
        f = f"{theirs}.DenseReluDense."
        up = (
            fused(f"{ours}.up", (f"{f}wi_0", f"{f}wi_1"), (cfg.d_ff, cfg.d_ff), False)
            if gated
            else linear(f"{ours}.up", f"{f}wi", False)
        )
        return up + linear(f"{ours}.down", f"{f}wo", False)

    return t5_weights(cfg, p, ffn)


ADAPTER = Adapter(
    model_type="t5",
    architectures={"T5ForConditionalGeneration": (("lm",), False)},
    default_architecture="T5ForConditionalGeneration",
    config_in=_config_in,
    config_out=_config_out,
    weights=_weights,
    holds=lambda cfg: cfg.spec.seq2seq and cfg.position == "relative" and cfg.ffn == "dense",
)
