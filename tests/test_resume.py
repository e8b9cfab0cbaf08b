"""Resuming takes every setting from the run's folder (run.json): the README's `lmlab pretrain --out DIR
--resume` works as written, flags may change only the budget, logging, evaluation and checkpointing, and
`--precision auto` means the precision the run started in. Reruns in fresh processes give the same
tokenizer and losses for every family."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.errors import ConfigError
from lmlab.settings import resumed_pretrain_config

ROOT = Path(__file__).resolve().parents[1]


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def _pretrain_flags(corpus: Path, out: Path, steps: int) -> list[str]:
    # constant learning rate: a run of 3 steps continued to 6 follows the 6-step run's schedule exactly
    return [
        "pretrain", "--family", "decoder", "--data", str(corpus), "--doc-sep", "blank", "--out", str(out),
        "--max-steps", str(steps), "--batch-size", "4", "--seq-len", "32", "--vocab-size", "600",
        "--schedule", "constant", "--warmup-steps", "0", "--log-every", "1", "--save-every", "3",
        "--precision", "fp32", "--model-set", "n_layers=1", "--model-set", "d_model=64", "--model-set", "n_heads=2",
        "--model-set", "d_ff=128",
    ]  # fmt: skip


def test_the_readme_resume_line_continues_a_run_exactly_from_its_folder(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    assert main(_pretrain_flags(corpus, tmp_path / "whole", 6)) == 0
    assert main(_pretrain_flags(corpus, tmp_path / "run", 3)) == 0
    # the README's line, and a new budget: nothing else given
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "6"]) == 0
    assert _losses(tmp_path / "run") == _losses(tmp_path / "whole")
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--resume"]) == 0  # as written: nothing left to do
    assert _losses(tmp_path / "run")[-1][0] == 6


def test_a_flag_that_would_change_the_run_is_refused_with_both_values(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(_pretrain_flags(corpus, run, 3)) == 0
    capsys.readouterr()
    for flags, named in (
        (["--seq-len", "64"], ["--seq-len 64", "has 32"]),
        (["--precision", "bf16"], ["--precision 'bf16'", "has 'fp32'"]),
        (["--family", "encoder"], ["--family 'encoder'", "has 'decoder'"]),
        (["--data", str(tmp_path / "other.txt")], ["--data", "other.txt", "corpus.txt"]),
        (["--model-set", "n_layers=2"], ["model setting n_layers 2", "has 1"]),
    ):
        assert main(["pretrain", "--out", str(run), "--resume", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert all(part in err for part in named), err
    # the same values again, and what may change, are accepted
    assert (
        main(["pretrain", "--out", str(run), "--resume", "--family", "decoder", "--seq-len", "32", "--max-steps", "4"])
        == 0
    )
    assert _losses(run)[-1][0] == 4
    assert main(["pretrain", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "run.json: not found" in capsys.readouterr().err


def test_precision_auto_on_resume_is_the_precision_the_run_started_in(tmp_path):
    for started in ("fp32", "bf16"):
        record = {
            "pretrain": {"out": str(tmp_path), "family": "decoder", "train": {"precision": "auto", "max_steps": 5}},
            "precision": {"precision": started, "why": "chosen on the machine that started it"},
        }
        (tmp_path / "run.json").write_text(json.dumps(record))
        pc = resumed_pretrain_config(tmp_path, {"train": {"precision": "auto", "max_steps": 9}})
        assert (pc.train.precision, pc.train.max_steps, pc.resume) == (started, 9, True)
        other = "bf16" if started == "fp32" else "fp32"
        with pytest.raises(ConfigError, match=f"--precision '{other}' would change the run"):
            resumed_pretrain_config(tmp_path, {"train": {"precision": other}})


def test_finetune_resume_takes_its_settings_from_the_folder(tmp_path, tiny_pretrained, capsys):
    train = tmp_path / "train.tsv"
    train.write_text("text\tlabel\n" + "".join(f"and the lord said {i}\t{'ab'[i % 2]}\n" for i in range(24)))
    out = tmp_path / "cls"
    base = ["finetune", "--task", "classify", "--model", str(tiny_pretrained["bert"]), "--train", str(train)]
    assert main([*base, "--out", str(out), "--epochs", "1", "--batch-size", "8", "--precision", "fp32"]) == 0
    assert main(["finetune", "--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert json.loads((out / "eval_results.json").read_text())["steps"] == 6
    capsys.readouterr()
    assert main(["finetune", "--out", str(out), "--resume", "--lr", "0.1"]) == 2
    assert "--lr 0.1 would change the run being resumed" in capsys.readouterr().err


FRESH = [sys.executable, "-m", "lmlab", "pretrain", "--max-steps", "3", "--batch-size", "4", "--seq-len", "32"]


@pytest.mark.parametrize("family", ["encoder", "encoder-decoder"])
def test_the_same_command_gives_the_same_tokenizer_and_losses_in_fresh_processes(tmp_path, corpus, family):
    """WordPiece (encoder) and Unigram (encoder-decoder) vocabularies used to differ from process to process."""
    outs = []
    for i in range(2):  # two fresh processes: enough to see a vocabulary or loss that varies between them
        out = tmp_path / f"run{i}"
        flags = ["--family", family, "--data", str(corpus), "--doc-sep", "blank", "--out", str(out)]
        flags += ["--vocab-size", "1000", "--seed", "0", "--precision", "fp32", "--cache-dir", str(tmp_path / f"c{i}")]
        r = subprocess.run([*FRESH, *flags], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(out)
    assert len({(o / "tokenizer.json").read_bytes() for o in outs}) == 1
    assert _losses(outs[0]) == _losses(outs[1])
