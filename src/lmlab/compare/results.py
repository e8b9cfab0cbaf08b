"""What one unit (one contender, one seed) measured: typed records that the unit writes to its
result.json and the report reads back, so both sides agree on one schema.

`UnitResult.to_dict()` is the JSON the unit writes; `UnitResult.from_dict()` rebuilds the records and
names the field that does not fit (a result.json of another format, or a hand-edited one) rather than
failing later inside the report. Per-example evidence stays a plain `lmlab.metrics.evidence` dict: it
is what `compare.stats.Evidence` is built from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import ConfigError


@dataclass
class Pretrain:
    processes: int
    parallel: str
    precision: str
    steps: int
    tokens: int
    minutes: float
    train_tokens_per_s: float
    val: dict[str, float]  # the objective's own validation metrics at the end
    curve: list[list[float]]  # [step, tokens, training loss]
    val_curve: list[list[float]]  # [step, held-out bits per byte or masked-token accuracy]
    compiled: bool = False  # torch.compile'd training step


@dataclass
class Intrinsic:
    """Generative contenders: bits per byte of each window's second half given its first. The encoder:
    masked-token accuracy (and the pseudo-log-likelihood bits per byte, shown but never ranked)."""

    tokens: int
    bytes: int
    method: str
    bpb: float | None = None
    pll_bpb: float | None = None
    masked_accuracy: float | None = None
    unigram_accuracy: float | None = None
    masked_positions: int | None = None


@dataclass
class FewShot:
    questions: int
    shots: int
    accuracy: float
    accuracy_norm: float
    chance: float
    method: str


@dataclass
class Samples:
    distinct_1: float
    distinct_2: float
    repetition_4: float
    decode_tokens_per_s: float
    samples: list[dict[str, str]]


@dataclass
class MoeStats:
    load_cv: float  # coefficient of variation of the experts' load, last tenth of training
    dropped: float  # fraction of tokens over an expert's capacity
    layers: int


@dataclass
class TaskResult:
    """A fine-tuned task's held-out metrics, or why the contender could not take the task."""

    metrics: dict[str, float] = field(default_factory=dict)
    steps: int | None = None
    minutes: float | None = None
    train_examples: int | None = None
    skipped: str | None = None


@dataclass
class UnitResult:
    contender: str
    seed: int
    pretrain: Pretrain
    intrinsic: Intrinsic
    fewshot: dict[str, FewShot]  # "k0", "k3"
    tasks: dict[str, TaskResult]
    evidence: dict[str, dict[str, Any]]  # metric key -> lmlab.metrics.evidence (what the intervals resample)
    samples: Samples | None = None  # generative contenders
    fill_mask: list[dict[str, Any]] | None = None  # the encoder
    routing: dict[str, Any] | None = None  # MoE contenders: which token kinds go to which expert
    moe: MoeStats | None = None
    peak_rss_mb: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    unit_minutes: float | None = None
    fingerprint: str | None = None
    ran_on: dict[str, Any] | None = None  # under --ray: the node (id, host, ip) and the attempt that wrote it

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "result") -> UnitResult:
        return _build(cls, data, where)


def _build(tp: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as type `tp`: dataclasses field by field, containers element by element."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: missing")
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (a result of another lmlab version?)")
        kw = {}
        for name, f in fields.items():
            if name in value:
                kw[name] = _build(hints[name], value[name], f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}.{name}: missing")
        return tp(**kw)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: _build(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str):
        if isinstance(value, bool) or not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    return value  # Any
