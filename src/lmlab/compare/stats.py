"""Estimates with their uncertainty, and verdicts that follow from them.

Every measurement of a comparison is a ratio of sums over evaluation examples (lmlab.metrics.evidence):
bits per byte is the bits of each held-out window's second half over its bytes, an accuracy is the
right answers over the examples, an entity F1 is 2 x true positives over predicted + gold entities,
a QA F1 the per-question F1 over the questions. A contender's value is the mean over its seeds of
that ratio; a trivial baseline is the same ratio, from one "seed", on the same examples.

The 95% interval combines both sources of chance, as a two-level bootstrap: each draw resamples the
evaluation examples (the same draw for every contender and baseline: a paired bootstrap) and, for each
contender on its own, its seeds. A difference is shown when the interval of the paired difference
excludes zero.

A verdict on "A is better than B" is
- confirmed / contradicted: both beat their trivial baselines (their intervals against the baseline
  exclude zero in the better direction) and the interval of A - B excludes zero;
- tie: both beat their baselines and the interval of A - B holds zero;
- undetermined: a side does not beat its baseline (the verdict says which, and by how much);
- not measured: a side is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DRAWS = 2000  # bootstrap draws: the 2.5% and 97.5% percentiles move by well under a tenth of the width
LEVEL = 0.95


@dataclass
class Evidence:
    """One metric of one contender (or baseline): per seed, per example, a numerator and a denominator."""

    metric: str
    ids: list[str]
    num: np.ndarray  # (seeds, examples)
    den: np.ndarray  # (seeds, examples)

    @classmethod
    def of_seeds(cls, per_seed: list[dict[str, Any]]) -> Evidence | None:
        """From lmlab.metrics.evidence records, one per seed, aligned on the examples every seed has."""
        per_seed = [p for p in per_seed if p]
        if not per_seed:
            return None
        others = [set(p["ids"]) for p in per_seed[1:]]
        ids = [i for i in per_seed[0]["ids"] if all(i in o for o in others)]
        num, den = [], []
        for p in per_seed:
            where = {i: k for k, i in enumerate(p["ids"])}
            num.append([p["num"][where[i]] for i in ids])
            den.append([p["den"][where[i]] for i in ids])
        return cls(per_seed[0]["metric"], ids, np.asarray(num, float), np.asarray(den, float))

    @property
    def seeds(self) -> int:
        return self.num.shape[0]

    @property
    def per_seed(self) -> np.ndarray:
        return _ratio(self.num.sum(1), self.den.sum(1))

    @property
    def value(self) -> float:
        return float(np.mean(self.per_seed))

    def on(self, ids: list[str]) -> Evidence:
        """The same evidence restricted to (and ordered by) `ids`."""
        where = {i: k for k, i in enumerate(self.ids)}
        cols = [where[i] for i in ids]
        return Evidence(self.metric, list(ids), self.num[:, cols], self.den[:, cols])


def _ratio(num: Any, den: Any) -> Any:
    return np.divide(num, den, out=np.zeros_like(np.asarray(num, float)), where=np.asarray(den) != 0)


@dataclass
class Interval:
    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _draws(evs: list[Evidence], draws: int, seed: int) -> list[np.ndarray]:
    """Bootstrap replicates of each evidence's value, all on the same example resamples (paired) and
    each on its own seed resamples."""
    n = len(evs[0].ids)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n, size=(draws, n))
    out = []
    for ev in evs:
        # sums over each resample of examples, per seed: (seeds, draws)
        num = ev.num[:, rows].sum(-1)
        den = ev.den[:, rows].sum(-1)
        per_seed = _ratio(num, den)
        if ev.seeds > 1:
            pick = rng.integers(0, ev.seeds, size=(draws, ev.seeds))
            out.append(per_seed[pick, np.arange(draws)[:, None]].mean(1))
        else:
            out.append(per_seed[0])
    return out


def _aligned(evs: list[Evidence]) -> list[Evidence]:
    others = [set(e.ids) for e in evs[1:]]
    common = [i for i in evs[0].ids if all(i in o for o in others)]
    return [e.on(common) for e in evs]


def interval(ev: Evidence, draws: int = DRAWS, seed: int = 0) -> Interval:
    (rep,) = _draws([ev], draws, seed)
    lo, hi = np.quantile(rep, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Interval(ev.value, float(lo), float(hi))


def difference(a: Evidence, b: Evidence, draws: int = DRAWS, seed: int = 0) -> Interval:
    """The interval of value(a) - value(b), paired over the examples both have."""
    a, b = _aligned([a, b])
    ra, rb = _draws([a, b], draws, seed)
    lo, hi = np.quantile(ra - rb, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Interval(a.value - b.value, float(lo), float(hi))


@dataclass
class Side:
    """One side of a claim: a contender's evidence and the trivial baseline it must beat."""

    name: str
    evidence: Evidence | None
    baseline: Evidence | None = None
    baseline_name: str = ""


@dataclass
class Judgement:
    verdict: str  # confirmed | contradicted | tie | undetermined | not measured
    difference: Interval | None = None  # a - b (in the metric's own direction, not flipped)
    against_baseline: dict[str, Interval] = field(default_factory=dict)  # side name -> value - baseline
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "difference": self.difference.to_dict() if self.difference else None,
            "against_baseline": {k: v.to_dict() for k, v in self.against_baseline.items()},
            "reason": self.reason,
        }


def learned(side: Side, higher_is_better: bool, seed: int = 0) -> tuple[bool, Interval | None]:
    """Does the side beat its baseline (the interval of value - baseline excludes zero, the right way)?
    A side without a baseline counts as having learned."""
    if side.evidence is None:
        return False, None
    if side.baseline is None:
        return True, None
    d = difference(side.evidence, side.baseline, seed=seed)
    return (d.low > 0) if higher_is_better else (d.high < 0), d


def judge(a: Side, b: Side, higher_is_better: bool, seed: int = 0) -> Judgement:
    """The verdict on "a is better than b" (see the module's docstring)."""
    if a.evidence is None or b.evidence is None:
        missing = a.name if a.evidence is None else b.name
        return Judgement("not measured", reason=f"{missing} has no per-example measurement")
    against: dict[str, Interval] = {}
    behind = []
    for side in (a, b):
        ok, d = learned(side, higher_is_better, seed)
        if d is not None:
            against[side.name] = d
        if not ok:
            assert d is not None
            behind.append(
                f"{side.name} is not above its baseline ({side.baseline_name}): "
                f"{side.evidence.value:.3g} vs {side.baseline.value:.3g}, "  # type: ignore[union-attr]
                f"difference {d.value:+.3g} [{d.low:+.3g}, {d.high:+.3g}]"
            )
    diff = difference(a.evidence, b.evidence, seed=seed)
    if behind:
        return Judgement("undetermined", diff, against, "; ".join(behind))
    if not diff.excludes_zero():
        return Judgement("tie", diff, against, "both beat their baselines; the 95% interval of the difference holds 0")
    better = diff.value > 0 if higher_is_better else diff.value < 0
    return Judgement("confirmed" if better else "contradicted", diff, against)
