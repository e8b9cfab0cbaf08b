"""GPT-2: GPT2Model, GPT2LMHeadModel. Conv1D layers store their weights transposed ("T")."""

from __future__ import annotations

from typing import Any

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.hf.common import ACTS_OUT, Adapter, Entry, act, linear, norm


def _config_in(raw: dict[str, Any], source: str, common: dict[str, Any]) -> ModelConfig:
    if raw.get("scale_attn_by_inverse_layer_idx"):
        raise CheckpointError(f"{source}: scale_attn_by_inverse_layer_idx=true is not supported")
    d = raw.get("n_embd", 768)
    return ModelConfig(
        family="decoder",
        vocab_size=raw["vocab_size"],
        d_model=d,
        n_layers=raw["n_layer"],
        n_heads=raw["n_head"],
        d_ff=raw.get("n_inner") or 4 * d,
        max_seq_len=raw.get("n_positions", 1024),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        activation=act(raw.get("activation_function", "gelu_new"), source),
        attn_scale=None if raw.get("scale_attn_weights", True) else 1.0,
        dropout=raw.get("resid_pdrop", 0.1),
        attn_dropout=raw.get("attn_pdrop", 0.1),
        init_std=raw.get("initializer_range", 0.02),
        tie_embeddings=raw.get("tie_word_embeddings", True),
        **common,
    )


def _config_out(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        n_positions=cfg.max_seq_len,
        layer_norm_epsilon=cfg.norm_eps,
        activation_function=ACTS_OUT.get(cfg.activation, cfg.activation),
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.attn_dropout,
        initializer_range=cfg.init_std,
        scale_attn_weights=cfg.attn_scale is None,
    )


def _weights(cfg: ModelConfig, p: str) -> list[Entry]:
    t = [Entry("tok_embed.weight", (f"{p}wte.weight",)), Entry("decoder.pos_embed.weight", (f"{p}wpe.weight",))]
    for i in range(cfg.n_layers):
        o, a = f"decoder.layers.{i}.", f"{p}h.{i}."
        t += norm(f"{o}attn_norm", f"{a}ln_1", True)
        t += linear(f"{o}attn.qkv", f"{a}attn.c_attn", True, "T")
        t += linear(f"{o}attn.out", f"{a}attn.c_proj", True, "T")
        t += norm(f"{o}ffn_norm", f"{a}ln_2", True)
        t += linear(f"{o}ffn.up", f"{a}mlp.c_fc", True, "T")
        t += linear(f"{o}ffn.down", f"{a}mlp.c_proj", True, "T")
    t += norm("decoder.final_norm", f"{p}ln_f", True)
    if "lm" in cfg.heads and not cfg.tie_embeddings:
        t += [Entry("lm_head.weight", ("lm_head.weight",))]
    return t


ADAPTER = Adapter(
    model_type="gpt2",
    architectures={"GPT2Model": ((), False), "GPT2LMHeadModel": (("lm",), False)},
    default_architecture="GPT2LMHeadModel",
    config_in=_config_in,
    config_out=_config_out,
    weights=_weights,
    holds=lambda cfg: cfg.spec.self_attention == "causal" and not cfg.spec.seq2seq and cfg.position == "learned",
    prefix="transformer.",
)
