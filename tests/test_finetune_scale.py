"""Fine-tuning that scales: several processes (DDP and FSDP) give the one-process losses, with
accumulation; a two-process run resumes on one; early stopping keeps the best step's model; the
learning-rate schedules; experiment trackers read back with their own libraries; bad settings."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune import _conll, _sst_like

import lmlab
from lmlab.errors import ConfigError
from lmlab.finetune import FinetuneConfig, finetune, predict
from lmlab.train.optim import lr_factor

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100", PYTHONPATH=str(ROOT / "src"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _lmlab(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "-m", "lmlab", *args], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _ner_flags(tiny_pretrained, tmp_path: Path, out: str, steps: int, *more: str) -> list[str]:
    train, dev = tmp_path / "train.conll", tmp_path / "dev.conll"
    if not train.exists():
        _conll(train, 64, 0), _conll(dev, 16, 1)
    # a tagger: each rank's share of the labelled tokens differs, which the rank weights correct; constant
    # rate without warm-up, so a 4-step run continued to 8 follows the 8-step run's schedule
    return [
        "finetune", "--task", "ner", "--model", str(tiny_pretrained["bert"]), "--train", str(train),
        "--eval", str(dev), "--out", str(tmp_path / out), "--max-steps", str(steps), "--batch-size", "8",
        "--lr", "1e-3", "--max-len", "24", "--precision", "fp32", "--lr-schedule", "constant",
        "--warmup-ratio", "0", *more,
    ]  # fmt: skip


def test_two_processes_fine_tune_like_one_with_ddp_and_fsdp_and_accumulation(tiny_pretrained, tmp_path):
    one = _ner_flags(tiny_pretrained, tmp_path, "one", 6, "--grad-accum", "2")
    _lmlab(*one, cwd=tmp_path)
    expected = _train_losses(tmp_path / "one")
    assert len(expected) == 6 and expected[-1] < expected[0]
    reference = lmlab.load(tmp_path / "one").state_dict()
    for parallel in ("ddp", "fsdp"):
        flags = _ner_flags(tiny_pretrained, tmp_path, parallel, 6, "--grad-accum", "2", "--nproc", "2")
        shown = _lmlab(*flags, "--parallel", parallel, cwd=tmp_path).stdout
        assert "on 2 processes" in shown and "f1" in shown
        assert _train_losses(tmp_path / parallel) == pytest.approx(expected, abs=1e-5), parallel
        record = json.loads((tmp_path / parallel / "run.json").read_text())
        assert record["distributed"]["world_size"] == 2 and record["finetune"]["parallel"] == parallel
        saved = lmlab.load(tmp_path / parallel).state_dict()  # rank 0's folder: the whole model
        assert saved.keys() == reference.keys()
        for name, value in reference.items():
            torch.testing.assert_close(saved[name], value, atol=1e-5, rtol=0, msg=f"{parallel}: {name}")


@pytest.mark.slow  # 16 s; the pre-training trainer it runs on is resumed across world sizes in the default suite
def test_a_two_process_fine_tuning_run_resumes_on_one_process_with_the_same_losses(tiny_pretrained, tmp_path):
    _lmlab(*_ner_flags(tiny_pretrained, tmp_path, "whole", 8, "--save-every", "4"), cwd=tmp_path)
    _lmlab(*_ner_flags(tiny_pretrained, tmp_path, "run", 4, "--save-every", "4", "--nproc", "2"), cwd=tmp_path)
    _lmlab(
        "finetune", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "8", "--parallel", "none", cwd=tmp_path
    )
    assert len(_train_losses(tmp_path / "run")) == 8
    assert _train_losses(tmp_path / "run") == pytest.approx(_train_losses(tmp_path / "whole"), abs=1e-5)


def test_an_interrupted_fine_tuning_run_resumes_exactly(tiny_pretrained, tmp_path):
    train, dev = _sst_like(tmp_path / "train.tsv", 96, 0), _sst_like(tmp_path / "dev.tsv", 32, 1)

    def config(out: str, **kw) -> FinetuneConfig:
        base = dict(task="classify", model=str(tiny_pretrained["gpt"]), train=str(train), eval=str(dev))
        base.update(out=str(tmp_path / out), max_steps=8, save_every=3, lr=2e-3, batch_size=8, max_len=24)
        return FinetuneConfig(**{**base, **kw})

    finetune(config("whole"))

    class Killed(Exception):
        pass

    def kill_at_step_5(kind, info):
        if kind == "step" and info["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        finetune(config("run"), kill_at_step_5)
    result = finetune(config("run", resume=True))
    assert result["resumed"] and result["steps"] == 8
    assert _train_losses(tmp_path / "run") == _train_losses(tmp_path / "whole")  # bit for bit, linear schedule too


def test_gradient_checkpointing_and_accumulation_keep_the_losses(tiny_pretrained, tmp_path):
    train = _sst_like(tmp_path / "train.tsv", 64, 0)

    def losses(out: str, **kw) -> list[float]:
        base = dict(task="classify", model=str(tiny_pretrained["bert"]), train=str(train), out=str(tmp_path / out))
        finetune(FinetuneConfig(**{**base, "max_steps": 4, "lr": 2e-3, "max_len": 24, "precision": "fp32", **kw}))
        return _train_losses(tmp_path / out)

    plain = losses("plain", batch_size=16)
    assert losses("checkpointed", batch_size=16, gradient_checkpointing=True) == pytest.approx(plain, abs=1e-6)
    # two micro-batches of 8 are one batch of 16: the same examples, the same mean loss and step
    assert losses("accumulated", batch_size=8, grad_accum=2) == pytest.approx(plain, abs=1e-5)


def test_compare_reports_to_trackers_without_changing_what_it_computes():
    from lmlab.compare.settings import CompareConfig

    assert CompareConfig(report_to=["tensorboard"]).fingerprint() == CompareConfig().fingerprint()
    assert CompareConfig(doc_mask=True).fingerprint() != CompareConfig().fingerprint()  # it changes the runs


def test_early_stopping_stops_where_the_metric_stopped_improving_and_saves_the_best_step(tiny_pretrained, tmp_path):
    train = _sst_like(tmp_path / "train.tsv", 200, 0)
    # the evaluation file says the opposite of the training file: the better the model learns the planted
    # word, the worse its evaluation loss, so the best is an early step and patience runs out
    flipped = _sst_like(tmp_path / "flipped.tsv", 48, 1)
    lines = flipped.read_text().splitlines()
    flipped.write_text(
        "\n".join([lines[0]] + [f"{t}\t{1 - int(y)}" for t, y in (x.split("\t") for x in lines[1:])]) + "\n"
    )
    fc = FinetuneConfig(
        task="classify", model=str(tiny_pretrained["gpt"]), train=str(train), eval=str(flipped),
        out=str(tmp_path / "es"), epochs=10, lr=3e-3, batch_size=16, max_len=24, precision="fp32",
        eval_every=3, early_stopping=2, metric="loss",
    )  # fmt: skip
    result = finetune(fc)
    best = result["best"]
    rows = [json.loads(line) for line in (tmp_path / "es" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["loss"]) for r in rows if r["split"] == "val"]
    # stopped two evaluations after the lowest loss, long before the 130 steps of 10 epochs
    assert result["stopped_early"] and result["steps"] == best["step"] + 2 * 3 < 130
    assert best["value"] == min(loss for _, loss in evals) and (best["step"], best["value"]) in evals
    assert [s for s, _ in evals][-1] == result["steps"]
    # the saved model is the best step's: evaluated again after the restore, and predicted from its folder
    assert result["eval"]["loss"] == pytest.approx(best["value"], abs=1e-6)
    preds = predict(str(tmp_path / "es"), str(flipped))
    gold = [line.split("\t")[1] for line in flipped.read_text().splitlines()[1:]]
    loss = -sum(math.log(max(p["probabilities"][g], 1e-6)) for p, g in zip(preds, gold)) / len(gold)
    assert loss == pytest.approx(best["value"], abs=2e-3)
    best_weights = torch.load(tmp_path / "es" / "best" / "weights.pt", weights_only=True)
    saved = lmlab.load(tmp_path / "es").state_dict()
    assert all(torch.equal(saved[k], best_weights[k]) for k in saved)
    assert json.loads((tmp_path / "es" / "eval_results.json").read_text())["best"] == best


def test_warmup_stable_decay_holds_the_peak_then_decays_over_the_last_fifth():
    factors = [lr_factor(s, 10, 100, "warmup-stable-decay", 0.0) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert all(f == 1.0 for f in factors[10:80])
    assert factors[80] < 1.0 and factors[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(factors[80:], factors[81:]))
    assert lr_factor(99, 0, 100, "warmup-stable-decay", 0.1, decay_fraction=0.5) == pytest.approx(0.1)
    assert lr_factor(49, 0, 100, "warmup-stable-decay", 0.1, decay_fraction=0.5) == 1.0


def _wandb_history(path: Path) -> list[dict[str, float]]:
    """The history rows of a W&B offline run file, parsed with wandb's own protobuf messages. The file is
    a LevelDB-style log (wandb's datastore): a 7-byte header, then 32 KiB blocks of records, each with a
    7-byte header (CRC, length, type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, rows, pending = path.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B"
    pos = 7
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or the last piece
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_every_tracker_holds_the_logged_metrics_read_back_with_its_own_library(tiny_pretrained, tmp_path):
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("trackio")
    pytest.importorskip("wandb")
    flags = _ner_flags(tiny_pretrained, tmp_path, "tracked", 4, "--eval-every", "2")
    env = dict(_env(), TRACKIO_DIR=str(tmp_path / "trackio"), WANDB_SILENT="true")
    _lmlab(*flags, "--report-to", "tensorboard", "mlflow", "trackio", "wandb", cwd=tmp_path, env=env)
    run = tmp_path / "tracked"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    val = {r["step"]: r["f1"] for r in rows if r["split"] == "val"}
    assert sorted(train) == [1, 2, 3, 4] and sorted(val) == [2, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(train)
    assert {e.step: e.value for e in events.Scalars("val/f1")} == pytest.approx(val)
    assert {"train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])

    mlflow.set_tracking_uri(f"sqlite:///{run / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["lmlab"])
    assert len(found) == 1 and found.iloc[0]["metrics.train/loss"] == pytest.approx(train[4])
    assert found.iloc[0]["params.finetune.task"] == "ner" and found.iloc[0]["params.train.lr"] == "0.001"
    history = mlflow.MlflowClient().get_metric_history(found.iloc[0]["run_id"], "val/f1")
    assert {m.step: m.value for m in history} == pytest.approx(val)

    script = (
        "import json, trackio.sqlite_storage as s; "
        "print(json.dumps([{k: r[k] for k in ('step', 'train/loss') if k in r} for r in s.SQLiteStorage.get_logs('lmlab', 'tracked')]))"
    )
    read = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    logged = {r["step"]: r["train/loss"] for r in json.loads(read.stdout.strip().splitlines()[-1]) if "train/loss" in r}
    assert logged == pytest.approx(train)

    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = _wandb_history(wandb_file)
    assert {int(r["_step"]): r["train/loss"] for r in history if "train/loss" in r} == pytest.approx(train)
    assert {int(r["_step"]): r["val/f1"] for r in history if "val/f1" in r} == pytest.approx(val)


def test_pretraining_reports_moe_expert_load_to_the_trackers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(f"the little experts route word {i} and word {i * 7 % 13}" for i in range(200)) + "\n")
    _lmlab(
        "pretrain", "--family", "decoder", "--data", str(data), "--out", str(tmp_path / "moe"), "--max-steps", "2",
        "--log-every", "2", "--batch-size", "2", "--seq-len", "32", "--vocab-size", "300", "--moe-experts", "4",
        "--model-set", "n_layers=1", "--report-to", "tensorboard", "--cache-dir", str(tmp_path / "cache"),
        cwd=tmp_path,
    )  # fmt: skip
    events = EventAccumulator(str(tmp_path / "moe" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    loads = sorted(t for t in tags if t.startswith("moe/") and "/load/" in t)
    assert len(loads) == 4, sorted(tags)
    assert sum(events.Scalars(t)[-1].value for t in loads) == pytest.approx(1.0, abs=1e-4)


def test_bad_fine_tuning_settings_are_named(tiny_pretrained, tmp_path, monkeypatch):
    train = _sst_like(tmp_path / "train.tsv", 32, 0)
    base = dict(task="classify", model=str(tiny_pretrained["gpt"]), train=str(train), out=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match=r"--early-stopping compares evaluations: give an evaluation file"):
        FinetuneConfig.from_dict({**base, "early_stopping": 2})
    with pytest.raises(ConfigError, match=r"--grad-accum must be at least 1, got 0"):
        FinetuneConfig.from_dict({**base, "grad_accum": 0})
    dev = _sst_like(tmp_path / "dev.tsv", 16, 1)
    fc = FinetuneConfig(**base, eval=str(dev), max_steps=2, batch_size=8, max_len=16, keep_best=True, metric="bleu")
    with pytest.raises(ConfigError, match=r"best_metric 'bleu' is not among the evaluation's metrics: loss, accuracy"):
        finetune(fc)
    fc = FinetuneConfig(**base, max_steps=2, batch_size=8, max_len=16, report_to=["neptune"])
    with pytest.raises(ConfigError, match=r"report.to 'neptune' is unknown; trackers: tensorboard, mlflow"):
        finetune(fc)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    fc = FinetuneConfig(**base, max_steps=2, batch_size=8, max_len=16, report_to=["mlflow"])
    with pytest.raises(
        ConfigError, match=r"--report-to mlflow needs the mlflow package: pip install 'lmlab\[mlflow\]'"
    ):
        finetune(fc)
    monkeypatch.undo()
    fc = FinetuneConfig(**base, max_steps=2, batch_size=8, max_len=16, parallel="ddp")
    with pytest.raises(ConfigError, match=r"--parallel ddp runs under torchrun"):
        finetune(fc)
