"""BERT: BertModel, BertForMaskedLM / PreTraining / SequenceClassification / TokenClassification /
QuestionAnswering. The encoder layout is shared with RoBERTa (roberta.py)."""

from __future__ import annotations

from typing import Any

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.hf.common import ACTS_OUT, Adapter, Entry, act, fused, linear, norm, qkv_sizes


def encoder_config_in(raw: dict[str, Any], source: str, common: dict[str, Any], roberta: bool) -> ModelConfig:
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"{source}: position_embedding_type {raw['position_embedding_type']!r} is not supported (only 'absolute')"
        )
    pad = raw.get("pad_token_id", 1 if roberta else 0)
    offset = pad + 1 if roberta else 0  # RoBERTa counts positions from pad + 1
    return ModelConfig(
        family="encoder",
        vocab_size=raw["vocab_size"],
        d_model=raw["hidden_size"],
        n_layers=raw["num_hidden_layers"],
        n_heads=raw["num_attention_heads"],
        d_ff=raw["intermediate_size"],
        max_seq_len=raw.get("max_position_embeddings", 512) - offset,
        position_offset=offset,
        position_from_padding=roberta,
        norm_eps=raw.get("layer_norm_eps", 1e-12),
        norm_placement="post",
        embed_norm=True,
        final_norm=False,
        activation=act(raw.get("hidden_act", "gelu"), source),
        type_vocab_size=raw.get("type_vocab_size", 2),
        dropout=raw.get("hidden_dropout_prob", 0.1),
        attn_dropout=raw.get("attention_probs_dropout_prob", 0.1),
        init_std=raw.get("initializer_range", 0.02),
        **{**common, "pad_token_id": pad},
    )


def encoder_config_out(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len + cfg.position_offset,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps,
        hidden_act=ACTS_OUT.get(cfg.activation, cfg.activation),
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attn_dropout,
        initializer_range=cfg.init_std,
        position_embedding_type="absolute",
    )


def encoder_weights(cfg: ModelConfig, p: str) -> list[Entry]:
    """Embeddings, layers and pooler of BertModel / RobertaModel, plus the task heads both share."""
    e = f"{p}embeddings."
    t = [
        Entry("tok_embed.weight", (f"{e}word_embeddings.weight",)),
        Entry("encoder.pos_embed.weight", (f"{e}position_embeddings.weight",)),
        Entry("encoder.type_embed.weight", (f"{e}token_type_embeddings.weight",)),
    ]
    t += norm("encoder.embed_norm", f"{e}LayerNorm", True)
    for i in range(cfg.n_layers):
        o, a = f"encoder.layers.{i}.", f"{p}encoder.layer.{i}."
        t += fused(
            f"{o}attn.qkv", tuple(f"{a}attention.self.{n}" for n in ("query", "key", "value")), qkv_sizes(cfg), True
        )
        t += linear(f"{o}attn.out", f"{a}attention.output.dense", True)
        t += norm(f"{o}attn_norm", f"{a}attention.output.LayerNorm", True)
        t += linear(f"{o}ffn.up", f"{a}intermediate.dense", True)
        t += linear(f"{o}ffn.down", f"{a}output.dense", True)
        t += norm(f"{o}ffn_norm", f"{a}output.LayerNorm", True)
    if cfg.pooler:
        t += linear("pooler.dense", f"{p}pooler.dense", True)
    if "classify" in cfg.heads:
        t += linear("classifier", "classifier", True)
    if "tag" in cfg.heads:
        t += linear("tagger", "classifier", True)
    if "span" in cfg.heads:
        t += linear("span_head", "qa_outputs", True)
    return t


def _weights(cfg: ModelConfig, p: str) -> list[Entry]:
    t = encoder_weights(cfg, p)
    if "mlm" in cfg.heads:
        t += linear("mlm_head.dense", "cls.predictions.transform.dense", True)
        t += norm("mlm_head.norm", "cls.predictions.transform.LayerNorm", True)
        t += [Entry("mlm_head.bias", ("cls.predictions.bias",))]
        if not cfg.tie_embeddings:
            t += [Entry("mlm_head.weight", ("cls.predictions.decoder.weight",))]
    if "nsp" in cfg.heads:
        t += linear("nsp_head", "cls.seq_relationship", True)
    return t


ADAPTER = Adapter(
    model_type="bert",
    architectures={
        "BertModel": ((), True),
        "BertForMaskedLM": (("mlm",), False),
        "BertForPreTraining": (("mlm", "nsp"), True),
        "BertForSequenceClassification": (("classify",), True),
        "BertForTokenClassification": (("tag",), False),
        "BertForQuestionAnswering": (("span",), False),
    },
    default_architecture="BertModel",
    config_in=lambda raw, source, common: encoder_config_in(raw, source, common, roberta=False),
    config_out=encoder_config_out,
    weights=_weights,
    holds=lambda cfg: not cfg.spec.has_decoder and not cfg.position_from_padding,
    prefix="bert.",
)
