"""LLaMA: LlamaModel, LlamaForCausalLM. RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases.
The decoder layout (llama_config / llama_weights) is shared with Mixtral and Qwen2-MoE, which put
sparse MoE FFNs in the same frame."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.hf.common import Adapter, Entry, fused, linear, norm, qkv_sizes, rope_theta


def llama_config(raw: dict[str, Any], source: str, common: dict[str, Any], **extra: Any) -> ModelConfig:
    if raw.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    heads = raw["num_attention_heads"]
    return ModelConfig(
        **{
            **dict(
                family="decoder",
                vocab_size=raw["vocab_size"],
                d_model=raw["hidden_size"],
                n_layers=raw["num_hidden_layers"],
                n_heads=heads,
                n_kv_heads=raw.get("num_key_value_heads") or heads,
                head_dim=raw.get("head_dim"),
                d_ff=raw["intermediate_size"],
                max_seq_len=raw.get("max_position_embeddings", 4096),
                position="rope",
                rope_theta=rope_theta(raw, source),
                norm="rmsnorm",
                norm_eps=raw.get("rms_norm_eps", 1e-6),
                activation="swiglu",
                bias=False,
                tie_embeddings=raw.get("tie_word_embeddings", False),
                dropout=0.0,
                attn_dropout=raw.get("attention_dropout", 0.0),
                init_std=raw.get("initializer_range", 0.02),
            ),
            **common,
            **extra,
        }
    )


def llama_config_out(cfg: ModelConfig) -> dict[str, Any]:
    c = dict(
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_dropout=cfg.attn_dropout,
        initializer_range=cfg.init_std,
    )
    if cfg.head_dim is not None:  # else transformers derives it, as lmlab does
        c["head_dim"] = cfg.head_dim
    return c


def dense_swiglu(ours: str, gate: str, up: str, down: str, d_ff: int) -> list[Entry]:
    """lmlab's gated FFN (gate and up in one matrix, gate first) from three separate Linears."""
    return fused(f"{ours}.up", (gate, up), (d_ff, d_ff), False) + linear(f"{ours}.down", down, False)


def llama_weights(cfg: ModelConfig, p: str, ffn: Callable[[str, str, int], list[Entry]]) -> list[Entry]:
    """Embeddings, layers, final norm and untied head; `ffn(ours, theirs_layer_prefix, layer)` the FFNs."""
    t = [Entry("tok_embed.weight", (f"{p}embed_tokens.weight",))]
    for i in range(cfg.n_layers):
        o, a = f"decoder.layers.{i}.", f"{p}layers.{i}."
        t += norm(f"{o}attn_norm", f"{a}input_layernorm", False)
        t += fused(f"{o}attn.qkv", tuple(f"{a}self_attn.{x}_proj" for x in "qkv"), qkv_sizes(cfg), cfg.use_qkv_bias)
        t += linear(f"{o}attn.out", f"{a}self_attn.o_proj", False)
        t += norm(f"{o}ffn_norm", f"{a}post_attention_layernorm", False)
        t += ffn(f"{o}ffn", a, i)
    t += norm("decoder.final_norm", f"{p}norm", False)
    if "lm" in cfg.heads and not cfg.tie_embeddings:
        t += [Entry("lm_head.weight", ("lm_head.weight",))]
    return t


def is_llama_layout(cfg: ModelConfig) -> bool:
    return (
        cfg.spec.self_attention == "causal"
        and not cfg.spec.seq2seq
        and cfg.position == "rope"
        and cfg.norm == "rmsnorm"
        and cfg.activation == "swiglu"
    )


def _config_in(raw: dict[str, Any], source: str, common: dict[str, Any]) -> ModelConfig:
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise CheckpointError(
            f"{source}: attention_bias / mlp_bias = true is not supported (LLaMA without biases only)"
        )
    return llama_config(raw, source, common)


def _config_out(cfg: ModelConfig) -> dict[str, Any]:
    return {**llama_config_out(cfg), "attention_bias": False, "mlp_bias": False}


def _weights(cfg: ModelConfig, p: str) -> list[Entry]:
    def ffn(ours: str, a: str, i: int) -> list[Entry]:
        m = f"{a}mlp."
        return dense_swiglu(ours, f"{m}gate_proj", f"{m}up_proj", f"{m}down_proj", cfg.d_ff)

    return llama_weights(cfg, p, ffn)


ADAPTER = Adapter(
    model_type="llama",
    architectures={"LlamaModel": ((), False), "LlamaForCausalLM": (("lm",), False)},
    default_architecture="LlamaForCausalLM",
    config_in=_config_in,
    config_out=_config_out,
    weights=_weights,
    holds=lambda cfg: is_llama_layout(cfg) and cfg.ffn == "dense",
    prefix="model.",
)
