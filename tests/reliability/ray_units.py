"""The Ray worker campaign: SIGKILL the Ray worker under a unit of `lmlab compare --ray` at a random moment
of the unit's life, and require the comparison to finish with the results of an undisturbed sequential run.

A trial is one comparison (two families x two seeds, a classification task, one CPU per unit) on a local
Ray instance of 2 CPUs, so two units run at once. One or two of its units are victims: each is given a
delay aimed at one of its stages chosen at random (from the stage lengths of the sequential run), counted
from the moment its unit process appears; when it has passed, the harness reads the
unit's stage.json (where the kill lands: pre-training, intrinsic, few-shot, generation, fine-tuning) and
kills the process's parent, the Ray worker running the task. A victim whose unit ends before its delay is
a miss. Trials alternate --ray-files auto (the folder read and written in place) and ship (inputs through
the object store, the unit's folder sent back).

Each trial must have:
- results.json equal to the sequential run's (timings and placement aside);
- every victim recorded as attempt 2 in its result's `ran_on`, every other unit as attempt 1 (a victim
  killed before its first stage may be recorded as 1: its call to the progress actor may not have gone out;
  counted as "uncounted");
- the killed unit processes gone (they die with their worker), and no unit process left afterwards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

SETTINGS: dict[str, Any] = dict(
    d_model=32,
    n_layers=2,
    n_heads=2,
    d_ff=64,
    seq_len=32,
    vocab_size=600,
    batch_size=8,
    warmup_steps=4,
    families=["decoder", "encoder"],
    seeds=2,
    budget="tokens",
    budget_value=12_000,
    eval_windows=8,
    questions=12,
    samples=2,
    max_task_examples=60,
    val_fraction=0.1,
    unit_cpus=1,
)
COMPARED = ("contenders", "claims", "baselines", "baseline_evidence", "notes", "tasks")


def unit_processes(out: Path) -> dict[str, tuple[int, Path]]:
    """The unit processes of the comparison in `out`, as "contender/seedK" -> (pid, the unit's folder): read
    from each process's spec file, which names the folder it runs in (OUT/runs/..., or a temporary folder on
    its node when its files are shipped)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            if "lmlab.compare.unit" not in cmd:
                continue
            spec = json.loads(Path(cmd[cmd.index("lmlab.compare.unit") + 1]).read_text())
        except (OSError, ValueError, IndexError):
            continue
        if Path(spec["compare"]["out"]).resolve() == Path(out).resolve():
            found[f"{spec['contender']['name']}/seed{spec['seed']}"] = (int(pid), Path(spec["dir"]))
    return found


def alive(pid: int, wait: float = 5.0) -> bool:
    """Whether `pid` still runs after up to `wait` seconds (a zombie, killed but not yet reaped, does not)."""
    deadline = time.time() + wait
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state in ("Z", "X") or time.time() > deadline:
            return state not in ("Z", "X")
        time.sleep(0.1)


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def same_results(a: dict[str, Any], b: dict[str, Any]) -> bool:
    from lmlab.compare.report import _strip_timings

    return all(_strip_timings(a[k]) == _strip_timings(b[k]) for k in COMPARED)


def attempts(results: dict[str, Any]) -> dict[str, int]:
    return {f"{c['name']}/seed{r['seed']}": r["ran_on"]["attempt"] for c in results["contenders"] for r in c["runs"]}


def prepare(work: Path) -> dict[str, Any]:
    """800 verses and a classification task (early or late in the book) from the built-in corpus."""
    import gzip

    from lmlab.data.corpus import demo_corpus

    work.mkdir(parents=True, exist_ok=True)
    lines = [v for v in gzip.open(demo_corpus("kjv"), "rt").read().splitlines() if v.strip()][:800]
    corpus = work / "kjv.txt"
    corpus.write_text("\n".join(lines) + "\n")
    task = work / "sections.tsv"
    rows = [f"{v}\t{'law' if i < 400 else 'later'}" for i, v in enumerate(lines)][::8]
    task.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return {**SETTINGS, "data": [str(corpus)], "tasks": [str(task)]}


def _compare(settings: dict[str, Any], out: Path, **kw: Any) -> dict[str, Any]:
    from lmlab.compare import CompareConfig, compare

    compare(CompareConfig(**{**settings, **kw}, out=str(out)))
    return json.loads((out / "results.json").read_text())


START_UP = 2.5  # seconds from a unit process's start to its first stage (imports), roughly, on these machines


def aim(stage_seconds: dict[str, float], rng: random.Random) -> float:
    """A delay that lands in a stage chosen at random (the stages the unit went through in the reference run,
    each in proportion to nothing but its turn), at a random point of it."""
    stages = [("imports", START_UP), *stage_seconds.items()]
    i = rng.randrange(len(stages))
    return sum(sec for _, sec in stages[:i]) + rng.uniform(0, 1) * stages[i][1]


def trial(
    settings: dict[str, Any], out: Path, rng: random.Random, files: str, reference: dict[str, Any]
) -> dict[str, Any]:
    runs = {f"{c['name']}/seed{r['seed']}": r for c in reference["contenders"] for r in c["runs"]}
    keys = list(runs)
    victims = {k: aim(runs[k]["stage_seconds"], rng) for k in rng.sample(keys, rng.choice([1, 2]))}
    seen: dict[str, float] = {}
    kills: dict[str, dict[str, Any]] = {}
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["results"] = _compare(settings, out, ray="local", ray_files=files)
        except Exception as e:  # reported as the trial's problem
            done["error"] = repr(e)

    driver = threading.Thread(target=run)
    driver.start()
    while driver.is_alive():
        running = unit_processes(out)
        for key, delay in victims.items():
            if key in kills:
                continue
            if key not in seen:
                if key in running:
                    seen[key] = time.time()
                continue
            if key not in running:  # its unit ended before the delay
                kills[key] = {"missed": True}
            elif time.time() - seen[key] >= delay:
                pid, unit = running[key]
                try:
                    stage = json.loads((unit / "stage.json").read_text()).get("stage", "start-up")
                except (OSError, json.JSONDecodeError):
                    stage = "start-up"
                os.kill(parent(pid), signal.SIGKILL)
                kills[key] = {"missed": False, "stage": stage.split(" ")[0], "pid": pid, "delay": delay}
        time.sleep(0.02)
    driver.join()
    problems = []
    if "error" in done:
        problems.append(f"the comparison failed: {done['error']}")
        return {"kills": kills, "problems": problems, "same": False}
    landed = {k for k, v in kills.items() if not v["missed"]}
    got = attempts(done["results"])
    uncounted = 0
    for key, n in got.items():
        # a worker killed before its unit's first stage may die before its call to the progress actor has
        # gone out (the task sends it without waiting, see lmlab.compare.ray_units.unit_task): attempt 1 then
        early = key in landed and kills[key]["stage"] == "start-up" and n == 1
        uncounted += early
        if n != (2 if key in landed else 1) and not early:
            problems.append(f"{key}: attempt {n}")
    for key in landed:
        if alive(kills[key]["pid"]):
            problems.append(f"{key}: the killed attempt's unit process {kills[key]['pid']} outlived its worker")
    left = unit_processes(out)
    if left:
        problems.append(f"unit processes left running: {left}")
    same = same_results(done["results"], reference)
    return {"kills": kills, "problems": problems, "same": same, "uncounted": uncounted}


def campaign(work: Path, trials: int, seed: int) -> dict[str, Any]:
    import ray

    started = time.time()
    rng = random.Random(seed)
    settings = prepare(work)
    reference = _compare(settings, work / "sequential")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    landed: dict[str, int] = {}
    out: dict[str, Any] = {"trials": trials, "missed": 0, "same": 0, "failures": []}
    try:
        for i in range(trials):
            files = ("auto", "ship")[i % 2]
            r = trial(settings, work / f"trial{i}", rng, files, reference)
            for kill in r["kills"].values():
                if kill["missed"]:
                    out["missed"] += 1
                else:
                    landed[kill["stage"]] = landed.get(kill["stage"], 0) + 1
            out["same"] += bool(r["same"])
            out["uncounted"] = out.get("uncounted", 0) + r.get("uncounted", 0)
            out["failures"] += [f"trial {i} ({files}): {p}" for p in r["problems"]]
            print(f"trial {i} ({files}): {r['kills']} same={r['same']} problems={r['problems']}", flush=True)
    finally:
        ray.shutdown()
    out["landed"] = landed
    out["kills"] = sum(landed.values())
    out["minutes"] = round((time.time() - started) / 60, 1)
    return out
