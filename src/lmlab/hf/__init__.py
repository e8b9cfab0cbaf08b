"""Hugging Face interop: one adapter module per transformers model type, registered by `model_type`.

Each module (bert, roberta, gpt2, t5, bart, switch_transformers, llama, mixtral, qwen2_moe) holds
its architectures, its config.json in both directions and its one weight table (lmlab.hf.common
explains the table's operations); this module reads and writes through whichever adapter the
config names. Supporting a new model type is one new module and one line in ADAPTERS.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError, LmlabError
from lmlab.hf import bart, bert, gpt2, llama, mixtral, qwen2_moe, roberta, switch_transformers, t5
from lmlab.hf.common import Adapter, Entry

ADAPTERS: dict[str, Adapter] = {
    m.ADAPTER.model_type: m.ADAPTER
    for m in (bert, roberta, gpt2, t5, bart, switch_transformers, llama, mixtral, qwen2_moe)
}
MODEL_TYPES = tuple(ADAPTERS)
# transformers architecture -> (model_type, heads, pooler)
ARCHITECTURES: dict[str, tuple[str, tuple[str, ...], bool]] = {
    arch: (a.model_type, heads, pooler) for a in ADAPTERS.values() for arch, (heads, pooler) in a.architectures.items()
}

__all__ = [
    "ADAPTERS",
    "ARCHITECTURES",
    "MODEL_TYPES",
    "Adapter",
    "Entry",
    "architecture",
    "config_from_hf",
    "hf_model_type",
    "hf_to_lmlab",
    "lmlab_to_hf",
    "to_hf_config",
    "weight_table",
]


def _labels(raw: dict[str, Any]) -> tuple[int, list[str] | None]:
    id2label = raw.get("id2label")
    if id2label:
        labels = [id2label[k] for k in sorted(id2label, key=int)]
        return len(labels), labels
    return int(raw.get("num_labels", 2)), None


def _adapter(model_type: Any, source: str) -> Adapter:
    if model_type not in ADAPTERS:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; lmlab reads {', '.join(MODEL_TYPES)}"
        )
    return ADAPTERS[model_type]


# ---- config -------------------------------------------------------------------------------------
def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a transformers config.json (as a dict) into a ModelConfig with the right heads."""
    adapter = _adapter(raw.get("model_type"), source)
    arch = (raw.get("architectures") or [adapter.default_architecture])[0]
    if arch not in adapter.architectures:
        raise CheckpointError(
            f"{source}: architecture {arch!r} is not supported; for {adapter.model_type} lmlab "
            f"reads {', '.join(adapter.architectures)}"
        )
    heads, pooler = adapter.architectures[arch]
    num_labels, labels = _labels(raw)
    common: dict[str, Any] = dict(
        heads=heads,
        pooler=pooler,
        num_labels=num_labels,
        labels=labels,
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )
    try:
        return adapter.config_in(raw, source, common)
    except KeyError as e:
        raise CheckpointError(f"{source}: {adapter.model_type} config lacks the field {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"{source}: the {adapter.model_type} config describes no valid model: {e}") from None


def to_hf_config(cfg: ModelConfig, model_type: str, arch: str) -> dict[str, Any]:
    """A config.json that transformers' Auto classes read back as this model."""
    c: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [arch],
        "vocab_size": cfg.vocab_size,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.labels:
        c["id2label"] = {str(i): lab for i, lab in enumerate(cfg.labels)}
        c["label2id"] = {lab: i for i, lab in enumerate(cfg.labels)}
    elif cfg.task_head in ("classify", "tag"):
        c["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        c["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    c.update(ADAPTERS[model_type].config_out(cfg))
    return c


# fields that do not change what the model computes, so an export need not carry them exactly
_NOT_COMPUTED = (
    "name",
    "labels",
    "dropout",
    "attn_dropout",
    "init_std",
    "init",
    "unk_token_id",
    "mask_token_id",
    "cls_token_id",
    "sep_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "pad_token_id",
    "num_labels",
)


def _effective(cfg: ModelConfig, name: str) -> Any:
    """A field's value with its None default resolved, so that equivalent configs compare equal."""
    resolved = {
        "qkv_bias": lambda: cfg.use_qkv_bias,
        "moe_renormalize": lambda: cfg.moe_renormalizes,
        "moe_d_ff": lambda: cfg.expert_d_ff,
        "moe_shared_d_ff": lambda: cfg.shared_d_ff,
        "n_decoder_layers": lambda: cfg.decoder_layers if cfg.spec.seq2seq else None,
        "n_kv_heads": lambda: cfg.kv_heads,
        "head_dim": lambda: cfg.dim_head,
        "classifier_pooling": lambda: cfg.pooling,  # None means the family's own: cls / last
    }
    return resolved[name]() if name in resolved else getattr(cfg, name)


def _round_trip_differences(cfg: ModelConfig, model_type: str) -> list[str]:
    """The computation-relevant fields that an export to `model_type` and back would change."""
    back = config_from_hf(to_hf_config(cfg, model_type, architecture(cfg, model_type)), "export")
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _NOT_COMPUTED]
    return [
        f"{f}={getattr(cfg, f)!r} (transformers' {model_type} would give {getattr(back, f)!r})"
        for f in fields
        if _effective(cfg, f) != _effective(back, f)
    ]


def hf_model_type(cfg: ModelConfig) -> str:
    """Which transformers model type can hold this lmlab model, or a ConfigError saying why none."""
    if cfg.spec.self_attention == "prefix":
        raise ConfigError(
            "a prefix-lm model has no transformers counterpart (no transformers class mixes a "
            "bidirectional prefix with a causal suffix in one stack); save it in lmlab format"
        )
    held = [a.model_type for a in ADAPTERS.values() if a.holds(cfg)]
    if held:
        differ = _round_trip_differences(cfg, held[0])
        if not differ:
            return held[0]
        raise ConfigError(f"this model has no exact transformers {held[0]} counterpart: " + "; ".join(differ))
    # no adapter claims it: name the nearest model type of the same family and what it would change
    nearest: list[tuple[int, str, list[str]]] = []
    for mt in MODEL_TYPES:
        try:
            differ = _round_trip_differences(cfg, mt)
        except LmlabError:
            continue
        if config_from_hf(to_hf_config(cfg, mt, architecture(cfg, mt)), "export").family == cfg.family:
            nearest.append((len(differ), mt, differ))
    if not nearest:
        raise ConfigError(
            f"no transformers model type lmlab exports holds this {cfg.family} model with heads "
            f"{cfg.heads}; save it in lmlab format"
        )
    _, mt, differ = min(nearest)
    raise ConfigError(
        f"this model has no exact transformers counterpart; the nearest, {mt}, would change: " + "; ".join(differ)
    )


def architecture(cfg: ModelConfig, model_type: str) -> str:
    adapter = ADAPTERS[model_type]
    for arch, (heads, pooler) in adapter.architectures.items():
        if heads == cfg.heads and pooler == cfg.pooler:
            return arch
    known = ", ".join(f"{a} (heads={h}, pooler={pl})" for a, (h, pl) in adapter.architectures.items())
    raise ConfigError(
        f"heads={cfg.heads} with pooler={cfg.pooler} match no transformers {model_type} class "
        f"lmlab exports; known: {known}"
    )


# ---- weights --------------------------------------------------------------------------------------
def weight_table(cfg: ModelConfig, model_type: str, prefix: str | None = None) -> list[Entry]:
    """Every lmlab tensor of `cfg` with the transformers tensor(s) it corresponds to."""
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise ConfigError(f"no weight table for model_type {model_type!r}")
    return adapter.weights(cfg, adapter.base_prefix(cfg.heads) if prefix is None else prefix)


# tensors transformers may store that lmlab derives or does not need
_IGNORABLE = (
    "position_ids",
    "attn.bias",
    "attn.masked_bias",
    "cls.predictions.decoder.",
    "lm_head.decoder.",
    "embed_tokens.weight",
    "lm_head.weight",
    "token_type_ids",
    "EncDecAttention.relative_attention_bias",
    "rotary_emb.inv_freq",
)


def _detect_prefix(cfg: ModelConfig, model_type: str, keys: set[str]) -> str:
    """Checkpoints saved from a base model lack the head classes' prefix ("bert.", "model.")."""
    default = ADAPTERS[model_type].base_prefix(cfg.heads)
    probe = weight_table(cfg, model_type, prefix="")[0].hf[0]
    for prefix in (default, "", "bert.", "roberta.", "transformer.", "model."):
        if prefix + probe in keys:
            return prefix
    return default


def hf_to_lmlab(
    state: dict[str, torch.Tensor], cfg: ModelConfig, model_type: str, expected: dict[str, torch.Size], source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Convert a transformers state dict. Returns (lmlab state, unexpected keys that were left over)."""
    prefix = _detect_prefix(cfg, model_type, set(state))
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for entry in weight_table(cfg, model_type, prefix):
        missing = [k for k in entry.hf if k not in state]
        if missing:
            raise CheckpointError(
                f"{source}: tensor {missing[0]!r} is missing; a {model_type} model with this "
                f"config.json needs it (for lmlab's {entry.ours})"
            )
        parts = [state[k] for k in entry.hf]
        used.update(entry.hf)
        want = expected[entry.ours]
        if entry.op == "T":
            tensor = parts[0].t()
        elif entry.op == "cat":
            for k, part, rows in zip(entry.hf, parts, entry.sizes):
                if part.shape[0] != rows or tuple(part.shape[1:]) != tuple(want[1:]):
                    raise CheckpointError(
                        f"{source}: tensor {k!r} has shape {tuple(part.shape)}, but config.json "
                        f"implies {(rows, *want[1:])}"
                    )
            tensor = torch.cat(parts, dim=0)
        elif entry.op == "row":
            tensor = parts[0].reshape(-1)
        elif entry.op == "experts":  # per expert: (out, in) Linears -> one (in, out) slice, gate then up
            per = entry.sizes[0]
            experts = [torch.cat([w.t() for w in parts[j : j + per]], dim=1) for j in range(0, len(parts), per)]
            bad = [k for k, w in zip(entry.hf, parts) if w.shape[1] != want[1]]
            if bad or any(x.shape != want[1:] for x in experts):
                k = bad[0] if bad else entry.hf[0]
                raise CheckpointError(
                    f"{source}: tensor {k!r} has shape {tuple(state[k].shape)}, but config.json "
                    f"implies {want[1]} inputs and {want[2] // per} outputs per expert"
                )
            tensor = torch.stack(experts)
        else:
            tensor = parts[0]
        if tensor.shape != want:
            shown = tuple(parts[0].shape)
            implied = tuple(want) if entry.op != "T" else tuple(reversed(want))
            raise CheckpointError(
                f"{source}: tensor {entry.hf[0]!r} has shape {shown}, but config.json implies {implied}"
            )
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
