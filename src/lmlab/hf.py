"""Hugging Face interop: config.json <-> ModelConfig, and one weight table per model type.

A weight table lists, for every lmlab tensor, the transformers tensor(s) it comes from and how:
"copy" (same shape), "T" (GPT-2's Conv1D stores weights transposed), "cat" (lmlab fuses q/k/v
and gated FFN halves into one matrix; transformers keeps them apart), "row" (BART's
final_logits_bias is (1, V)), "experts" (lmlab keeps an MoE layer's experts in one (E, in, out)
tensor; checkpoints hold one (out, in) Linear per expert, gate and up apart). The same table converts both ways, so import and export cannot drift.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError

# transformers architecture -> (model_type, heads, pooler)
ARCHITECTURES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "BertModel": ("bert", (), True),
    "BertForMaskedLM": ("bert", ("mlm",), False),
    "BertForPreTraining": ("bert", ("mlm", "nsp"), True),
    "BertForSequenceClassification": ("bert", ("classify",), True),
    "BertForTokenClassification": ("bert", ("tag",), False),
    "BertForQuestionAnswering": ("bert", ("span",), False),
    "RobertaModel": ("roberta", (), True),
    "RobertaForMaskedLM": ("roberta", ("mlm",), False),
    "GPT2Model": ("gpt2", (), False),
    "GPT2LMHeadModel": ("gpt2", ("lm",), False),
    "T5ForConditionalGeneration": ("t5", ("lm",), False),
    "BartForConditionalGeneration": ("bart", ("lm",), False),
    "BartForSequenceClassification": ("bart", ("classify",), True),  # dense + tanh + out_proj on the last </s>
    "SwitchTransformersForConditionalGeneration": ("switch_transformers", ("lm",), False),
    "MixtralModel": ("mixtral", (), False),
    "MixtralForCausalLM": ("mixtral", ("lm",), False),
    "Qwen2MoeModel": ("qwen2_moe", (), False),
    "Qwen2MoeForCausalLM": ("qwen2_moe", ("lm",), False),
}
MODEL_TYPES = ("bert", "roberta", "gpt2", "t5", "bart", "switch_transformers", "mixtral", "qwen2_moe")
# the default architecture of a model_type whose config.json names none
_DEFAULT_ARCH = {"bert": "BertModel", "roberta": "RobertaModel", "gpt2": "GPT2LMHeadModel",
                 "t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "switch_transformers": "SwitchTransformersForConditionalGeneration"}
_ACTS_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
            "relu": "relu", "silu": "silu", "swish": "silu"}
_ACTS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
_T5_GATED = {"relu": "reglu", "gelu": "geglu", "gelu_new": "geglu_tanh", "gelu_tanh": "geglu_tanh",
             "gelu_pytorch_tanh": "geglu_tanh", "silu": "swiglu"}


@dataclass
class Entry:
    ours: str
    hf: tuple[str, ...]
    op: str = "copy"  # copy | T | cat | row | experts
    sizes: tuple[int, ...] = ()  # for cat: rows of each hf tensor; for experts: tensors per expert


# ---- config -------------------------------------------------------------------------------------
def _act(name: str, source: str) -> str:
    if name not in _ACTS_IN:
        raise CheckpointError(f"{source}: activation {name!r} is not supported (known: {', '.join(_ACTS_IN)})")
    return _ACTS_IN[name]


def _labels(raw: dict[str, Any]) -> tuple[int, list[str] | None]:
    id2label = raw.get("id2label")
    if id2label:
        labels = [id2label[k] for k in sorted(id2label, key=int)]
        return len(labels), labels
    return int(raw.get("num_labels", 2)), None


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a transformers config.json (as a dict) into a ModelConfig with the right heads."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; lmlab reads {', '.join(MODEL_TYPES)}")
    archs = raw.get("architectures") or [_DEFAULT_ARCH[model_type]]
    arch = archs[0]
    if arch not in ARCHITECTURES:
        known = ", ".join(a for a, v in ARCHITECTURES.items() if v[0] == model_type)
        raise CheckpointError(f"{source}: architecture {arch!r} is not supported; for {model_type} lmlab reads {known}")
    _, heads, pooler = ARCHITECTURES[arch]
    num_labels, labels = _labels(raw)
    common: dict[str, Any] = dict(heads=heads, pooler=pooler, num_labels=num_labels, labels=labels,
                                  pad_token_id=raw.get("pad_token_id"), bos_token_id=raw.get("bos_token_id"),
                                  eos_token_id=raw.get("eos_token_id"))
    try:
        if model_type in ("bert", "roberta"):
            if raw.get("position_embedding_type", "absolute") != "absolute":
                raise CheckpointError(f"{source}: position_embedding_type "
                                      f"{raw['position_embedding_type']!r} is not supported (only 'absolute')")
            pad = raw.get("pad_token_id", 0 if model_type == "bert" else 1)
            offset = pad + 1 if model_type == "roberta" else 0
            return ModelConfig(
                family="encoder", vocab_size=raw["vocab_size"], d_model=raw["hidden_size"],
                n_layers=raw["num_hidden_layers"], n_heads=raw["num_attention_heads"], d_ff=raw["intermediate_size"],
                max_seq_len=raw.get("max_position_embeddings", 512) - offset, position_offset=offset,
                position_from_padding=model_type == "roberta", norm_eps=raw.get("layer_norm_eps", 1e-12),
                norm_placement="post", embed_norm=True, final_norm=False,
                activation=_act(raw.get("hidden_act", "gelu"), source), type_vocab_size=raw.get("type_vocab_size", 2),
                dropout=raw.get("hidden_dropout_prob", 0.1), attn_dropout=raw.get("attention_probs_dropout_prob", 0.1),
                init_std=raw.get("initializer_range", 0.02), **{**common, "pad_token_id": pad},
            )
        if model_type == "gpt2":
            if raw.get("scale_attn_by_inverse_layer_idx"):
                raise CheckpointError(f"{source}: scale_attn_by_inverse_layer_idx=true is not supported")
            d = raw.get("n_embd", 768)
            return ModelConfig(
                family="decoder", vocab_size=raw["vocab_size"], d_model=d, n_layers=raw["n_layer"],
                n_heads=raw["n_head"], d_ff=raw.get("n_inner") or 4 * d, max_seq_len=raw.get("n_positions", 1024),
                norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                activation=_act(raw.get("activation_function", "gelu_new"), source),
                attn_scale=None if raw.get("scale_attn_weights", True) else 1.0,
                dropout=raw.get("resid_pdrop", 0.1), attn_dropout=raw.get("attn_pdrop", 0.1),
                init_std=raw.get("initializer_range", 0.02), tie_embeddings=raw.get("tie_word_embeddings", True),
                **common,
            )
        if model_type == "t5":
            proj = raw.get("feed_forward_proj", "relu")
            parts = proj.split("-")
            gated = parts[0] == "gated"
            act = "gelu_new" if proj == "gated-gelu" else parts[-1]
            if act not in _T5_GATED:
                raise CheckpointError(f"{source}: feed_forward_proj {proj!r} is not supported")
            activation = _T5_GATED[act] if gated else _act(act, source)
            scale = raw.get("scale_decoder_outputs", raw.get("tie_word_embeddings", True) is not False)
            return _t5_layout(raw, activation, scale, common)
        if model_type in ("mixtral", "qwen2_moe"):
            return _moe_decoder_config(raw, model_type, source, common)
        if model_type == "switch_transformers":
            return _switch_config(raw, source, common)
        # bart
        for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
            if raw.get(a) != raw.get(b):
                raise CheckpointError(f"{source}: {a}={raw.get(a)} differs from {b}={raw.get(b)}; "
                                      "lmlab's encoder and decoder share these sizes")
        if raw.get("normalize_before") or raw.get("add_final_layer_norm"):
            raise CheckpointError(f"{source}: pre-norm BART variants (mBART) are not supported")
        d = raw["d_model"]
        return ModelConfig(
            family="encoder-decoder", vocab_size=raw["vocab_size"], d_model=d, n_layers=raw["encoder_layers"],
            n_decoder_layers=raw["decoder_layers"], n_heads=raw["encoder_attention_heads"], d_ff=raw["encoder_ffn_dim"],
            max_seq_len=raw.get("max_position_embeddings", 1024), position_offset=2, norm_placement="post",
            embed_norm=True, final_norm=False, activation=_act(raw.get("activation_function", "gelu"), source),
            scale_embeddings=bool(raw.get("scale_embedding", False)), lm_head_bias="lm" in heads,
            dropout=raw.get("dropout", 0.1), attn_dropout=raw.get("attention_dropout", 0.0),
            init_std=raw.get("init_std", 0.02), decoder_start_token_id=raw.get("decoder_start_token_id", 2),
            **common,
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: {model_type} config lacks the field {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"{source}: the {model_type} config describes no valid model: {e}") from None


def _switch_config(raw: dict[str, Any], source: str, common: dict[str, Any]) -> ModelConfig:
    """Switch Transformers: T5 v1.0 layout whose every `sparse_step`-th FFN is a top-1 MoE with a fixed
    per-sequence expert capacity."""
    steps = {raw.get("encoder_sparse_step", 2), raw.get("decoder_sparse_step", 2)}
    if len(steps) != 1 or steps - {1, 2}:
        raise CheckpointError(f"{source}: encoder_sparse_step / decoder_sparse_step {sorted(steps)} are not supported "
                              "(lmlab places MoE layers the same way in both stacks, every 1st or 2nd layer)")
    if raw.get("router_bias"):
        raise CheckpointError(f"{source}: router_bias=true is not supported")
    tied = raw.get("tie_word_embeddings", True) is not False
    return _t5_layout(raw, _act(raw.get("dense_act_fn", "relu"), source), tied, common, tie_embeddings=tied,
                      ffn="moe", moe_experts=raw["num_experts"], moe_top_k=1, moe_every=steps.pop(),
                      moe_capacity=raw.get("expert_capacity", 64), moe_jitter=raw.get("router_jitter_noise", 0.0),
                      moe_z_weight=raw.get("router_z_loss_coef", 0.001),
                      moe_aux_weight=raw.get("router_aux_loss_coef", 0.001))


def _t5_layout(raw: dict[str, Any], activation: str, scale_output: bool, common: dict[str, Any],
               **extra: Any) -> ModelConfig:
    """The T5 v1.0 / v1.1 layout (T5 and Switch Transformers): RMSNorm, relative bias, no biases."""
    d = raw["d_model"]
    return ModelConfig(
        family="encoder-decoder", vocab_size=raw["vocab_size"], d_model=d, n_layers=raw["num_layers"],
        n_decoder_layers=raw.get("num_decoder_layers") or raw["num_layers"], n_heads=raw["num_heads"],
        head_dim=raw["d_kv"], d_ff=raw["d_ff"], max_seq_len=raw.get("n_positions", 512), position="relative",
        rel_buckets=raw.get("relative_attention_num_buckets", 32),
        rel_max_distance=raw.get("relative_attention_max_distance", 128), norm="rmsnorm",
        norm_eps=raw.get("layer_norm_epsilon", 1e-6), activation=activation, bias=False, attn_scale=1.0,
        head_input_scale=d**-0.5 if scale_output else 1.0, dropout=raw.get("dropout_rate", 0.1),
        attn_dropout=raw.get("dropout_rate", 0.1),
        decoder_start_token_id=raw.get("decoder_start_token_id", raw.get("pad_token_id", 0)),
        **{**common, "pad_token_id": raw.get("pad_token_id", 0), "eos_token_id": raw.get("eos_token_id", 1)}, **extra,
    )


def _moe_decoder_config(raw: dict[str, Any], model_type: str, source: str, common: dict[str, Any]) -> ModelConfig:
    """Mixtral and Qwen2-MoE: LLaMA-style decoders (RMSNorm, RoPE, SwiGLU, GQA) with sparse MoE FFNs."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{source}: rope_type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                              "(only the default RoPE)")
    if raw.get("sliding_window") and (model_type == "mixtral" or raw.get("use_sliding_window")):
        raise CheckpointError(f"{source}: sliding-window attention (sliding_window={raw['sliding_window']}) is not "
                              "supported")
    if raw.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    d, heads = raw["hidden_size"], raw["num_attention_heads"]
    moe: dict[str, Any]
    if model_type == "mixtral":
        moe = dict(moe_experts=raw["num_local_experts"], moe_top_k=raw.get("num_experts_per_tok", 2),
                   moe_renormalize=True, moe_jitter=raw.get("router_jitter_noise", 0.0), qkv_bias=False)
    else:
        step = raw.get("decoder_sparse_step", 1)
        dense_layers = sorted(raw.get("mlp_only_layers") or [])
        if dense_layers != list(range(len(dense_layers))):
            raise CheckpointError(f"{source}: mlp_only_layers={dense_layers} is not supported (lmlab keeps dense "
                                  "FFNs in the first N layers only)")
        moe = dict(moe_experts=raw["num_experts"], moe_top_k=raw.get("num_experts_per_tok", 4),
                   moe_d_ff=raw["moe_intermediate_size"], moe_every=step, moe_first_dense=len(dense_layers),
                   moe_renormalize=bool(raw.get("norm_topk_prob", False)), moe_shared_experts=1,
                   moe_shared_d_ff=raw["shared_expert_intermediate_size"], moe_shared_gate=True,
                   qkv_bias=bool(raw.get("qkv_bias", True)))
    return ModelConfig(
        family="decoder", vocab_size=raw["vocab_size"], d_model=d, n_layers=raw["num_hidden_layers"], n_heads=heads,
        n_kv_heads=raw.get("num_key_value_heads") or heads, head_dim=raw.get("head_dim"),
        d_ff=raw["intermediate_size"], max_seq_len=raw.get("max_position_embeddings", 4096), position="rope",
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))), norm="rmsnorm",
        norm_eps=raw.get("rms_norm_eps", 1e-6), activation="swiglu", bias=False,
        tie_embeddings=raw.get("tie_word_embeddings", False), dropout=0.0, attn_dropout=raw.get("attention_dropout", 0.0),
        init_std=raw.get("initializer_range", 0.02), ffn="moe", moe_aux_weight=raw.get("router_aux_loss_coef", 0.001),
        **moe, **common,
    )


def _effective(cfg: ModelConfig, name: str) -> Any:
    """A field's value with its None default resolved, so that equivalent configs compare equal."""
    if name == "qkv_bias":
        return cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    if name == "moe_renormalize":
        return cfg.moe_top_k > 1 if cfg.moe_renormalize is None else cfg.moe_renormalize
    if name == "moe_shared_d_ff" and cfg.moe_shared_experts:
        return cfg.moe_shared_d_ff or (cfg.moe_d_ff or cfg.d_ff) * cfg.moe_shared_experts
    if name == "moe_d_ff":
        return cfg.moe_d_ff or cfg.d_ff
    return getattr(cfg, name)


def hf_model_type(cfg: ModelConfig) -> str:
    """Which transformers model type can hold this lmlab model, or a ConfigError saying why none."""
    if cfg.family == "prefix-lm":
        raise ConfigError("a prefix-lm model has no transformers counterpart (no transformers class mixes a "
                          "bidirectional prefix with a causal suffix in one stack); save it in lmlab format")
    if cfg.family == "encoder":
        mt = "roberta" if cfg.position_from_padding else "bert"
    elif cfg.family == "decoder":
        mt = "gpt2"
        if cfg.position == "rope" and cfg.ffn == "moe":
            mt = "qwen2_moe" if cfg.moe_shared_experts else "mixtral"
    else:
        mt = "t5" if cfg.position == "relative" else "bart"
        if mt == "t5" and cfg.ffn == "moe":
            mt = "switch_transformers"
    arch = architecture(cfg, mt)
    back = config_from_hf(to_hf_config(cfg, mt, arch), "export")
    # these fields describe the computation; every one must survive the round trip
    fields = [f.name for f in dataclasses.fields(ModelConfig)
              if f.name not in ("name", "labels", "dropout", "attn_dropout", "init_std", "unk_token_id",
                                "mask_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id",
                                "decoder_start_token_id", "pad_token_id", "num_labels")]
    differ = [f"{f}={getattr(cfg, f)!r} (transformers' {mt} would give {getattr(back, f)!r})"
              for f in fields if _effective(cfg, f) != _effective(back, f)]
    if differ:
        raise ConfigError(f"this model has no exact transformers {mt} counterpart: " + "; ".join(differ))
    return mt


def architecture(cfg: ModelConfig, model_type: str) -> str:
    for arch, (mt, heads, pooler) in ARCHITECTURES.items():
        if mt == model_type and heads == cfg.heads and pooler == cfg.pooler:
            return arch
    known = ", ".join(f"{a} (heads={h}, pooler={pl})" for a, (m, h, pl) in ARCHITECTURES.items() if m == model_type)
    raise ConfigError(f"heads={cfg.heads} with pooler={cfg.pooler} match no transformers {model_type} class "
                      f"lmlab exports; known: {known}")


def to_hf_config(cfg: ModelConfig, model_type: str, arch: str) -> dict[str, Any]:
    """A config.json that transformers' Auto classes read back as this model."""
    c: dict[str, Any] = {"model_type": model_type, "architectures": [arch], "vocab_size": cfg.vocab_size,
                         "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id,
                         "eos_token_id": cfg.eos_token_id, "tie_word_embeddings": cfg.tie_embeddings}
    if cfg.labels:
        c["id2label"] = {str(i): lab for i, lab in enumerate(cfg.labels)}
        c["label2id"] = {lab: i for i, lab in enumerate(cfg.labels)}
    elif "classify" in cfg.heads or "tag" in cfg.heads:
        c["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        c["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    act = _ACTS_OUT.get(cfg.activation, cfg.activation)
    if model_type in ("bert", "roberta"):
        c.update(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                 intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_seq_len + cfg.position_offset,
                 type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps, hidden_act=act,
                 hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attn_dropout,
                 initializer_range=cfg.init_std, position_embedding_type="absolute")
    elif model_type == "gpt2":
        c.update(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
                 n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps, activation_function=act,
                 resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout,
                 initializer_range=cfg.init_std, scale_attn_weights=cfg.attn_scale is None)
    elif model_type == "switch_transformers":
        n_sparse = sum(1 for i in range(cfg.n_layers) if i % cfg.moe_every == cfg.moe_every - 1)
        n_sparse_dec = sum(1 for i in range(cfg.decoder_layers) if i % cfg.moe_every == cfg.moe_every - 1)
        c.update(d_model=cfg.d_model, d_kv=cfg.dim_head, d_ff=cfg.d_ff, num_layers=cfg.n_layers,
                 num_decoder_layers=cfg.decoder_layers, num_heads=cfg.n_heads,
                 num_sparse_encoder_layers=n_sparse, num_sparse_decoder_layers=n_sparse_dec,
                 encoder_sparse_step=cfg.moe_every, decoder_sparse_step=cfg.moe_every,
                 relative_attention_num_buckets=cfg.rel_buckets, relative_attention_max_distance=cfg.rel_max_distance,
                 dropout_rate=cfg.dropout, layer_norm_epsilon=cfg.norm_eps, dense_act_fn=act, is_encoder_decoder=True,
                 n_positions=cfg.max_seq_len, decoder_start_token_id=cfg.decoder_start_token_id,
                 num_experts=cfg.moe_experts, expert_capacity=cfg.moe_capacity, router_bias=False,
                 router_jitter_noise=cfg.moe_jitter, router_z_loss_coef=cfg.moe_z_weight,
                 router_aux_loss_coef=cfg.moe_aux_weight, router_dtype="float32")
    elif model_type == "t5":
        gated = {v: k for k, v in _T5_GATED.items() if k != "gelu_pytorch_tanh" and k != "gelu_tanh"}
        proj = f"gated-{gated[cfg.activation]}" if cfg.activation in gated else _ACTS_OUT.get(cfg.activation, "?")
        c.update(d_model=cfg.d_model, d_kv=cfg.dim_head, d_ff=cfg.d_ff, num_layers=cfg.n_layers,
                 num_decoder_layers=cfg.decoder_layers, num_heads=cfg.n_heads,
                 relative_attention_num_buckets=cfg.rel_buckets,
                 relative_attention_max_distance=cfg.rel_max_distance, dropout_rate=cfg.dropout,
                 layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=proj, is_encoder_decoder=True,
                 scale_decoder_outputs=cfg.head_input_scale != 1.0, n_positions=cfg.max_seq_len,
                 decoder_start_token_id=cfg.decoder_start_token_id)
    elif model_type in ("mixtral", "qwen2_moe"):
        c.update(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                 num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.d_ff,
                 max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                 rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                 attention_dropout=cfg.attn_dropout, initializer_range=cfg.init_std,
                 router_aux_loss_coef=cfg.moe_aux_weight, num_experts_per_tok=cfg.moe_top_k)
        if cfg.head_dim is not None:  # else transformers derives it, as lmlab does
            c["head_dim"] = cfg.head_dim
        if model_type == "mixtral":
            c.update(num_local_experts=cfg.moe_experts, router_jitter_noise=cfg.moe_jitter, sliding_window=None)
        else:
            c.update(num_experts=cfg.moe_experts, moe_intermediate_size=cfg.moe_d_ff or cfg.d_ff,
                     decoder_sparse_step=cfg.moe_every, mlp_only_layers=list(range(cfg.moe_first_dense)),
                     norm_topk_prob=_effective(cfg, "moe_renormalize"), shared_expert_intermediate_size=cfg.moe_shared_d_ff
                     or (cfg.moe_d_ff or cfg.d_ff) * cfg.moe_shared_experts, qkv_bias=_effective(cfg, "qkv_bias"),
                     use_sliding_window=False)
    else:  # bart
        c.update(d_model=cfg.d_model, encoder_layers=cfg.n_layers, decoder_layers=cfg.decoder_layers,
                 encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
                 encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, max_position_embeddings=cfg.max_seq_len,
                 activation_function=act, scale_embedding=cfg.scale_embeddings, dropout=cfg.dropout,
                 attention_dropout=cfg.attn_dropout, init_std=cfg.init_std, is_encoder_decoder=True,
                 decoder_start_token_id=cfg.decoder_start_token_id, forced_eos_token_id=cfg.eos_token_id)
    return c


# ---- weight tables --------------------------------------------------------------------------------
def _base_prefix(model_type: str, heads: tuple[str, ...]) -> str:
    if model_type in ("bert", "roberta"):
        return f"{model_type}." if heads else ""
    if model_type == "gpt2":
        return "transformer." if heads else ""
    if model_type in ("bart", "mixtral", "qwen2_moe"):
        return "model." if heads else ""
    return ""


def _linear(ours: str, hf: str, bias: bool, op: str = "copy") -> list[Entry]:
    out = [Entry(f"{ours}.weight", (f"{hf}.weight",), op)]
    if bias:
        out.append(Entry(f"{ours}.bias", (f"{hf}.bias",)))
    return out


def _norm(ours: str, hf: str, bias: bool) -> list[Entry]:
    return _linear(ours, hf, bias)


def _fused(ours: str, hfs: tuple[str, ...], sizes: tuple[int, ...], bias: bool) -> list[Entry]:
    out = [Entry(f"{ours}.weight", tuple(f"{h}.weight" for h in hfs), "cat", sizes)]
    if bias:
        out.append(Entry(f"{ours}.bias", tuple(f"{h}.bias" for h in hfs), "cat", sizes))
    return out


def weight_table(cfg: ModelConfig, model_type: str, prefix: str | None = None) -> list[Entry]:
    """Every lmlab tensor of `cfg` with the transformers tensor(s) it corresponds to."""
    p = _base_prefix(model_type, cfg.heads) if prefix is None else prefix
    qd, kd = cfg.n_heads * cfg.dim_head, cfg.kv_heads * cfg.dim_head
    t: list[Entry] = []
    if model_type in ("bert", "roberta"):
        e = f"{p}embeddings."
        t += [Entry("tok_embed.weight", (f"{e}word_embeddings.weight",)),
              Entry("encoder.pos_embed.weight", (f"{e}position_embeddings.weight",)),
              Entry("encoder.type_embed.weight", (f"{e}token_type_embeddings.weight",))]
        t += _norm("encoder.embed_norm", f"{e}LayerNorm", True)
        for i in range(cfg.n_layers):
            o, a = f"encoder.layers.{i}.", f"{p}encoder.layer.{i}."
            t += _fused(f"{o}attn.qkv", tuple(f"{a}attention.self.{n}" for n in ("query", "key", "value")),
                        (qd, kd, kd), True)
            t += _linear(f"{o}attn.out", f"{a}attention.output.dense", True)
            t += _norm(f"{o}attn_norm", f"{a}attention.output.LayerNorm", True)
            t += _linear(f"{o}ffn.up", f"{a}intermediate.dense", True)
            t += _linear(f"{o}ffn.down", f"{a}output.dense", True)
            t += _norm(f"{o}ffn_norm", f"{a}output.LayerNorm", True)
        if cfg.pooler:
            t += _linear("pooler.dense", f"{p}pooler.dense", True)
        if "mlm" in cfg.heads:
            if model_type == "bert":
                t += _linear("mlm_head.dense", "cls.predictions.transform.dense", True)
                t += _norm("mlm_head.norm", "cls.predictions.transform.LayerNorm", True)
                t += [Entry("mlm_head.bias", ("cls.predictions.bias",))]
                if not cfg.tie_embeddings:
                    t += [Entry("mlm_head.weight", ("cls.predictions.decoder.weight",))]
            else:
                t += _linear("mlm_head.dense", "lm_head.dense", True)
                t += _norm("mlm_head.norm", "lm_head.layer_norm", True)
                t += [Entry("mlm_head.bias", ("lm_head.bias",))]
                if not cfg.tie_embeddings:
                    t += [Entry("mlm_head.weight", ("lm_head.decoder.weight",))]
        if "nsp" in cfg.heads:
            t += _linear("nsp_head", "cls.seq_relationship", True)
        if "classify" in cfg.heads:
            t += _linear("classifier", "classifier", True)
        if "tag" in cfg.heads:
            t += _linear("tagger", "classifier", True)
        if "span" in cfg.heads:
            t += _linear("span_head", "qa_outputs", True)
    elif model_type == "gpt2":
        t += [Entry("tok_embed.weight", (f"{p}wte.weight",)), Entry("decoder.pos_embed.weight", (f"{p}wpe.weight",))]
        for i in range(cfg.n_layers):
            o, a = f"decoder.layers.{i}.", f"{p}h.{i}."
            t += _norm(f"{o}attn_norm", f"{a}ln_1", True)
            t += _linear(f"{o}attn.qkv", f"{a}attn.c_attn", True, "T")
            t += _linear(f"{o}attn.out", f"{a}attn.c_proj", True, "T")
            t += _norm(f"{o}ffn_norm", f"{a}ln_2", True)
            t += _linear(f"{o}ffn.up", f"{a}mlp.c_fc", True, "T")
            t += _linear(f"{o}ffn.down", f"{a}mlp.c_proj", True, "T")
        t += _norm("decoder.final_norm", f"{p}ln_f", True)
        if "lm" in cfg.heads and not cfg.tie_embeddings:
            t += [Entry("lm_head.weight", ("lm_head.weight",))]
    elif model_type in ("t5", "switch_transformers"):
        t += [Entry("tok_embed.weight", (f"{p}shared.weight",))]
        switch = model_type == "switch_transformers"
        from lmlab.model.moe import is_moe_layer
        gated = cfg.activation in ("reglu", "geglu", "geglu_tanh", "swiglu")
        for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
            t += [Entry(f"{stack}.rel_bias.weight",
                        (f"{p}{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",))]
            for i in range(n):
                o, a = f"{stack}.layers.{i}.", f"{p}{stack}.block.{i}.layer."
                t += _fused(f"{o}attn.qkv", tuple(f"{a}0.SelfAttention.{n}" for n in "qkv"), (qd, kd, kd), False)
                t += _linear(f"{o}attn.out", f"{a}0.SelfAttention.o", False)
                t += _norm(f"{o}attn_norm", f"{a}0.layer_norm", False)
                ff = 1
                if stack == "decoder":
                    ff = 2
                    t += _linear(f"{o}cross_attn.q", f"{a}1.EncDecAttention.q", False)
                    t += _fused(f"{o}cross_attn.kv", tuple(f"{a}1.EncDecAttention.{n}" for n in "kv"), (kd, kd), False)
                    t += _linear(f"{o}cross_attn.out", f"{a}1.EncDecAttention.o", False)
                    t += _norm(f"{o}cross_norm", f"{a}1.layer_norm", False)
                if switch and is_moe_layer(cfg, i):
                    m, n = f"{a}{ff}.mlp.", cfg.moe_experts
                    t += [Entry(f"{o}ffn.router.weight", (f"{m}router.classifier.weight",)),
                          Entry(f"{o}ffn.w_up", tuple(f"{m}experts.expert_{j}.wi.weight" for j in range(n)),
                                "experts", (1,)),
                          Entry(f"{o}ffn.w_down", tuple(f"{m}experts.expert_{j}.wo.weight" for j in range(n)),
                                "experts", (1,))]
                elif switch:
                    t += _linear(f"{o}ffn.up", f"{a}{ff}.mlp.wi", False)
                    t += _linear(f"{o}ffn.down", f"{a}{ff}.mlp.wo", False)
                elif gated:
                    t += _fused(f"{o}ffn.up", (f"{a}{ff}.DenseReluDense.wi_0", f"{a}{ff}.DenseReluDense.wi_1"),
                                (cfg.d_ff, cfg.d_ff), False)
                    t += _linear(f"{o}ffn.down", f"{a}{ff}.DenseReluDense.wo", False)
                else:
                    t += _linear(f"{o}ffn.up", f"{a}{ff}.DenseReluDense.wi", False)
                    t += _linear(f"{o}ffn.down", f"{a}{ff}.DenseReluDense.wo", False)
                t += _norm(f"{o}ffn_norm", f"{a}{ff}.layer_norm", False)
            t += _norm(f"{stack}.final_norm", f"{p}{stack}.final_layer_norm", False)
        if "lm" in cfg.heads and not cfg.tie_embeddings:
            t += [Entry("lm_head.weight", ("lm_head.weight",))]
    elif model_type == "bart":
        t += [Entry("tok_embed.weight", (f"{p}shared.weight",))]
        for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
            s = f"{p}{stack}."
            t += [Entry(f"{stack}.pos_embed.weight", (f"{s}embed_positions.weight",))]
            t += _norm(f"{stack}.embed_norm", f"{s}layernorm_embedding", True)
            for i in range(n):
                o, a = f"{stack}.layers.{i}.", f"{s}layers.{i}."
                t += _fused(f"{o}attn.qkv", tuple(f"{a}self_attn.{n}_proj" for n in "qkv"), (qd, kd, kd), True)
                t += _linear(f"{o}attn.out", f"{a}self_attn.out_proj", True)
                t += _norm(f"{o}attn_norm", f"{a}self_attn_layer_norm", True)
                if stack == "decoder":
                    t += _linear(f"{o}cross_attn.q", f"{a}encoder_attn.q_proj", True)
                    t += _fused(f"{o}cross_attn.kv", tuple(f"{a}encoder_attn.{n}_proj" for n in "kv"), (kd, kd), True)
                    t += _linear(f"{o}cross_attn.out", f"{a}encoder_attn.out_proj", True)
                    t += _norm(f"{o}cross_norm", f"{a}encoder_attn_layer_norm", True)
                t += _linear(f"{o}ffn.up", f"{a}fc1", True)
                t += _linear(f"{o}ffn.down", f"{a}fc2", True)
                t += _norm(f"{o}ffn_norm", f"{a}final_layer_norm", True)
        if "lm" in cfg.heads:
            t += [Entry("lm_head.bias", ("final_logits_bias",), "row")]
            if not cfg.tie_embeddings:
                t += [Entry("lm_head.weight", ("lm_head.weight",))]
        if "classify" in cfg.heads:
            if cfg.pooler:
                t += _linear("pooler.dense", "classification_head.dense", True)
            t += _linear("classifier", "classification_head.out_proj", True)
    elif model_type in ("mixtral", "qwen2_moe"):
        t += [Entry("tok_embed.weight", (f"{p}embed_tokens.weight",))]
        qkv_bias = cfg.qkv_bias if cfg.qkv_bias is not None else cfg.bias
        from lmlab.model.moe import is_moe_layer  # the one rule the model itself uses

        for i in range(cfg.n_layers):
            o, a = f"decoder.layers.{i}.", f"{p}layers.{i}."
            t += _norm(f"{o}attn_norm", f"{a}input_layernorm", False)
            t += _fused(f"{o}attn.qkv", tuple(f"{a}self_attn.{n}_proj" for n in "qkv"), (qd, kd, kd), qkv_bias)
            t += _linear(f"{o}attn.out", f"{a}self_attn.o_proj", False)
            t += _norm(f"{o}ffn_norm", f"{a}post_attention_layernorm", False)
            sparse = is_moe_layer(cfg, i)
            if model_type == "mixtral":
                e = f"{a}block_sparse_moe."
                up, gate, down, router = ("w3", "w1", "w2", "gate")
            else:
                e = f"{a}mlp."
                up, gate, down, router = ("up_proj", "gate_proj", "down_proj", "gate")
            if not sparse:
                d_ff = cfg.d_ff
                t += _fused(f"{o}ffn.up", (f"{e}{gate}", f"{e}{up}"), (d_ff, d_ff), False)
                t += _linear(f"{o}ffn.down", f"{e}{down}", False)
                continue
            n = cfg.moe_experts
            t += [Entry(f"{o}ffn.router.weight", (f"{e}{router}.weight",)),
                  Entry(f"{o}ffn.w_up", tuple(f"{e}experts.{j}.{w}.weight" for j in range(n) for w in (gate, up)),
                        "experts", (2,)),
                  Entry(f"{o}ffn.w_down", tuple(f"{e}experts.{j}.{down}.weight" for j in range(n)), "experts", (1,))]
            if cfg.moe_shared_experts:
                sd = cfg.moe_shared_d_ff or (cfg.moe_d_ff or cfg.d_ff) * cfg.moe_shared_experts
                t += _fused(f"{o}ffn.shared.up", (f"{e}shared_expert.gate_proj", f"{e}shared_expert.up_proj"),
                            (sd, sd), False)
                t += _linear(f"{o}ffn.shared.down", f"{e}shared_expert.down_proj", False)
                if cfg.moe_shared_gate:
                    t += _linear(f"{o}ffn.shared_gate", f"{e}shared_expert_gate", False)
        t += _norm("decoder.final_norm", f"{p}norm", False)
        if "lm" in cfg.heads and not cfg.tie_embeddings:
            t += [Entry("lm_head.weight", ("lm_head.weight",))]
    else:
        raise ConfigError(f"no weight table for model_type {model_type!r}")
    return t


# tensors transformers may store that lmlab derives or does not need
_IGNORABLE = ("position_ids", "attn.bias", "attn.masked_bias", "cls.predictions.decoder.", "lm_head.decoder.",
              "embed_tokens.weight", "lm_head.weight", "token_type_ids", "EncDecAttention.relative_attention_bias")


def _detect_prefix(cfg: ModelConfig, model_type: str, keys: set[str]) -> str:
    """Checkpoints saved from a base model lack the head classes' prefix ("bert.", "model.")."""
    default = _base_prefix(model_type, cfg.heads)
    probe = weight_table(cfg, model_type, prefix="")[0].hf[0]
    for prefix in (default, "", "bert.", "roberta.", "transformer.", "model."):
        if prefix + probe in keys:
            return prefix
    return default


def hf_to_lmlab(state: dict[str, torch.Tensor], cfg: ModelConfig, model_type: str, expected: dict[str, torch.Size],
                source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Convert a transformers state dict. Returns (lmlab state, unexpected keys that were left over)."""
    prefix = _detect_prefix(cfg, model_type, set(state))
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for entry in weight_table(cfg, model_type, prefix):
        missing = [k for k in entry.hf if k not in state]
        if missing:
            raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing; a {model_type} model with this "
                                  f"config.json needs it (for lmlab's {entry.ours})")
        parts = [state[k] for k in entry.hf]
        used.update(entry.hf)
        want = expected[entry.ours]
        if entry.op == "T":
            tensor = parts[0].t()
        elif entry.op == "cat":
            for k, part, rows in zip(entry.hf, parts, entry.sizes):
                if part.shape[0] != rows or tuple(part.shape[1:]) != tuple(want[1:]):
                    raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(part.shape)}, but config.json "
                                          f"implies {(rows, *want[1:])}")
            tensor = torch.cat(parts, dim=0)
        elif entry.op == "row":
            tensor = parts[0].reshape(-1)
        elif entry.op == "experts":  # per expert: (out, in) Linears -> one (in, out) slice, gate then up
            per = entry.sizes[0]
            experts = [torch.cat([w.t() for w in parts[j:j + per]], dim=1) for j in range(0, len(parts), per)]
            bad = [k for k, w in zip(entry.hf, parts) if w.shape[1] != want[1]]
            if bad or any(x.shape != want[1:] for x in experts):
                k = bad[0] if bad else entry.hf[0]
                raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(state[k].shape)}, but config.json "
                                      f"implies {want[1]} inputs and {want[2] // per} outputs per expert")
            tensor = torch.stack(experts)
        else:
            tensor = parts[0]
        if tensor.shape != want:
            shown = tuple(parts[0].shape)
            implied = tuple(want) if entry.op != "T" else tuple(reversed(want))
            raise CheckpointError(f"{source}: tensor {entry.hf[0]!r} has shape {shown}, but config.json implies "
                                  f"{implied}")
        out[entry.ours] = tensor.contiguous()
    unexpected = [k for k in state if k not in used and not any(s in k for s in _IGNORABLE)]
    return out, unexpected


def lmlab_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """Convert an lmlab state dict to transformers names and layouts (tied weights written once)."""
    out: dict[str, torch.Tensor] = {}
    for entry in weight_table(cfg, model_type):
        tensor = state[entry.ours]
        if entry.op == "T":
            out[entry.hf[0]] = tensor.t().contiguous()
        elif entry.op == "cat":
            for k, part in zip(entry.hf, tensor.split(list(entry.sizes), dim=0)):
                out[k] = part.contiguous()
        elif entry.op == "row":
            out[entry.hf[0]] = tensor.reshape(1, -1).contiguous()
        elif entry.op == "experts":
            per = entry.sizes[0]
            names = iter(entry.hf)
            for expert in tensor:  # (in, out): split the outputs (gate, up) and transpose each back
                for part in expert.chunk(per, dim=1):
                    out[next(names)] = part.t().contiguous()
        else:
            out[entry.hf[0]] = tensor.contiguous()
    return out
