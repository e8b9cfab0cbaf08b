"""The main job's table: `lmlab compare` at the demo budget on the built-in corpus, timed end to end.

Runs the comparison (any `lmlab compare` flags pass through), then prints the machine, the wall-clock
minutes and report.md (the claims and every table), which docs/benchmarks.md records.

    python bench/compare.py --out runs/bench-compare            # the demo: 5 contenders x 3 seeds
    python bench/compare.py --out runs/bench-quick --quick
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lmlab.cli import main as lmlab_main
from lmlab.compare.lab import machine


def main() -> None:
    argv = sys.argv[1:]
    out = argv[argv.index("--out") + 1] if "--out" in argv else "runs/bench-compare"
    if "--out" not in argv:
        argv += ["--out", out]
    m = machine()
    print(f"# {m['cpu']} ({', '.join(m['flags']) or 'no AVX flags'}), {m['threads']} threads, torch {m['torch']}")
    print(f"# python bench/compare.py {' '.join(sys.argv[1:])}")
    t0 = time.perf_counter()
    rc = lmlab_main(["compare", *argv])
    print(f"\nexit {rc}, {(time.perf_counter() - t0) / 60:.1f} minutes wall clock\n")
    if rc != 0:
        sys.exit(rc)
    print((Path(out) / "report.md").read_text())


if __name__ == "__main__":
    main()
