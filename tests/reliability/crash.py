"""The kill -9 campaign: SIGKILL a pre-training run in a training step, an evaluation or a checkpoint
write, resume it, again and again, and require the final weights to equal an uninterrupted run's.

A trial is one run folder. It is started (`child.py`, or torchrun over two processes with
`--parallel ddp`), killed at an aimed moment, restarted with `resume`, killed again, ... and
finally left to finish. Each kill aims at one of the three phases in turn: the harness waits for
the phase's marker (the 1st to 3rd of this life), then sleeps a random part of the phase's median
length (measured on the uninterrupted run) and kills the whole process group. Where it landed is
read from the last marker written before it. A kill that comes after the run ended is not counted.

Each finished trial must have:
- final weights (model.safetensors) equal to the uninterrupted run's, tensor by tensor, bit for bit;
- no partial `.tmp-*` checkpoint folder left, and every kept checkpoint passing its manifest;
- metrics.jsonl with every line readable and every training step logged exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHILD = Path(__file__).with_name("child.py")
PHASES = ("step", "eval", "save")
WHERE = {"save-begin": "checkpoint write", "eval-begin": "evaluation", "final-begin": "final save"}
MODEL = {"n_layers": 2, "d_model": 64, "n_heads": 2, "d_ff": 128, "dropout": 0.1}


def environment() -> dict[str, str]:
    env = dict(os.environ, COLUMNS="100")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def prepare(work: Path, steps: int) -> dict[str, Any]:
    """The corpus, a tokenizer every life shares, and the run's settings (without `out`)."""
    from lmlab.data.corpus import demo_corpus, read_documents
    from lmlab.tokenizer import train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    docs = [d for _, d in zip(range(40), read_documents(demo_corpus("kjv"), doc_sep="blank"))]
    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    tok = train_tokenizer("bpe", docs, 400)
    tok.save(work / "tokenizer")
    return {
        "family": "decoder",
        "data": [str(corpus)],
        "doc_sep": "blank",
        "tokenizer": str(work / "tokenizer"),
        "seq_len": 32,
        "cache_dir": str(work / "cache"),
        "resume": True,
        "model": dict(MODEL),
        "train": {
            "max_steps": steps,
            "batch_size": 4,
            "warmup_steps": 2,
            "eval_every": 3,
            "eval_batches": 2,
            "save_every": 4,
            "keep_checkpoints": 2,
            "log_every": 1,
        },
    }


def command(config: Path, markers: Path, processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, str(CHILD), str(config), str(markers)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
        str(CHILD), str(config), str(markers),
    ]  # fmt: skip


def _lines(markers: Path) -> list[tuple[float, str]]:
    if not markers.is_file():
        return []
    out = []
    for line in markers.read_text().splitlines():
        t, _, phase = line.partition(" ")
        if phase:
            out.append((float(t), phase))
    return out


def life(cmd: list[str], markers: Path, log: Path, aim: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    """Run one life; with `aim` ({"phase", "occurrence", "delay"}) kill it there. What happened."""
    seen = len(_lines(markers))
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, env=environment(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        if aim is not None:
            marker = "step" if aim["phase"] == "step" else f"{aim['phase']}-begin"
            while proc.poll() is None and time.monotonic() < deadline:
                now = [p for _, p in _lines(markers)[seen:]]
                if now.count(marker) >= aim["occurrence"]:
                    time.sleep(aim["delay"])
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    mine = _lines(markers)[seen:]
                    if mine and mine[-1][1] == "done":
                        return {"killed": False, "rc": proc.returncode}
                    last = mine[-1][1] if mine else None
                    landed = WHERE.get(last, "training step") if last else "start-up"
                    return {"killed": True, "landed": landed, "aimed": aim["phase"]}
                time.sleep(0.0005)
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"a life of {cmd} ran past {timeout} s; see {log}") from None
        return {"killed": False, "rc": proc.returncode}


def durations(markers: Path) -> dict[str, float]:
    """Median seconds of each phase in an uninterrupted life's markers."""
    lines = _lines(markers)
    spans: dict[str, list[float]] = {p: [] for p in PHASES}
    for (t0, a), (t1, _) in zip(lines, lines[1:]):
        if a in ("step", "eval-end", "save-end", "start"):
            spans["step"].append(t1 - t0)
        elif a in ("eval-begin", "save-begin"):
            spans[a.split("-")[0]].append(t1 - t0)
    return {p: statistics.median(v) if v else 0.005 for p, v in spans.items()}


def differing(a: Path, b: Path) -> list[str]:
    """The tensors of two model folders that are not bit for bit equal (a name in one only counts)."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return sorted(k for k in x.keys() | y.keys() if k not in x or k not in y or not x[k].equal(y[k]))


def check(out: Path, reference: Path, steps: int) -> dict[str, Any]:
    """The finished trial against the uninterrupted run."""
    from lmlab.errors import CheckpointError
    from lmlab.train.checkpoint import verify_checkpoint

    problems = []
    differ = differing(reference, out)
    if differ:
        problems.append(f"{len(differ)} tensors differ from the uninterrupted run's ({differ[0]}, ...)")
    partial = sorted(p.name for p in (out / "checkpoints").glob(".tmp-*"))
    if partial:
        problems.append(f"partial checkpoint folders left: {partial}")
    for ckpt in sorted((out / "checkpoints").glob("step-*")):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
    train_steps = []
    for n, line in enumerate((out / "metrics.jsonl").read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            problems.append(f"metrics.jsonl line {n} is not JSON: {line[:60]!r}")
            continue
        if record.get("split") == "train":
            train_steps.append(record["step"])
    if train_steps != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl logs training steps {train_steps}, not 1..{steps} once each")
    return {"weights_equal": not differ, "problems": problems}


def campaign(
    work: Path, kills: int, processes: int, steps: int = 24, per_trial: int = 5, seed: int = 0, stream: bool = False
) -> dict:
    """`kills` aimed SIGKILLs over trials of `per_trial` kills each; the figures. `stream`: the runs read
    their corpus through pretrain --stream (a worker process, the data position in the checkpoint)."""
    rng = random.Random(seed)
    work = Path(work) / (f"np{processes}" + ("-stream" if stream else ""))
    base = prepare(work, steps)
    base["stream"] = stream
    if processes > 1:
        base["train"]["parallel"] = "ddp"
    timeout = 300.0

    def folder(name: str) -> tuple[Path, Path, Path]:
        out = work / name
        config = work / f"{name}.json"
        config.write_text(json.dumps({**base, "out": str(out)}))
        return out, config, work / f"{name}.markers"

    started = time.perf_counter()
    ref, ref_config, ref_markers = folder("reference")
    done = life(command(ref_config, ref_markers, processes), ref_markers, work / "reference.log", None, timeout)
    if done["rc"] != 0:
        raise RuntimeError(f"the uninterrupted run failed ({done}); see {work / 'reference.log'}")
    length = durations(ref_markers)
    landed: dict[str, int] = {}
    trials, lives, missed, failures, aimed = [], 0, 0, [], 0
    while sum(landed.values()) < kills:
        out, config, markers = folder(f"trial-{len(trials):03d}")
        log = work / f"trial-{len(trials):03d}.log"
        record = {"kills": [], "lives": 0}
        for _ in range(min(per_trial, kills - sum(landed.values()))):
            phase = PHASES[aimed % len(PHASES)]  # the three phases in turn
            aimed += 1
            aim = {"phase": phase, "occurrence": rng.randint(1, 3), "delay": rng.uniform(0, length[phase])}
            result = life(command(config, markers, processes), markers, log, aim, timeout)
            record["lives"] += 1
            if not result["killed"]:  # the run had ended
                missed += 1
                break
            record["kills"].append(result)
            landed[result["landed"]] = landed.get(result["landed"], 0) + 1
        result = life(command(config, markers, processes), markers, log, None, timeout)
        record["lives"] += 1
        if result["rc"] != 0:
            failures.append(f"{out.name}: the last life exited with {result['rc']} (see {log})")
            record["check"] = {"weights_equal": False, "problems": [f"exit {result['rc']}"]}
        else:
            record["check"] = check(out, ref, steps)
            failures += [f"{out.name}: {p}" for p in record["check"]["problems"]]
        lives += record["lives"]
        trials.append(record)
    return {
        "processes": processes,
        "stream": stream,
        "steps": steps,
        "kills": sum(landed.values()),
        "landed": dict(sorted(landed.items())),
        "missed": missed,
        "trials": len(trials),
        "lives": lives,
        "weights_equal": sum(t["check"]["weights_equal"] for t in trials),
        "phase_seconds": {k: round(v, 4) for k, v in length.items()},
        "failures": failures,
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "trial_records": trials,
    }
