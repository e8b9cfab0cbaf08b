"""The sweep behind `lmlab compare`'s default body: held-out bits per byte of a decoder at one FLOPs budget
for each setting, Chinchilla-style (at a fixed compute, which width, depth, vocabulary, batch and
learning rate give the lowest loss).

Each point is a one-seed `lmlab compare --families decoder --moe none` with no fine-tuning tasks at the
budget, on the built-in corpus; the held-out bits per byte (128 windows, with its 95% interval) is
printed beside the Kneser-Ney trigram's on the same windows (which moves with the vocabulary), with the
steps, tokens seen and parameters. Stages: learning rate x batch at the current body; then width x
depth at the best of those; then the vocabulary at the best of all. Settings are the CompareConfig's
fields, so any of them can be swept with --grid.

    python bench/compare_sweep.py --budget 3.2e12 --out runs/sweep
    python bench/compare_sweep.py --budget 3.2e12 --grid '{"lr": [2e-3, 4e-3], "d_model": [96, 128]}'
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from lmlab.compare import CompareConfig, compare
from lmlab.compare.lab import machine

STAGES = [
    {"lr": [2e-3, 4e-3, 8e-3], "batch_size": [16, 32]},
    {"d_model": [96, 128, 192], "n_layers": [2, 4]},
    {"vocab_size": [2048, 4096, 8192]},
]


def point(out: Path, budget: float, settings: dict) -> dict:
    name = "-".join(f"{k}={v}" for k, v in sorted(settings.items()))
    folder = out / name
    s = dict(settings)
    if "d_model" in s:
        s["d_ff"] = 4 * s["d_model"]
        s["n_heads"] = max(2, s["d_model"] // 32)
    cc = CompareConfig(
        out=str(folder),
        families=["decoder"],
        moe=["none"],
        seeds=1,
        tasks=[],
        questions=8,
        budget="flops",
        budget_value=budget,
        **s,
    )
    t = time.perf_counter()
    summary = compare(cc)
    (c,) = summary["contenders"]
    e = c["estimates"]["bpb"]
    return {
        "settings": settings,
        "bpb": e["value"],
        "low": e["low"],
        "high": e["high"],
        "kneser_ney": summary["baselines"]["bpb"]["value"],
        "steps": c["steps"],
        "tokens": c["tokens_seen"],
        "params": c["params"],
        "minutes": (time.perf_counter() - t) / 60,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=3.2e12, help="training FLOPs of every point")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--grid", help="one stage as JSON (field -> values) instead of the three default stages")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    m = machine()
    print(f"# {m['cpu']} ({', '.join(m['flags'])}), {m['threads']} threads, torch {m['torch']}")
    print(f"# python bench/compare_sweep.py {' '.join(sys.argv[1:])}")
    print("| settings | bits per byte [95%] | Kneser-Ney | steps | tokens | params | minutes |")
    print("|---|---|---|---|---|---|---|")
    best: dict = {}
    rows = []
    for stage in [json.loads(a.grid)] if a.grid else STAGES:
        keys = list(stage)
        results = []
        for values in itertools.product(*(stage[k] for k in keys)):
            r = point(out, a.budget, {**best, **dict(zip(keys, values))})
            results.append(r)
            rows.append(r)
            s = ", ".join(f"{k} {v}" for k, v in r["settings"].items())
            print(
                f"| {s} | {r['bpb']:.3f} [{r['low']:.3f}, {r['high']:.3f}] | {r['kneser_ney']:.3f} | {r['steps']} | "
                f"{r['tokens']:,} | {r['params'] / 1e6:.2f}M | {r['minutes']:.1f} |",
                flush=True,
            )
        best = min(results, key=lambda r: r["bpb"])["settings"]
        print(f"| best so far: {best} | | | | | | |", flush=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
