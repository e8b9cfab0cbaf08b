"""The comparison's results: aggregation over seeds, the claims table, and the three reports.

results.json holds every number (per seed and mean / standard deviation), the settings, the machine
and the versions; report.md the tables; report.html the same in one self-contained file (figures
inlined as base64 PNG) that opens offline.

A claim's verdict is computed from the numbers, never written in advance: the two sides' means are
compared, and a difference within two standard deviations (the larger of the two sides' standard
deviations over the seeds) is a tie.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.compare.unit import write_json

TIMING_KEYS = ("minutes", "train_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb", "unit_minutes", "elapsed")


def stat(values: list[float | None]) -> dict[str, Any] | None:
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


def aggregate(cc, plan, results, baselines, tasks, notes, machine) -> dict[str, Any]:
    contenders = []
    task_names = [t["name"] for t in tasks]
    for row in plan.rows:
        c, cfg = row["contender"], row["cfg"]
        runs = results[c.name]
        gen = cfg.spec.generative
        m: dict[str, Any] = {
            "bpb": stat([_get(r, "intrinsic", "bpb") for r in runs]) if gen else None,
            "pll_bpb": stat([_get(r, "intrinsic", "pll_bpb") for r in runs]) if not gen else None,
            "masked_accuracy": stat([_get(r, "intrinsic", "masked_accuracy") for r in runs]) if not gen else None,
            "unigram_accuracy": stat([_get(r, "intrinsic", "unigram_accuracy") for r in runs]) if not gen else None,
            "val_loss": stat([_get(r, "pretrain", "val", "loss") for r in runs]),
            "fewshot_k0_acc": stat([_get(r, "fewshot", "k0", "accuracy") for r in runs]),
            "fewshot_k0_acc_norm": stat([_get(r, "fewshot", "k0", "accuracy_norm") for r in runs]),
            "fewshot_k3_acc": stat([_get(r, "fewshot", "k3", "accuracy") for r in runs]),
            "fewshot_k3_acc_norm": stat([_get(r, "fewshot", "k3", "accuracy_norm") for r in runs]),
            "distinct_1": stat([_get(r, "samples", "distinct_1") for r in runs]) if gen else None,
            "distinct_2": stat([_get(r, "samples", "distinct_2") for r in runs]) if gen else None,
            "repetition_4": stat([_get(r, "samples", "repetition_4") for r in runs]) if gen else None,
            "train_tokens_per_s": stat([_get(r, "pretrain", "train_tokens_per_s") for r in runs]),
            "decode_tokens_per_s": stat([_get(r, "samples", "decode_tokens_per_s") for r in runs]) if gen else None,
            "peak_rss_mb": stat([r.get("peak_rss_mb") for r in runs]),
            "load_cv": stat([_get(r, "moe", "load_cv") for r in runs]) if c.moe else None,
            "dropped": stat([_get(r, "moe", "dropped") for r in runs]) if c.moe else None,
        }
        task_results: dict[str, Any] = {}
        for name in task_names:
            per = [_get(r, "tasks", name) for r in runs]
            if any(p and "skipped" in p for p in per):
                task_results[name] = {"skipped": next(p["skipped"] for p in per if p and "skipped" in p)}
                continue
            keys = sorted({k for p in per if p for k in p.get("metrics", {})})
            task_results[name] = {k: stat([_get(p, "metrics", k) for p in per]) for k in keys}
        routing = next((r.get("routing") for r in runs if r.get("routing")), None)
        contenders.append(
            {
                "name": c.name,
                "family": c.family,
                "moe": c.moe,
                "dense_twin": c.dense_twin,
                "objective": c.objective,
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
                "precision": sorted({_get(r, "pretrain", "precision") or "fp32" for r in runs}),
                "samples_seed0": _get(runs[0], "samples", "samples") if runs else None,
                "fill_mask_seed0": runs[0].get("fill_mask") if runs else None,
                "curves": [_get(r, "pretrain", "curve") for r in runs],
                "val_curves": [_get(r, "pretrain", "val_curve") for r in runs],
                "runs": runs,
            }
        )
    summary = {
        "settings": cc.to_dict(),
        "budget": {"kind": cc.budget, "value": plan.budget},
        "machine": machine,
        "baselines": {
            "kneser_ney_bpb": baselines["kneser_ney"]["bpb"],
            "unigram_token": baselines.get("unigram_token"),
            "unigram_accuracy": next(
                (c["metrics"]["unigram_accuracy"]["mean"] for c in contenders if c["metrics"]["unigram_accuracy"]), None
            ),
        },
        "tasks": tasks,
        "notes": notes,
        "contenders": contenders,
    }
    summary["claims"] = claims(summary)
    return summary


# ---- claims --------------------------------------------------------------------------------------------
def verdict(a: dict[str, Any] | None, b: dict[str, Any] | None, higher_is_better: bool) -> str:
    """'confirmed' if side a beats side b by more than two standard deviations, 'contradicted' if b beats
    a by that much, 'tie' otherwise."""
    if not a or not b:
        return "not measured"
    diff = a["mean"] - b["mean"]
    if not higher_is_better:
        diff = -diff
    margin = 2 * max(a["std"], b["std"])
    if diff > margin:
        return "confirmed"
    if diff < -margin:
        return "contradicted"
    return "tie"


def _fmt(s: dict[str, Any] | None, digits: int = 3) -> str:
    if not s:
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _best(rows: list[dict[str, Any]], key, higher: bool) -> dict[str, Any] | None:
    rows = [r for r in rows if key(r)]
    if not rows:
        return None
    return (max if higher else min)(rows, key=lambda r: key(r)["mean"])


# the metric an understanding task is judged by
UNDERSTANDING = {"classify": "accuracy", "ner": "f1", "qa": "f1"}
TASK_METRIC = {**UNDERSTANDING, "seq2seq": "chrf", "chat": "accuracy"}


def claims(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = summary["contenders"]
    dense = [r for r in rows if not r["moe"]]
    by = {r["name"]: r for r in rows}
    out = []

    def claim(text: str, a_name: str | None, a, b_name: str | None, b, higher: bool, metric: str, why: str = ""):
        out.append(
            {
                "claim": text,
                "metric": metric,
                "a": a_name,
                "a_value": a,
                "b": b_name,
                "b_value": b,
                "verdict": verdict(a, b, higher) if not why else "not measured",
                "why": why,
            }
        )

    def missing(text: str, metric: str, why: str) -> None:
        claim(text, None, None, None, None, True, metric, why)

    # understanding tasks favour the encoder: every classification, tagging and QA task, encoder vs the
    # best other family, one row each
    enc = by.get("encoder")
    understanding = [t for t in summary["tasks"] if t["task"] in UNDERSTANDING]
    for t in understanding:
        name, key = t["name"], UNDERSTANDING[t["task"]]
        text = "understanding tasks favour the encoder"
        if not (enc and key in enc["tasks"].get(name, {})):
            missing(text, f"{name} {key}", "the encoder was not compared or not fine-tuned on it")
            continue
        other = _best(
            [r for r in dense if r["family"] != "encoder"],
            lambda r, name=name, key=key: r["tasks"].get(name, {}).get(key),
            True,
        )
        claim(
            text,
            "encoder",
            enc["tasks"][name][key],
            other["name"] if other else None,
            other["tasks"][name][key] if other else None,
            True,
            f"{name} {key} (encoder vs the best other family)",
            "" if other else "no other family fine-tuned",
        )
    if not understanding:
        missing(
            "understanding tasks favour the encoder",
            "classification accuracy, tagging or QA F1",
            "needs the encoder and a classification, tagging or QA task",
        )
    # generation favours the decoder: held-out bits per byte, decoder vs the best other generative family
    dec = by.get("decoder")
    other = _best([r for r in dense if r["family"] not in ("decoder", "encoder")], lambda r: r["metrics"]["bpb"], False)
    if dec and other:
        claim(
            "generation favours the decoder",
            "decoder",
            dec["metrics"]["bpb"],
            other["name"],
            other["metrics"]["bpb"],
            False,
            "held-out bits per byte, second half given the first (lower is better)",
        )
    else:
        missing("generation favours the decoder", "bits per byte", "needs the decoder and another generative family")
    # encoder-decoders suit translation: chrF on the first seq2seq task
    s2s = next((t["name"] for t in summary["tasks"] if t["task"] == "seq2seq"), None)
    ed = by.get("encoder-decoder")
    if s2s and ed and "chrf" in ed["tasks"].get(s2s, {}):
        other = _best(
            [r for r in dense if r["family"] in ("decoder", "prefix-lm")],
            lambda r: r["tasks"].get(s2s, {}).get("chrf"),
            True,
        )
        claim(
            "encoder-decoders suit translation",
            "encoder-decoder",
            ed["tasks"][s2s]["chrf"],
            other["name"] if other else None,
            other["tasks"][s2s]["chrf"] if other else None,
            True,
            f"{s2s} chrF",
            "" if other else "no decoder or prefix-LM fine-tuned",
        )
    else:
        missing(
            "encoder-decoders suit translation",
            "seq2seq chrF",
            "needs the encoder-decoder and a seq2seq task (--tasks pairs.jsonl with source / target)",
        )
    # MoE reaches lower loss than dense at equal FLOPs
    moes = [r for r in rows if r["moe"] and r["dense_twin"] in by]
    if moes:
        for r in moes:
            twin = by[r["dense_twin"]]
            key = "bpb" if r["metrics"]["bpb"] else "pll_bpb"
            claim(
                "MoE reaches lower loss than dense at equal FLOPs",
                r["name"],
                r["metrics"][key],
                twin["name"],
                twin["metrics"][key],
                False,
                f"held-out {key.replace('_', ' ')} (lower is better)",
            )
    else:
        missing(
            "MoE reaches lower loss than dense at equal FLOPs",
            "bits per byte",
            "needs an MoE variant beside its dense twin (--moe)",
        )
    # load balancing lowers expert-load CV
    bal = [r for r in rows if r["moe"] == "switch"]
    nobal = {r["family"]: r for r in rows if r["moe"] == "switch-nobalance"}
    pairs = [(r, nobal[r["family"]]) for r in bal if r["family"] in nobal]
    if pairs:
        for a, b in pairs:
            claim(
                "load balancing lowers expert-load CV",
                a["name"],
                a["metrics"]["load_cv"],
                b["name"],
                b["metrics"]["load_cv"],
                False,
                "expert-load CV over the last quarter of training (lower is better)",
            )
    else:
        missing(
            "load balancing lowers expert-load CV",
            "expert-load CV",
            "needs --moe switch and switch-nobalance on the same family",
        )
    return out


# ---- reports ---------------------------------------------------------------------------------------------
def _strip_timings(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip_timings(v) for k, v in d.items() if k not in TIMING_KEYS}
    if isinstance(d, list):
        return [_strip_timings(v) for v in d]
    return d


def write_reports(out: Path, summary: dict[str, Any]) -> None:
    write_json(out / "results.json", summary)
    figures = _figures(summary)
    (out / "report.md").write_text(markdown(summary), encoding="utf-8")
    (out / "report.html").write_text(to_html(summary, figures), encoding="utf-8")


def claims_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in summary["claims"]:
        measured = (
            f"{c['a']} {_fmt(c['a_value'])} vs {c['b']} {_fmt(c['b_value'])}"
            if c["a_value"] and c["b_value"]
            else c["why"]
        )
        rows.append([c["claim"], c["metric"], measured, c["verdict"]])
    return rows


def tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) of every table in the reports."""
    rows = summary["contenders"]
    kn = summary["baselines"]["kneser_ney_bpb"]
    intrinsic = [
        [
            r["name"],
            _fmt(r["metrics"]["bpb"]),
            _fmt(r["metrics"]["pll_bpb"]) if r["metrics"]["pll_bpb"] else "n/a (not an encoder)",
            _fmt(r["metrics"]["masked_accuracy"]) if r["metrics"]["masked_accuracy"] else "n/a (not an encoder)",
            _fmt(r["metrics"]["unigram_accuracy"]) if r["metrics"]["unigram_accuracy"] else "-",
        ]
        for r in rows
    ]
    for row, r in zip(intrinsic, rows):
        if not r["metrics"]["bpb"]:
            row[1] = "n/a (an encoder cannot score text left to right)"
    out = [
        (
            "Intrinsic: held-out text",
            [
                "contender",
                "bits per byte (2nd half | 1st)",
                "encoder PLL bits per byte (not ranked)",
                "masked-token accuracy",
                "unigram baseline",
            ],
            intrinsic,
            f"Kneser-Ney trigram on the same second halves: {kn:.3f} bits per byte. The encoder's "
            "pseudo-log-likelihood sees both halves, so it answers an easier question and is never ranked "
            "against the others. The encoder-decoder is scored on a span as long as the second half, far "
            "longer than the spans of about 3 tokens its span corruption trains on.",
        )
    ]
    fs = [
        [
            r["name"],
            _fmt(r["metrics"]["fewshot_k0_acc"]),
            _fmt(r["metrics"]["fewshot_k0_acc_norm"]),
            _fmt(r["metrics"]["fewshot_k3_acc"]),
            _fmt(r["metrics"]["fewshot_k3_acc_norm"]),
            "pseudo-log-likelihood" if r["family"] == "encoder" else "log-likelihood",
        ]
        for r in rows
    ]
    out.append(
        (
            "Zero- and few-shot multiple choice (true continuation among 4; chance 0.25)",
            ["contender", "k=0 acc", "k=0 acc_norm", "k=3 acc", "k=3 acc_norm", "scored by"],
            fs,
            "lm-evaluation-harness's acc and acc_norm definitions (lmlab.fewshot); the questions are questions.jsonl.",
        )
    )
    for t in summary["tasks"]:
        keys = sorted({k for r in rows for k, v in r["tasks"].get(t["name"], {}).items() if isinstance(v, dict)})
        keys = [
            k for k in keys if k in ("accuracy", "macro_f1", "mcc", "f1", "exact_match", "bleu", "chrf", "loss")
        ] or keys[:4]
        body = []
        for r in rows:
            res = r["tasks"].get(t["name"], {})
            if "skipped" in res:
                body.append([r["name"]] + [f"skipped: {res['skipped']}"] + ["" for _ in keys[1:]])
            else:
                body.append([r["name"]] + [_fmt(res.get(k)) for k in keys])
        out.append(
            (
                f"Fine-tuned: {t['name']} ({t['task']})",
                ["contender"] + keys,
                body,
                f"train {t['train']}, eval {t['eval']}",
            )
        )
    gen = [
        [
            r["name"],
            _fmt(r["metrics"]["distinct_1"]),
            _fmt(r["metrics"]["distinct_2"]),
            _fmt(r["metrics"]["repetition_4"]),
        ]
        if r["metrics"]["distinct_1"]
        else [r["name"], "n/a (not generative)", "", ""]
        for r in rows
    ]
    out.append(
        (
            "Generation: sampled continuations (top-k 40, temperature 0.8)",
            ["contender", "distinct-1", "distinct-2", "4-gram repetition"],
            gen,
            "",
        )
    )
    cost = [
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
            _fmt(r["metrics"]["load_cv"]) if r["metrics"]["load_cv"] else "-",
            _fmt(r["metrics"]["dropped"]) if r["metrics"]["dropped"] else "-",
        ]
        for r in rows
    ]
    out.append(
        (
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
                "expert-load CV",
                "dropped",
            ],
            cost,
            "Training FLOPs as the T5 paper counts them: each stack for the tokens it processes. Peak RSS is the "
            "whole unit's process (pre-training, measurements and fine-tuning). Pre-trained in "
            + " and ".join(sorted({p for r in rows for p in r.get("precision", ["fp32"])}))
            + f" (--precision {summary['settings'].get('precision', 'auto')}).",
        )
    )
    routing = []
    for r in rows:
        for layer in (r["routing_seed0"] or {}).get("layers", []):
            routing.append(
                [
                    r["name"],
                    layer["layer"],
                    f"{layer['mi_token_bits']:.3f}",
                    f"{layer['mi_token_shuffled_bits']:.3f}",
                    f"{layer['mi_kind_bits']:.3f}",
                    f"{layer['mi_kind_shuffled_bits']:.3f}",
                ]
            )
    if routing:
        out.append(
            (
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
                "Mutual information between a token (or its kind: punctuation, function word, number, capitalised, "
                "other word) and the expert that took it, beside the same assignments shuffled across tokens.",
            )
        )
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# lmlab compare", ""]
    b = summary["budget"]
    lines.append(
        f"Budget: {b['value']:.3g} {b['kind']} per contender, {summary['settings']['seeds']} seeds; "
        f"machine: {summary['machine']['cpu']} ({', '.join(summary['machine']['flags']) or 'no AVX flags'}), "
        f"torch {summary['machine']['torch']}. Each cell: mean ± standard deviation over the seeds."
    )
    lines.append("")
    lines += ["## Claims", "", "| claim | metric | measured | verdict |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in claims_rows(summary)]
    for title, header, rows, note in tables(summary):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(x.replace("|", "\\|") for x in row) + " |" for row in rows]
        if note:
            lines += ["", note]
    lines += ["", "## Samples (seed 0)", ""]
    for r in summary["contenders"]:
        for s in (r["samples_seed0"] or [])[:2]:
            lines.append(f"- **{r['name']}**: {s['prompt']} **→** {s['continuation']}")
        for f in r["fill_mask_seed0"] or []:
            lines.append(
                f"- **{r['name']}** fill-mask: {f['text']} → " + ", ".join(f"{t} ({p:.2f})" for t, p in f["candidates"])
            )
    for n in summary["notes"]:
        lines += ["", f"Note: {n}"]
    return "\n".join(lines) + "\n"


def _figures(summary: dict[str, Any]) -> dict[str, str]:
    """The report's figures as base64 PNGs: training loss against training FLOPs, and per-task bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    figs: dict[str, str] = {}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for r in summary["contenders"]:
        curves = [c for c in r["val_curves"] if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        x = np.array([p[0] for p in curves[0][:n]]) * r["flops_per_step"]
        y = np.array([[p[1] for p in c[:n]] for c in curves])
        target = ax if r["family"] != "encoder" else ax2
        target.plot(x, y.mean(0), marker="o", ms=3, label=r["name"])
        if len(curves) > 1:
            target.fill_between(x, y.min(0), y.max(0), alpha=0.2)
    ax.axhline(summary["baselines"]["kneser_ney_bpb"], color="grey", ls="--", lw=1, label="Kneser-Ney trigram")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out bits per byte (2nd half | 1st)")
    ax.set_title("Generative families: validation bits per byte")
    ax.legend(fontsize=8)
    unigram = summary["baselines"].get("unigram_accuracy")
    if unigram is not None:
        ax2.axhline(unigram, color="grey", ls="--", lw=1, label="unigram baseline")
    ax2.set_xlabel("training FLOPs")
    ax2.set_ylabel("masked-token accuracy")
    ax2.set_title("Encoders: masked-token accuracy")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    figs["loss"] = _png(fig, plt)
    metrics = [
        ("bits per byte (2nd half | 1st)", lambda r: r["metrics"]["bpb"]),
        ("few-shot k=3 acc", lambda r: r["metrics"]["fewshot_k3_acc"]),
    ]
    for t in summary["tasks"]:
        key = TASK_METRIC[t["task"]]
        metrics.append((f"{t['name']} {key}", lambda r, n=t["name"], k=key: r["tasks"].get(n, {}).get(k)))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6))
    for ax, (title, get) in zip(np.atleast_1d(axes), metrics):
        names = [r["name"] for r in summary["contenders"] if get(r)]
        vals = [get(r) for r in summary["contenders"] if get(r)]
        ax.bar(range(len(vals)), [v["mean"] for v in vals], yerr=[v["std"] for v in vals], capsize=3, color="#4878a8")
        ax.set_xticks(range(len(vals)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    figs["bars"] = _png(fig, plt)
    return figs


def _png(fig, plt) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def to_html(summary: dict[str, Any], figures: dict[str, str]) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lmlab compare</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;font-size:.9em}"
        "th{background:#f1f3f6}.confirmed{background:#dff0d8}.contradicted{background:#f8d7da}.tie{background:#fcf3cf}"
        "p.note{color:#555;font-size:.85em}img{max-width:100%}",
        "</style></head><body><h1>lmlab compare</h1>",
    ]
    b, mach = summary["budget"], summary["machine"]
    parts.append(
        f"<p>Budget: {b['value']:.3g} {e(b['kind'])} per contender, {summary['settings']['seeds']} seeds. Machine: "
        f"{e(mach['cpu'])} ({e(', '.join(mach['flags']) or 'no AVX flags')}), torch {e(mach['torch'])}. "
        "Each cell: mean ± standard deviation over the seeds.</p>"
    )
    parts.append("<h2>Claims</h2><table><tr><th>claim</th><th>metric</th><th>measured</th><th>verdict</th></tr>")
    for row in claims_rows(summary):
        parts.append(
            "<tr>" + "".join(f"<td>{e(x)}</td>" for x in row[:3]) + f"<td class='{e(row[3])}'>{e(row[3])}</td></tr>"
        )
    parts.append("</table>")
    for key, alt in (
        ("loss", "training loss against training FLOPs per contender"),
        ("bars", "per-task bars with error bars"),
    ):
        if key in figures:
            parts.append(f"<img id='fig-{key}' alt='{e(alt)}' src='data:image/png;base64,{figures[key]}'>")
    for title, header, rows, note in tables(summary):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>" for row in rows]
        parts.append("</table>")
        if note:
            parts.append(f"<p class='note'>{e(note)}</p>")
    parts.append("<h2>Samples and fill-mask candidates (seed 0)</h2><ul>")
    for r in summary["contenders"]:
        for s in (r["samples_seed0"] or [])[:3]:
            parts.append(f"<li><b>{e(r['name'])}</b>: {e(s['prompt'])} <b>→</b> {e(s['continuation'])}</li>")
        for f in r["fill_mask_seed0"] or []:
            cands = ", ".join(f"{t} ({p:.2f})" for t, p in f["candidates"])
            parts.append(f"<li><b>{e(r['name'])}</b> fill-mask: {e(f['text'])} → {e(cands)}</li>")
    parts.append("</ul>")
    for r in summary["contenders"]:
        for layer in (r["routing_seed0"] or {}).get("layers", [])[:1]:
            parts.append(
                f"<h3>Experts of {e(r['name'])}, {e(layer['layer'])}</h3><table><tr><th>expert</th><th>share</th>"
                "<th>most frequent tokens</th><th>token kinds</th></tr>"
            )
            for x in layer["experts"]:
                kinds = ", ".join(f"{k} {v:.0%}" for k, v in list(x["kinds"].items())[:3])
                parts.append(
                    f"<tr><td>{x['expert']}</td><td>{x['share']:.1%}</td><td>{e(' '.join(x['top_tokens']))}</td><td>{e(kinds)}</td></tr>"
                )
            parts.append("</table>")
    for n in summary["notes"]:
        parts.append(f"<p class='note'>Note: {e(n)}</p>")
    parts.append(
        f"<details><summary>settings</summary><pre>{e(json.dumps(summary['settings'], indent=2))}</pre></details>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)
