"""`lmlab compare` one unit at a time against its units side by side on Ray, on this machine.

Runs the same comparison three times, one after another (never two at once), each in a fresh folder:
  here   : one unit at a time, each computing with every CPU (the default without --ray)
  here-1 : one unit at a time, each with one thread (--unit-cpus 1)
  ray-1  : Ray on this machine, one CPU per unit, so as many units at once as there are CPUs
and prints the machine, each run's wall-clock minutes, the units' median minutes, the ratios, and whether
here-1 and ray-1 wrote the same results.json (timings and placement aside: the same threads per unit give
the same sums). Any other `lmlab compare` flag passes through.

    python bench/compare_ray.py --out runs/bench-ray --budget flops 2e12 --seeds 2 --tasks kjv-sections --questions 100
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from lmlab.cli import main as lmlab_main
from lmlab.compare.lab import machine
from lmlab.compare.report import _strip_timings

RUNS = {"here": [], "here-1": ["--unit-cpus", "1"], "ray-1": ["--ray", "--unit-cpus", "1"]}
COMPARED = ("contenders", "claims", "baselines", "notes")


def main() -> None:
    argv = sys.argv[1:]
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path("runs/bench-ray")
    if "--out" in argv:
        i = argv.index("--out")
        argv = argv[:i] + argv[i + 2 :]
    m = machine()
    print(f"# {m['cpu']} ({', '.join(m['flags']) or 'no AVX flags'}), {m['threads']} threads, torch {m['torch']}")
    print(f"# python bench/compare_ray.py {' '.join(sys.argv[1:])}")
    minutes, units, results = {}, {}, {}
    for name, extra in RUNS.items():
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        rc = lmlab_main(["compare", *argv, *extra, "--out", str(folder)])
        minutes[name] = (time.perf_counter() - t0) / 60
        if rc != 0:
            sys.exit(rc)
        results[name] = json.loads((folder / "results.json").read_text())
        units[name] = [r["unit_minutes"] for c in results[name]["contenders"] for r in c["runs"]]
    print("\n| run | wall clock (min) | units | median unit (min) | wall clock / ray-1 |")
    print("|---|---|---|---|---|")
    for name in RUNS:
        print(
            f"| {name} | {minutes[name]:.2f} | {len(units[name])} | {statistics.median(units[name]):.2f} | "
            f"{minutes[name] / minutes['ray-1']:.2f}x |"
        )
    same = all(_strip_timings(results["here-1"][k]) == _strip_timings(results["ray-1"][k]) for k in COMPARED)
    print(f"\nhere-1 and ray-1 results.json the same (timings and placement aside): {same}")


if __name__ == "__main__":
    main()
