"""The comparison's results: estimates with their intervals, the claims, and the three reports.

results.json holds every number (per seed, per example where a metric has examples, and each estimate
with its 95% interval), the settings, the machine and the versions; report.md and report.html render
one table model (`tables`), the HTML through a Jinja2 template with autoescape (report.html.j2; the
figures inlined as base64 PNG, so it opens offline).

Claims are data (CLAIMS): which metric, which contender against which, and what the metric's trivial
baseline is; their verdicts come from lmlab.compare.stats, never written in advance.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.compare.launch import write_json
from lmlab.compare.results import UnitResult
from lmlab.compare.stats import Evidence, Side, interval, judge, learned

TIMING_KEYS = (
    "minutes",
    "pretrain_share",
    "train_tokens_per_s",
    "decode_tokens_per_s",
    "peak_rss_mb",
    "unit_minutes",
    "elapsed",
    "stage_seconds",
    "ran_on",  # where a unit ran (a Ray node): not what it computed
)


# ---- metrics ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    key: str  # the evidence key: bpb, masked_accuracy, mc_k0, mc_k3, task:NAME, load_cv
    label: str
    higher_is_better: bool
    digits: int = 3


def metric_of(key: str, tasks: list[dict[str, Any]]) -> Metric:
    fixed = {
        "bpb": Metric("bpb", "held-out bits per byte (2nd half | 1st; lower is better)", False),
        "masked_accuracy": Metric("masked_accuracy", "masked-token accuracy", True),
        "mc_k0": Metric("mc_k0", "multiple choice k=0 accuracy", True),
        "mc_k3": Metric("mc_k3", "multiple choice k=3 accuracy", True),
        "load_cv": Metric("load_cv", "expert-load CV, last quarter of training (lower is better)", False),
    }
    if key in fixed:
        return fixed[key]
    name = key.split(":", 1)[1]
    task = next(t for t in tasks if t["name"] == name)
    score = TASK_METRIC[task["task"]]
    if task["task"] == "seq2seq":  # per pair, so an interval exists: the mean of sentence chrF
        return Metric(key, f"{name} sentence chrF", True, 1)
    return Metric(key, f"{name} {score}", True, 1 if score == "f1" and task["task"] == "qa" else 3)


# the metric a fine-tuned task is judged by, and the tasks that count as understanding
UNDERSTANDING = {"classify": "accuracy", "ner": "f1", "qa": "f1"}
TASK_METRIC = {**UNDERSTANDING, "seq2seq": "chrf", "chat": "accuracy"}


@dataclass
class Estimate:
    """A contender's value of one metric: mean over seeds, the 95% interval (seeds and examples), the
    standard deviation over seeds, and whether (and by how much) it beats the metric's baseline."""

    value: float
    low: float
    high: float
    std: float
    seeds: int
    examples: int
    ranked: bool = True  # False: the contender was not trained for this question (shown, never compared)
    beats_baseline: bool | None = None  # None: the metric has no baseline
    baseline_difference: dict[str, float] | None = None

    def cell(self, digits: int = 3) -> str:
        text = f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        if not self.ranked:
            return text + " (not ranked)"
        if self.beats_baseline is False:
            return text + " (not above baseline)"
        return text


def stat(values: list[float | None]) -> dict[str, Any] | None:
    """Mean and standard deviation over seeds, for what has no per-example evidence (cost, samples)."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, "n": len(vals)}


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _fmt(s: dict[str, Any] | None, digits: int = 3) -> str:
    if not s:
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


# ---- claims as data -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """One published claim: `a` is better than `b` on `metric`.

    metric: an evidence key, or "understanding" (every classification, tagging and QA task, one row
        each), "seq2seq" (the first seq2seq task), "intrinsic" (bpb for language models, masked-token
        accuracy for encoders)
    a: "family:F" (the dense contender of family F with its default objective), "moe" (every MoE
        contender), "variant:V" (the MoE variant V)
    b: "best:F1,F2" (the best ranked dense contender of those families), "twin" (a's dense twin),
        "variant:V"
    """

    text: str
    metric: str
    a: str
    b: str
    needs: str


CLAIMS = (
    Claim(
        "understanding tasks favour the encoder",
        "understanding",
        "family:encoder",
        "best:decoder,encoder-decoder,prefix-lm",
        "needs the encoder and a classification, tagging or QA task",
    ),
    Claim(
        "generation favours the decoder",
        "bpb",
        "family:decoder",
        "best:encoder-decoder,prefix-lm",
        "needs the decoder and another generative family trained as a language model",
    ),
    Claim(
        "encoder-decoders suit translation",
        "seq2seq",
        "family:encoder-decoder",
        "best:decoder,prefix-lm",
        "needs the encoder-decoder and a seq2seq task (--tasks pairs.jsonl with source / target)",
    ),
    Claim(
        "MoE reaches lower loss than dense at equal FLOPs",
        "intrinsic",
        "moe",
        "twin",
        "needs an MoE variant beside its dense twin (--moe)",
    ),
    Claim(
        "load balancing lowers expert-load CV",
        "load_cv",
        "variant:switch",
        "variant:switch-nobalance",
        "needs --moe switch and switch-nobalance on the same family",
    ),
)


@dataclass
class ClaimResult:
    claim: str
    metric: str
    a: str | None
    b: str | None
    a_value: dict[str, Any] | None
    b_value: dict[str, Any] | None
    verdict: str
    why: str = ""
    difference: dict[str, float] | None = None
    against_baseline: dict[str, dict[str, float]] = field(default_factory=dict)


class Evidences:
    """Every contender's evidence and every metric's baselines, as stats.Evidence, with the estimates."""

    def __init__(self, contenders: list[dict[str, Any]], baselines: dict[str, dict[str, Any]], tasks) -> None:
        self.tasks = tasks
        self.by_name = {c["name"]: c for c in contenders}
        self.ev: dict[str, dict[str, Evidence]] = {}
        for c in contenders:
            keys = sorted({k for r in c["runs"] for k in (r.get("evidence") or {})})
            self.ev[c["name"]] = {
                k: e for k in keys if (e := Evidence.of_seeds([_get(r, "evidence", k) for r in c["runs"]])) is not None
            }
        self.baselines: dict[str, tuple[str, Evidence]] = {}
        for key, named in baselines.items():
            evs = {n: Evidence.of_seeds([e]) for n, e in named.items() if e}
            if evs:  # the strongest baseline is the one to beat
                m = metric_of(key, tasks)
                best = (max if m.higher_is_better else min)(evs, key=lambda n: evs[n].value)  # type: ignore[union-attr]
                self.baselines[key] = (best, evs[best])  # type: ignore[assignment]

    def ranked(self, name: str, key: str) -> bool:
        c = self.by_name[name]
        return key != "bpb" or c["language_model"]

    def side(self, name: str, key: str) -> Side:
        base = self.baselines.get(key)
        return Side(name, self.ev.get(name, {}).get(key), base[1] if base else None, base[0] if base else "")

    def estimate(self, name: str, key: str) -> Estimate | None:
        ev = self.ev.get(name, {}).get(key)
        if ev is None:
            return None
        iv = interval(ev)
        sd = float(np.std(ev.per_seed, ddof=1)) if ev.seeds > 1 else 0.0
        est = Estimate(iv.value, iv.low, iv.high, sd, ev.seeds, len(ev.ids))
        est.ranked = self.ranked(name, key)
        if key in self.baselines:
            ok, d = learned(self.side(name, key), metric_of(key, self.tasks).higher_is_better)
            est.beats_baseline = ok
            est.baseline_difference = d.to_dict() if d else None
        return est


def _select(spec: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kind, _, arg = spec.partition(":")
    if kind == "family":
        return [r for r in rows if r["family"] == arg and not r["moe"] and r["default_objective"]]
    if kind == "moe":
        return [r for r in rows if r["moe"]]
    if kind == "variant":
        return [r for r in rows if r["moe"] == arg]
    raise ValueError(spec)


def _keys(claim: Claim, tasks: list[dict[str, Any]]) -> list[str]:
    if claim.metric == "understanding":
        return [f"task:{t['name']}" for t in tasks if t["task"] in UNDERSTANDING]
    if claim.metric == "seq2seq":
        return [f"task:{t['name']}" for t in tasks if t["task"] == "seq2seq"][:1]
    return [claim.metric]


def claims(summary: dict[str, Any], evidences: Evidences) -> list[ClaimResult]:
    rows, tasks = summary["contenders"], summary["tasks"]
    out: list[ClaimResult] = []
    for claim in CLAIMS:
        keys = _keys(claim, tasks)
        pairs = []  # (key, a row, b row or None)
        for a in _select(claim.a, rows):
            for key in keys:
                k = key
                if claim.metric == "intrinsic":
                    k = "masked_accuracy" if a["family"] == "encoder" else "bpb"
                if k == "bpb" and not a["language_model"]:
                    continue
                if claim.b == "twin":
                    b = next((r for r in rows if r["name"] == a["dense_twin"]), None)
                elif claim.b.startswith("variant:"):
                    b = next((r for r in _select(claim.b, rows) if r["family"] == a["family"]), None)
                else:
                    families = claim.b.split(":", 1)[1].split(",")
                    m = metric_of(k, tasks)
                    pool = [
                        r
                        for r in rows
                        if r["family"] in families
                        and not r["moe"]
                        and k in evidences.ev.get(r["name"], {})
                        and evidences.ranked(r["name"], k)
                    ]
                    b = (max if m.higher_is_better else min)(
                        pool, key=lambda r: evidences.ev[r["name"]][k].value, default=None
                    )
                pairs.append((k, a, b))
        if not pairs:
            out.append(
                ClaimResult(claim.text, _label(claim, tasks), None, None, None, None, "not measured", claim.needs)
            )
            continue
        for k, a, b in pairs:
            m = metric_of(k, tasks)
            label = m.label + (" (the best other family)" if claim.b.startswith("best:") else "")
            if b is None:
                out.append(
                    ClaimResult(
                        claim.text, label, a["name"], None, None, None, "not measured", "no contender to compare with"
                    )
                )
                continue
            j = judge(evidences.side(a["name"], k), evidences.side(b["name"], k), m.higher_is_better)
            ea, eb = evidences.estimate(a["name"], k), evidences.estimate(b["name"], k)
            out.append(
                ClaimResult(
                    claim.text,
                    label,
                    a["name"],
                    b["name"],
                    asdict(ea) if ea else None,
                    asdict(eb) if eb else None,
                    j.verdict,
                    j.reason,
                    j.difference.to_dict() if j.difference else None,
                    {n: v.to_dict() for n, v in j.against_baseline.items()},
                )
            )
    return out


def _label(claim: Claim, tasks: list[dict[str, Any]]) -> str:
    return {
        "understanding": "classification accuracy, tagging or QA F1",
        "seq2seq": "seq2seq chrF",
        "intrinsic": "held-out bits per byte or masked-token accuracy",
    }.get(claim.metric) or metric_of(claim.metric, tasks).label


# ---- aggregation --------------------------------------------------------------------------------------------
def aggregate(cc, plan, results: dict[str, list[UnitResult]], baselines, tasks, notes, machine) -> dict[str, Any]:
    contenders = []
    task_names = [t["name"] for t in tasks]
    for row in plan.rows:
        c, cfg = row["contender"], row["cfg"]
        runs = results[c.name]
        gen = cfg.spec.generative
        m: dict[str, Any] = {
            "pll_bpb": stat([r.intrinsic.pll_bpb for r in runs]) if not gen else None,
            "val_loss": stat([r.pretrain.val.get("loss") for r in runs]),
            "fewshot_k0_acc_norm": stat([r.fewshot["k0"].accuracy_norm for r in runs if "k0" in r.fewshot]),
            "fewshot_k3_acc_norm": stat([r.fewshot["k3"].accuracy_norm for r in runs if "k3" in r.fewshot]),
            "distinct_1": stat([r.samples.distinct_1 for r in runs if r.samples]) if gen else None,
            "distinct_2": stat([r.samples.distinct_2 for r in runs if r.samples]) if gen else None,
            "repetition_4": stat([r.samples.repetition_4 for r in runs if r.samples]) if gen else None,
            "train_tokens_per_s": stat([r.pretrain.train_tokens_per_s for r in runs]),
            "decode_tokens_per_s": stat([r.samples.decode_tokens_per_s for r in runs if r.samples]) if gen else None,
            "peak_rss_mb": stat([r.peak_rss_mb for r in runs]),
            "unit_minutes": stat([r.unit_minutes for r in runs]),
            "pretrain_share": stat(
                [
                    r.stage_seconds["pretrain"] / (60 * r.unit_minutes)
                    if r.stage_seconds.get("pretrain") and r.unit_minutes
                    else None
                    for r in runs
                ]
            ),
            "load_cv": stat([r.moe.load_cv for r in runs if r.moe]) if c.moe else None,
            "dropped": stat([r.moe.dropped for r in runs if r.moe]) if c.moe else None,
        }
        task_results: dict[str, Any] = {}
        for name in task_names:
            per = [r.tasks[name] for r in runs if name in r.tasks]
            skipped = next((p.skipped for p in per if p.skipped), None)
            if skipped:
                task_results[name] = {"skipped": skipped}
                continue
            keys = sorted({k for p in per for k in p.metrics})
            task_results[name] = {k: stat([p.metrics.get(k) for p in per]) for k in keys}
        routing = next((r.routing for r in runs if r.routing), None)
        contenders.append(
            {
                "name": c.name,
                "family": c.family,
                "moe": c.moe,
                "dense_twin": c.dense_twin,
                "objective": c.objective,
                "default_objective": c.name == c.family or bool(c.moe),
                "language_model": c.language_model,
                "params": row["params"],
                "active_params": row["active_params"],
                "non_embedding_params": row["non_embedding_params"],
                "steps": row["steps"],
                "flops_per_step": row["flops_per_step"],
                "train_flops": (row["steps"] or 0) * row["flops_per_step"],
                "tokens_seen": (row["steps"] or 0) * row["tokens_per_step"],
                "flops_per_token": row["flops_per_step"] / row["tokens_per_step"],
                "metrics": m,
                "tasks": task_results,
                "routing_seed0": routing,
                "precision": sorted({r.pretrain.precision or "fp32" for r in runs}),
                "compiled": any(r.pretrain.compiled for r in runs),
                "samples_seed0": runs[0].samples.samples if runs and runs[0].samples else None,
                "fill_mask_seed0": runs[0].fill_mask if runs else None,
                "curves": [r.pretrain.curve for r in runs],
                "val_curves": [r.pretrain.val_curve for r in runs],
                "runs": [r.to_dict() for r in runs],
            }
        )
    evidences = Evidences(contenders, baselines["evidence"], tasks)
    for c in contenders:
        c["estimates"] = {k: asdict(e) for k in evidences.ev[c["name"]] if (e := evidences.estimate(c["name"], k))}
    summary: dict[str, Any] = {
        "settings": cc.to_dict(),
        "budget": {"kind": cc.budget, "value": plan.budget},
        "machine": machine,
        "baselines": {
            key: {"name": name, "value": ev.value, "examples": len(ev.ids)}
            for key, (name, ev) in evidences.baselines.items()
        },
        "baseline_evidence": baselines["evidence"],
        "unigram_token": baselines.get("unigram_token"),
        "tasks": tasks,
        "notes": notes,
        "contenders": contenders,
    }
    summary["claims"] = [asdict(c) for c in claims(summary, evidences)]
    return summary


# ---- the table model -----------------------------------------------------------------------------------------
@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    verdict_column: int | None = None  # a column whose cells name a verdict (styled in HTML)


def _strip_timings(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip_timings(v) for k, v in d.items() if k not in TIMING_KEYS}
    if isinstance(d, list):
        return [_strip_timings(v) for v in d]
    return d


def _est(c: dict[str, Any], key: str, digits: int = 3) -> str:
    e = c.get("estimates", {}).get(key)
    return Estimate(**e).cell(digits) if e else "-"


def claims_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in summary["claims"]:
        if c["a_value"] and c["b_value"]:
            d = c["difference"]
            measured = (
                f"{c['a']} {Estimate(**c['a_value']).cell()} vs {c['b']} {Estimate(**c['b_value']).cell()}; "
                f"difference {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            )
        else:
            measured = c["why"]
        verdict = c["verdict"] + (f": {c['why']}" if c["verdict"] == "undetermined" else "")
        rows.append([c["claim"], c["metric"], measured, verdict])
    return rows


def tables(summary: dict[str, Any]) -> list[Table]:
    rows, base = summary["contenders"], summary["baselines"]
    out = [
        Table(
            "Claims",
            ["claim", "metric", "measured (95% interval)", "verdict"],
            claims_rows(summary),
            "confirmed / contradicted: both contenders beat their trivial baseline and the 95% interval of the "
            "difference excludes 0; tie: both beat it, no difference shown; undetermined: a contender is not "
            "above its baseline. Intervals: a bootstrap over the evaluation examples (paired: the same for every "
            "contender) and the seeds.",
            verdict_column=3,
        )
    ]
    out.append(
        Table(
            "Trivial baselines",
            ["metric", "baseline", "value", "examples"],
            [
                [metric_of(k, summary["tasks"]).label, b["name"], f"{b['value']:.3f}", str(b["examples"])]
                for k, b in base.items()
            ],
            "A contender whose interval against its baseline does not exclude 0 is marked (not above baseline).",
        )
    )
    intrinsic = []
    for r in rows:
        if r["family"] == "encoder":
            bpb = "n/a (an encoder cannot score text left to right)"
        else:
            bpb = _est(r, "bpb")
            if not r["language_model"]:
                bpb += f": trained for {r['objective']}, not for continuing text"
        intrinsic.append(
            [
                r["name"],
                r["objective"],
                bpb,
                _fmt(r["metrics"]["pll_bpb"]) if r["metrics"]["pll_bpb"] else "n/a (not an encoder)",
                _est(r, "masked_accuracy") if r["family"] == "encoder" else "n/a (not an encoder)",
            ]
        )
    kn = base.get("bpb", {}).get("value")
    uni = base.get("masked_accuracy", {}).get("value")
    out.append(
        Table(
            "Intrinsic: held-out text",
            [
                "contender",
                "trained with",
                "bits per byte (2nd half | 1st)",
                "encoder PLL bits per byte (not ranked)",
                "masked-token accuracy",
            ],
            intrinsic,
            (f"Kneser-Ney trigram on the same second halves: {kn:.3f} bits per byte. " if kn is not None else "")
            + (f"Unigram baseline of masked-token accuracy: {uni:.3f}. " if uni is not None else "")
            + "Only contenders trained to continue text (clm, prefix-lm, prefix-seq2seq) are ranked on bits per "
            "byte; the encoder's pseudo-log-likelihood sees both halves, an easier question, and is never ranked.",
        )
    )
    chance = base.get("mc_k0", {}).get("value", 0.25)
    out.append(
        Table(
            f"Zero- and few-shot multiple choice (true continuation among 4; chance {chance:.2f})",
            ["contender", "k=0 acc", "k=0 acc_norm", "k=3 acc", "k=3 acc_norm", "scored by"],
            [
                [
                    r["name"],
                    _est(r, "mc_k0"),
                    _fmt(r["metrics"]["fewshot_k0_acc_norm"]),
                    _est(r, "mc_k3"),
                    _fmt(r["metrics"]["fewshot_k3_acc_norm"]),
                    "pseudo-log-likelihood" if r["family"] == "encoder" else "log-likelihood",
                ]
                for r in rows
            ],
            "lm-evaluation-harness's acc and acc_norm definitions (lmlab.fewshot); the questions are questions.jsonl.",
        )
    )
    for t in summary["tasks"]:
        key, score = f"task:{t['name']}", TASK_METRIC[t["task"]]
        others = sorted({k for r in rows for k, v in r["tasks"].get(t["name"], {}).items() if isinstance(v, dict)})
        others = [
            k for k in others if k in ("accuracy", "macro_f1", "mcc", "f1", "exact_match", "bleu", "chrf", "loss")
        ]
        others = [k for k in others if k != score]
        body = []
        for r in rows:
            res = r["tasks"].get(t["name"], {})
            if "skipped" in res:
                body.append([r["name"], f"skipped: {res['skipped']}"] + ["" for _ in others])
            else:
                main = (
                    _est(r, key, metric_of(key, summary["tasks"]).digits)
                    if key in r.get("estimates", {})
                    else _fmt(res.get(score))
                )
                body.append([r["name"], main] + [_fmt(res.get(k)) for k in others])
        b = base.get(key)
        out.append(
            Table(
                f"Fine-tuned: {t['name']} ({t['task']})",
                ["contender", f"{score} (95% interval)"] + [f"{k} (mean ± sd)" for k in others],
                body,
                (f"Baseline: {b['name']}, {score} {b['value']:.3f}. " if b else "")
                + f"train {t['train']}, eval {t['eval']}",
            )
        )
    out.append(
        Table(
            "Generation: sampled continuations (top-k 40, temperature 0.8)",
            ["contender", "distinct-1", "distinct-2", "4-gram repetition"],
            [
                [
                    r["name"],
                    _fmt(r["metrics"]["distinct_1"]),
                    _fmt(r["metrics"]["distinct_2"]),
                    _fmt(r["metrics"]["repetition_4"]),
                ]
                if r["metrics"]["distinct_1"]
                else [r["name"], "n/a (not generative)", "", ""]
                for r in rows
            ],
        )
    )
    out.append(
        Table(
            "Cost",
            [
                "contender",
                "params",
                "active",
                "steps",
                "tokens seen",
                "training FLOPs",
                "FLOPs/token",
                "train tokens/s",
                "decode tokens/s",
                "peak RSS MB",
                "unit minutes (pre-training share)",
                "expert-load CV",
                "dropped",
            ],
            [
                [
                    r["name"],
                    f"{r['params'] / 1e6:.2f}M",
                    f"{r['active_params'] / 1e6:.2f}M",
                    f"{r['steps']}",
                    f"{r['tokens_seen']:,}",
                    f"{r['train_flops']:.3g}",
                    f"{r['flops_per_token']:.3g}",
                    _fmt(r["metrics"]["train_tokens_per_s"], 0),
                    _fmt(r["metrics"]["decode_tokens_per_s"], 0) if r["metrics"]["decode_tokens_per_s"] else "n/a",
                    _fmt(r["metrics"]["peak_rss_mb"], 0),
                    (f"{r['metrics']['unit_minutes']['mean']:.2f}" if r["metrics"]["unit_minutes"] else "-")
                    + (f" ({r['metrics']['pretrain_share']['mean']:.0%})" if r["metrics"]["pretrain_share"] else ""),
                    _fmt(r["metrics"]["load_cv"]) if r["metrics"]["load_cv"] else "-",
                    _fmt(r["metrics"]["dropped"]) if r["metrics"]["dropped"] else "-",
                ]
                for r in rows
            ],
            "Training FLOPs as the T5 paper counts them: each stack for the tokens it processes. Peak RSS is the "
            "whole unit's process (pre-training, measurements and fine-tuning). Pre-trained in "
            + " and ".join(sorted({p for r in rows for p in r.get("precision", ["fp32"])}))
            + f" (--precision {summary['settings'].get('precision', 'auto')}); "
            + (
                "torch.compile'd: " + ", ".join(r["name"] for r in rows if r.get("compiled"))
                if any(r.get("compiled") for r in rows)
                else "eager"
            )
            + f" (--compile {summary['settings'].get('compile', 'off')}). Cost cells: mean ± sd over seeds.",
        )
    )
    routing = [
        [
            r["name"],
            str(layer["layer"]),
            f"{layer['mi_token_bits']:.3f}",
            f"{layer['mi_token_shuffled_bits']:.3f}",
            f"{layer['mi_kind_bits']:.3f}",
            f"{layer['mi_kind_shuffled_bits']:.3f}",
        ]
        for r in rows
        for layer in (r["routing_seed0"] or {}).get("layers", [])
    ]
    if routing:
        out.append(
            Table(
                "Routing: does the expert follow the token? (seed 0)",
                [
                    "contender",
                    "layer",
                    "I(token; expert) bits",
                    "shuffled control",
                    "I(kind; expert) bits",
                    "shuffled control",
                ],
                routing,
                "Mutual information between a token (or its kind: punctuation, number, frequent word, capitalised, "
                "other) and the expert that took it, beside the same assignments shuffled across tokens.",
            )
        )
    return out


def _heading(summary: dict[str, Any]) -> str:
    b, mach = summary["budget"], summary["machine"]
    return (
        f"Budget: {b['value']:.3g} {b['kind']} per contender, {summary['settings']['seeds']} seeds; machine: "
        f"{mach['cpu']} ({', '.join(mach['flags']) or 'no AVX flags'}), torch {mach['torch']}. Measured cells: "
        "mean over the seeds [95% interval over seeds and evaluation examples]."
        + (
            " A --quick preview: fewer seeds and examples, so more verdicts stay undetermined."
            if summary["settings"].get("quick")
            else ""
        )
    )


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# lmlab compare", "", _heading(summary)]
    for t in tables(summary):
        lines += ["", f"## {t.title}", "", "| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(x.replace("|", "\\|") for x in row) + " |" for row in t.rows]
        if t.note:
            lines += ["", t.note]
    lines += ["", "## Samples (seed 0)", ""]
    for s in samples(summary):
        lines.append(f"- **{s['name']}** {s['kind']}: {s['text']} **→** {s['continuation']}")
    for n in summary["notes"]:
        lines += ["", f"Note: {n}"]
    return "\n".join(lines) + "\n"


def samples(summary: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for r in summary["contenders"]:
        for s in (r["samples_seed0"] or [])[:2]:
            out.append({"name": r["name"], "kind": "", "text": s["prompt"], "continuation": s["continuation"]})
        for f in r["fill_mask_seed0"] or []:
            cands = ", ".join(f"{t} ({p:.2f})" for t, p in f["candidates"])
            out.append({"name": r["name"], "kind": "fill-mask", "text": f["text"], "continuation": cands})
    return out


def write_reports(out: Path, summary: dict[str, Any]) -> None:
    write_json(out / "results.json", summary)
    (out / "report.md").write_text(markdown(summary), encoding="utf-8")
    (out / "report.html").write_text(to_html(summary, _figures(summary)), encoding="utf-8")


def to_html(summary: dict[str, Any], figures: dict[str, str]) -> str:
    from importlib import resources

    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string((resources.files("lmlab.compare") / "report.html.j2").read_text(encoding="utf-8"))
    experts = [
        {"name": r["name"], "layer": layer["layer"], "experts": layer["experts"]}
        for r in summary["contenders"]
        for layer in (r["routing_seed0"] or {}).get("layers", [])[:1]
    ]
    return template.render(
        heading=_heading(summary),
        tables=tables(summary),
        figures=[{"id": k, "alt": FIGURE_ALT[k], "data": v} for k, v in figures.items()],
        samples=samples(summary),
        experts=experts,
        notes=summary["notes"],
        settings=json.dumps(summary["settings"], indent=2),
    )


# ---- figures ------------------------------------------------------------------------------------------------
FIGURE_ALT = {
    "curves": "held-out bits per byte and masked-token accuracy against training FLOPs, with their baselines",
    "bars": "each ranked metric per contender with its 95% interval and its baseline",
}


def _figures(summary: dict[str, Any]) -> dict[str, str]:
    """The report's figures as base64 PNGs: validation curves against training FLOPs (only for the metric a
    contender was trained for) with the baselines, and per-metric bars with 95% intervals."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    figs: dict[str, str] = {}
    base = summary["baselines"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    skipped = []
    for r in summary["contenders"]:
        curves = [c for c in r["val_curves"] if c]
        if not curves:
            continue
        if r["family"] != "encoder" and not r["language_model"]:
            skipped.append(r["name"])  # not trained to continue text: its bits per byte is no learning curve
            continue
        n = min(len(c) for c in curves)
        x = np.array([p[0] for p in curves[0][:n]]) * r["flops_per_step"]
        y = np.array([[p[1] for p in c[:n]] for c in curves])
        target = ax if r["family"] != "encoder" else ax2
        target.plot(x, y.mean(0), marker="o", ms=3, label=r["name"])
        if len(curves) > 1:
            target.fill_between(x, y.min(0), y.max(0), alpha=0.2)
    if "bpb" in base:
        ax.axhline(base["bpb"]["value"], color="grey", ls="--", lw=1, label=base["bpb"]["name"])
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out bits per byte (2nd half | 1st)")
    title = "Language models: validation bits per byte"
    ax.set_title(title + (f"\n(not drawn: {', '.join(skipped)}, not trained for it)" if skipped else ""), fontsize=10)
    ax.legend(fontsize=8)
    if "masked_accuracy" in base:
        ax2.axhline(base["masked_accuracy"]["value"], color="grey", ls="--", lw=1, label="unigram baseline")
    ax2.set_xlabel("training FLOPs")
    ax2.set_ylabel("masked-token accuracy")
    ax2.set_title("Encoders: masked-token accuracy", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    figs["curves"] = _png(fig, plt)
    keys = ["bpb", "mc_k0", "mc_k3"] + [f"task:{t['name']}" for t in summary["tasks"] if t["task"] in TASK_METRIC]
    panels = []
    for key in keys:
        pts = [
            (r["name"], Estimate(**r["estimates"][key]))
            for r in summary["contenders"]
            if key in r.get("estimates", {}) and r["estimates"][key]["ranked"]
        ]
        if pts:
            panels.append((key, pts))
    if panels:
        cols = min(4, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.6 * rows), squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.axis("off")
        for ax, (key, pts) in zip(axes.flat, panels):
            vals = [e.value for _, e in pts]
            err = [[e.value - e.low for _, e in pts], [e.high - e.value for _, e in pts]]
            colors = ["#4878a8" if e.beats_baseline is not False else "#c0c0c0" for _, e in pts]
            ax.bar(range(len(pts)), vals, yerr=err, capsize=3, color=colors)
            if key in base:
                ax.axhline(base[key]["value"], color="#b03030", ls="--", lw=1, label=base[key]["name"])
                ax.legend(fontsize=7)
            ax.set_xticks(range(len(pts)), [n for n, _ in pts], rotation=35, ha="right", fontsize=8)
            ax.set_title(metric_of(key, summary["tasks"]).label.replace(" (", "\n("), fontsize=9)
        fig.suptitle("95% intervals; grey: not above the baseline (red)", fontsize=9)
        fig.tight_layout()
        figs["bars"] = _png(fig, plt)
    return figs


def _png(fig, plt) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()
