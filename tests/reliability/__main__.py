"""python -m tests.reliability CAMPAIGN ...: run a reliability campaign and print its figures."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path


def ray_campaign(a: argparse.Namespace) -> int:
    from . import ray_units

    with tempfile.TemporaryDirectory() as tmp:
        r = ray_units.campaign(Path(a.work or tmp), a.trials, a.seed)
    print(
        f"{r['trials']} comparisons on Ray: {r['kills']} workers killed ({', '.join(f'{k} {v}' for k, v in sorted(r['landed'].items()))}),"
        f" {r['missed']} missed (the unit ended first), {r.get('uncounted', 0)} retries uncounted; results equal to the sequential run's in {r['same']} of"
        f" {r['trials']}; {len(r['failures'])} problems; {r['minutes']} min"
    )
    for f in r["failures"]:
        print("  PROBLEM:", f)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1) + "\n")
    return 1 if r["failures"] or r["same"] < r["trials"] else 0


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__)
    sub = ap.add_subparsers(dest="campaign", required=True)
    c = sub.add_parser("crash", help="kill -9 training runs in steps, evaluations and checkpoint writes; resume")
    c.add_argument("--kills", type=int, default=50, help="kills that land, for each process count")
    c.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (2: torchrun, ddp)")
    c.add_argument("--steps", type=int, default=24, help="training steps of every run")
    c.add_argument("--per-trial", type=int, default=5, help="kills before a run is left to finish")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--stream", action="store_true", help="the runs stream their corpus (pretrain --stream)")
    c.add_argument("--work", help="folder for the runs (default: a temporary one)")
    c.add_argument("--json", help="also write the figures here")
    h = sub.add_parser("hostile", help="load model folders broken on purpose; each must be refused by name")
    h.add_argument("--json", help="also write the figures here")
    f = sub.add_parser("fuzz", help="every reader on random and mutated files; only lmlab's own errors may come out")
    f.add_argument("--examples", type=int, default=2000, help="inputs per reader")
    f.add_argument("--json", help="also write the figures here")
    v = sub.add_parser("server", help="malformed request bodies against lmlab serve; no 5xx, still healthy")
    v.add_argument("--requests", type=int, default=10000)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", help="also write the figures here")
    t = sub.add_parser("stateful", help="schemathesis stateful run over the server's OpenAPI links")
    t.add_argument("--scenarios", type=int, default=200, help="scenarios per run (two runs)")
    t.add_argument("--json", help="also write the figures here")
    w = sub.add_parser("slow", help="slowloris: connections that never finish their headers, against a server process")
    w.add_argument("--connections", type=int, default=300)
    w.add_argument("--fd-limit", type=int, default=256, help="the server process's file descriptors (ulimit -n)")
    w.add_argument("--seconds", type=float, default=30.0, help="how long each attack lasts")
    w.add_argument("--header-timeout", type=float, default=10.0, help="the deadline of the second run")
    w.add_argument("--json", help="also write the figures here")
    r = sub.add_parser("ray", help="SIGKILL the Ray workers under lmlab compare --ray units; same results required")
    r.add_argument("--trials", type=int, default=20, help="comparisons, each with one or two workers killed")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--work", help="folder for the runs (default: a temporary one)")
    r.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    if a.campaign == "ray":
        sys.exit(ray_campaign(a))
    if a.campaign == "stateful":
        sys.exit(stateful_campaign(a.scenarios, a.json))
    if a.campaign == "slow":
        sys.exit(slow_campaign(a))
    if a.campaign == "server":
        from . import server

        r = server.campaign(a.requests, a.seed)
        print(
            f"{r['requests']:,} malformed requests in {r['seconds']} s: statuses {r['statuses']}; healthy after: {r['healthy_after']}; {len(r['defects'])} defects"
        )
        for d in r["defects"]:
            print(f"  DEFECT: {d['problem']} (body {d['body'][:100]!r})")
        if a.json:
            Path(a.json).write_text(json.dumps(r, indent=1) + "\n")
        sys.exit(1 if r["defects"] or not r["healthy_after"] else 0)
    if a.campaign == "hostile":
        sys.exit(hostile_campaign(a.json))
    if a.campaign == "fuzz":
        sys.exit(fuzz_campaign(a.examples, a.json))

    import torch

    from . import crash

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, python {sys.version.split()[0]}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        for n in a.processes:
            r = crash.campaign(work, a.kills, n, a.steps, a.per_trial, a.seed, a.stream)
            results.append(r)
            print(
                f"{n} process(es){', streaming' if a.stream else ''}: {r['kills']} kills landed ({', '.join(f'{k} {v}' for k, v in r['landed'].items())}),"
                f" {r['missed']} after the run ended; {r['trials']} runs, {r['lives']} lives;"
                f" final weights equal to the uninterrupted run's in {r['weights_equal']} of {r['trials']};"
                f" {len(r['failures'])} problems; {r['minutes']} min"
            )
            for f in r["failures"]:
                print("  PROBLEM:", f)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    sys.exit(1 if any(r["failures"] for r in results) else 0)


def stateful_campaign(scenarios: int, json_path: str | None) -> int:
    from . import stateful

    rows = stateful.campaign(scenarios)
    for r in rows:
        codes: dict[str, int] = {}
        for key, n in r["statuses"].items():
            codes[key.rsplit(" ", 1)[1]] = codes.get(key.rsplit(" ", 1)[1], 0) + n
        print(
            f"bodies {r['bodies']}: {r['scenarios']} scenarios, {r['calls']} calls in {r['seconds']} s;"
            f" statuses {dict(sorted(codes.items()))}; {sum(r['links_followed'].values())} calls followed a link"
        )
        for link, n in r["links_followed"].items():
            print(f"  {n:5d}  {link}")
        if r["failure"]:
            print("  FAILURE:", r["failure"])
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any(r["failure"] for r in rows) else 0


def slow_campaign(a: argparse.Namespace) -> int:
    from . import slow

    with tempfile.TemporaryDirectory() as tmp:
        rows = slow.campaign(Path(tmp), a.connections, a.fd_limit, a.seconds, a.header_timeout)
    for r in rows:
        deadline = f"--header-timeout {r['header_timeout']:g}" if r["header_timeout"] else "no header deadline"
        print(
            f"{deadline}: {r['connections']} slow connections against {r['fd_limit']} descriptors for {r['seconds']:g} s:"
            f" {r['cut']} cut ({r['cut_with_408']} with a 408; after {r['cut_after_median_s']} s median,"
            f" {r['cut_after_max_s']} s at most), {r['still_open']} still open; /health answered"
            f" {r['probes_answered']} of {r['probes']}, longest without an answer {r['longest_unanswered_s']} s;"
            f" server alive: {r['server_alive']}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    with_deadline = rows[-1]
    return 0 if with_deadline["still_open"] == 0 and with_deadline["probes_answered"] else 1


def hostile_campaign(json_path: str | None) -> int:
    from . import hostile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(hostile.CASES):
            r = hostile.attack(Path(tmp) / f"case-{i:02d}", name)
            rows.append(r)
            verdict = "refused" if r["refused"] and not r["code_ran"] else "NOT REFUSED AS EXPECTED"
            print(
                f"{name}: {verdict} in {r['seconds']:.3f} s, RSS +{r['rss_growth_mb']} MB: {r['error_type']}: {r['error']}"
            )
    bad = [r for r in rows if not r["refused"] or r["code_ran"]]
    print(f"{len(rows)} hostile folders, {len(rows) - len(bad)} refused with an error naming the file and the problem")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if bad else 0


def fuzz_campaign(examples: int, json_path: str | None) -> int:
    from . import fuzz

    rows = []
    for name in fuzz.READERS:
        r = fuzz.campaign(name, examples)
        rows.append(r)
        print(
            f"{name}: {r['examples']} inputs, {r['accepted']} read, {r['lmlab_errors']} refused with lmlab's errors, {len(r['defects'])} defects"
        )
        for d in r["defects"]:
            print(f"  DEFECT: {d['problem']} (input {d['input'][:80]!r})")
    print(
        f"{sum(r['examples'] for r in rows):,} inputs over {len(rows)} readers, {sum(len(r['defects']) for r in rows)} defects"
    )
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any(r["defects"] for r in rows) else 0


if __name__ == "__main__":
    main()
