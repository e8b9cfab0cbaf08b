"""A streamed corpus (pretrain --stream): training starts before the corpus has been read through, the
reading stays a bounded distance ahead, an interrupted run resumes with the uninterrupted run's losses
bit for bit, every process streams the same global batches, and what cannot stream is refused."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.data.objectives import ObjectiveConfig, stream_objective
from lmlab.data.streaming import StreamBatches, StreamSpec
from lmlab.errors import ConfigError
from lmlab.pretrain import PretrainConfig, pretrain
from lmlab.settings import TrainConfig
from lmlab.tokenizer import train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
N_DOCS = 20_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    rng = random.Random(0)
    docs = [" ".join(rng.choices(WORDS, k=rng.randint(5, 60))) for _ in range(N_DOCS)]
    (root / "corpus.txt").write_text("\n".join(docs) + "\n")
    train_tokenizer("bpe", docs[:500], 300).save(root / "tok")
    return root


def _batches(corpus: Path, prefetch: int = 16, workers: int = 1) -> StreamBatches:
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(corpus / "tok")
    objective = stream_objective(ObjectiveConfig("clm", 64), tok)
    spec = StreamSpec([str(corpus / "corpus.txt")], "line", "text", False, str(corpus / "tok"), tok.eos_id, 64, 0, 50)
    return StreamBatches(objective, spec, 8, seed=0, prefetch=prefetch, workers=workers)


def test_the_first_batch_comes_before_the_corpus_is_read_through_and_reading_stays_bounded(corpus):
    batches = _batches(corpus)
    try:
        first = batches.next_batch()
        assert first["input_ids"].shape == (8, 64)
        read_at_first = batches.documents_read.value
        assert 0 < read_at_first < N_DOCS / 4  # the shuffle buffer (1,000) and a few windows ahead
        import time

        time.sleep(1.0)  # the worker fills its queue of 16 windows, then waits
        assert batches.documents_read.value < N_DOCS / 4
    finally:
        batches.close()


def test_a_restarted_stream_continues_with_the_very_next_batch(corpus):
    whole, part = _batches(corpus), _batches(corpus, workers=3)  # the batches do not depend on the workers
    try:
        expected = [whole.next_batch()["input_ids"] for _ in range(24)]  # ~12 groups of 64 documents
        for b in expected[:12]:
            assert torch.equal(part.next_batch()["input_ids"], b)
        state = part.state_dict()
        part.close()
        again = _batches(corpus, workers=2)
        again.load_state_dict(state)
        for b in expected[12:]:
            assert torch.equal(again.next_batch()["input_ids"], b)
        again.close()
        seen = torch.cat(expected).flatten()
        assert len(np.unique(seen.numpy())) > 10  # real text, not padding
    finally:
        whole.close()
        part.close()


def test_epochs_follow_one_another_in_a_new_order_whatever_the_workers(corpus, tmp_path):
    from lmlab.tokenizer import load_tokenizer

    small = tmp_path / "small.txt"
    small.write_text("\n".join(f"document {i} " + " ".join(WORDS[: 1 + i % 11]) for i in range(150)) + "\n")
    tok = load_tokenizer(corpus / "tok")
    objective = stream_objective(ObjectiveConfig("clm", 64), tok)
    spec = StreamSpec([str(small)], "line", "text", False, str(corpus / "tok"), tok.eos_id, 64, 0, 50)
    spec.buffer_docs, spec.group_docs = 16, 8
    runs = []
    for workers in (1, 3):
        batches = StreamBatches(objective, spec, 8, seed=0, workers=workers)
        try:
            runs.append([batches.next_batch()["input_ids"] for _ in range(12)])  # into a third epoch
            assert batches.position.epoch >= 2
        finally:
            batches.close()
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _config(corpus: Path, out: Path, **train) -> PretrainConfig:
    t = dict(max_steps=12, batch_size=4, log_every=1, eval_every=6, save_every=6, eval_batches=2, precision="fp32")
    return PretrainConfig(
        out=str(out),
        family="decoder",
        data=[str(corpus / "corpus.txt")],
        tokenizer=str(corpus / "tok"),
        seq_len=32,
        stream=True,
        model={"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64, "dropout": 0.0},
        train=TrainConfig(**{**t, **train}),
    )


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_an_interrupted_streamed_run_resumes_to_the_uninterrupted_losses_bit_for_bit(corpus, tmp_path):
    summary = pretrain(_config(corpus, tmp_path / "whole"))
    assert summary["steps"] == 12
    record = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert record["data"]["streamed"] is True and record["pretrain"]["stream"] is True

    class Killed(Exception):
        pass

    def kill_at_step_9(kind, info):
        if kind == "step" and info["step"] == 9:
            raise Killed

    with pytest.raises(Killed):
        pretrain(_config(corpus, tmp_path / "run"), kill_at_step_9)
    resumed = _config(corpus, tmp_path / "run")
    resumed.resume = True
    assert pretrain(resumed)["resumed"]
    assert _losses(tmp_path / "run") == _losses(tmp_path / "whole")


@pytest.mark.slow  # two torchrun processes, ~15 s
def test_two_processes_stream_the_one_process_batches(corpus, tmp_path):
    import os

    base = [
        sys.executable, "-m", "lmlab", "pretrain", "--family", "decoder", "--stream", "--data",
        str(corpus / "corpus.txt"), "--tokenizer", str(corpus / "tok"), "--seq-len", "32", "--max-steps", "6",
        "--batch-size", "4", "--log-every", "1", "--precision", "fp32", "--model-set", "n_layers=1",
        "--model-set", "d_model=32", "--model-set", "n_heads=2", "--model-set", "d_ff=64", "--model-set", "dropout=0.0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="100")
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        run = subprocess.run([*base, "--out", str(tmp_path / name), *extra], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)


def test_what_cannot_stream_is_refused(corpus):
    from lmlab.tokenizer import load_tokenizer

    with pytest.raises(ConfigError, match="--stream packs a token stream; mlm-nsp pairs segments"):
        stream_objective(ObjectiveConfig("mlm-nsp", 64), load_tokenizer(corpus / "tok"))
