"""The comparison lab (`lmlab compare`): every family, dense and MoE, on the same text under one budget.

settings.py    CompareConfig and the MoE variants (no torch)
contenders.py  the contenders on one shared body, and the FLOPs each step costs
measure.py     held-out bits per byte, pseudo-log-likelihood, masked-token accuracy, n-gram and unigram
               baselines, multiple-choice questions (any script), samples, fill-mask, routing specialisation
baselines.py   the trivial baseline of every metric, per example, on the contenders' own examples
stats.py       evidence per example, 95% intervals (bootstrap over examples and seeds), verdicts
unit.py        one (contender, seed) from pre-training to its last measurement, in its own process
lab.py         the plan, the shared parts, the units, resume by fingerprint
report.py      estimates, the claims as data, one table model for results.json / report.md /
               report.html (report.html.j2, Jinja2 with autoescape)
"""

from typing import Any

from lmlab.compare.settings import CompareConfig

__all__ = ["CompareConfig", "compare"]


def __getattr__(name: str) -> Any:  # the lab imports torch: only when it is used (`lmlab --help` stays quick)
    if name == "compare":
        from lmlab.compare.lab import compare

        return compare
    raise AttributeError(name)
