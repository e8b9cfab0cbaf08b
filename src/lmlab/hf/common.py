"""What every Hugging Face adapter shares: the Adapter record, weight-table entries and their helpers.

A weight table lists, for every lmlab tensor, the transformers tensor(s) it comes from and how:
"copy" (same shape), "T" (GPT-2's Conv1D stores weights transposed), "cat" (lmlab fuses q/k/v
and gated FFN halves into one matrix; transformers keeps them apart), "row" (BART's
final_logits_bias is (1, V)), "experts" (lmlab keeps an MoE layer's experts in one (E, in, out)
tensor; checkpoints hold one (out, in) Linear per expert, gate and up apart). The same table converts
both ways, so import and export cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError


@dataclass
class Entry:
    ours: str
    hf: tuple[str, ...]
    op: str = "copy"  # copy | T | cat | row | experts
    sizes: tuple[int, ...] = ()  # for cat: rows of each hf tensor; for experts: tensors per expert


@dataclass(frozen=True)
class Adapter:
    """One transformers model type: its classes, its config in both directions, its weight table."""

    model_type: str
    architectures: dict[str, tuple[tuple[str, ...], bool]]  # class name -> (lmlab heads, pooler)
    default_architecture: str  # for a config.json that names none
    config_in: Callable[[dict[str, Any], str, dict[str, Any]], ModelConfig]  # (raw, source, common fields)
    config_out: Callable[[ModelConfig], dict[str, Any]]  # the model-type's own config.json fields
    weights: Callable[[ModelConfig, str], list[Entry]]  # (cfg, prefix) -> the weight table
    holds: Callable[[ModelConfig], bool]  # is this the model type an lmlab model exports to?
    prefix: str = ""  # the base model's prefix inside the head classes ("bert.", "model.")

    def base_prefix(self, heads: tuple[str, ...]) -> str:
        return self.prefix if heads else ""


ACTS_IN = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
ACTS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def act(name: str, source: str) -> str:
    if name not in ACTS_IN:
        raise CheckpointError(f"{source}: activation {name!r} is not supported (known: {', '.join(ACTS_IN)})")
    return ACTS_IN[name]


def linear(ours: str, hf: str, bias: bool, op: str = "copy") -> list[Entry]:
    out = [Entry(f"{ours}.weight", (f"{hf}.weight",), op)]
    if bias:
        out.append(Entry(f"{ours}.bias", (f"{hf}.bias",)))
    return out


norm = linear  # a norm's tensors are named like a Linear's (weight, optional bias)


def fused(ours: str, hfs: tuple[str, ...], sizes: tuple[int, ...], bias: bool) -> list[Entry]:
    out = [Entry(f"{ours}.weight", tuple(f"{h}.weight" for h in hfs), "cat", sizes)]
    if bias:
        out.append(Entry(f"{ours}.bias", tuple(f"{h}.bias" for h in hfs), "cat", sizes))
    return out


def qkv_sizes(cfg: ModelConfig) -> tuple[int, int, int]:
    q, kv = cfg.n_heads * cfg.dim_head, cfg.kv_heads * cfg.dim_head
    return q, kv, kv


def experts(ours: str, names_per_expert: list[tuple[str, ...]]) -> Entry:
    """An (E, in, out) lmlab tensor from per-expert (out, in) Linears (gate then up for a fused pair)."""
    return Entry(ours, tuple(n for names in names_per_expert for n in names), "experts", (len(names_per_expert[0]),))


def rope_theta(raw: dict[str, Any], source: str) -> float:
    """The default-RoPE base of a LLaMA-style config (transformers 4.x `rope_theta`, 5.x `rope_parameters`)."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(
            f"{source}: rope_type {rope.get('rope_type', rope.get('type'))!r} is not supported (only the default RoPE)"
        )
    return float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
