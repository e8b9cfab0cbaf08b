"""Sharded checkpoints (lmlab.train.sharded, torch.distributed.checkpoint) in one process: exact
resume, background saves, a crash mid-write, `lmlab convert` to a transformers folder, and a
checkpoint that would unpickle code. The multi-process cases are in test_distributed.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import lmlab
from lmlab.errors import CheckpointError, ConfigError
from lmlab.pretrain import PretrainConfig, pretrain
from lmlab.settings import TrainConfig
from lmlab.train import sharded
from lmlab.train.checkpoint import write_manifest

TOKENIZER: list[str] = []  # set by the `tokenizer` fixture
TINY = {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_ff": 64, "dropout": 0.0}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus) -> str:
    from lmlab.data.corpus import read_documents
    from lmlab.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer("bpe", read_documents(corpus, doc_sep="blank"), 300).save(folder)
    return str(folder)


def _config(tmp_path: Path, corpus: Path, out: str, **train) -> PretrainConfig:
    t = dict(max_steps=6, batch_size=4, eval_every=100, save_every=3, log_every=1, warmup_steps=2, eval_batches=2)
    t.update(train)
    return PretrainConfig(
        out=str(tmp_path / out),
        family="decoder",
        data=[str(corpus)],
        doc_sep="blank",
        tokenizer=TOKENIZER[0],
        seq_len=32,
        cache_dir=str(tmp_path / "cache"),
        model=dict(TINY),
        train=TrainConfig(**t),
    )


def _losses(run: Path) -> list[float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module", autouse=True)
def reference(tmp_path_factory, corpus, tokenizer):
    """An uninterrupted 6-step run with full checkpoints, and its losses."""
    TOKENIZER[:] = [tokenizer]
    tmp = tmp_path_factory.mktemp("reference")
    pretrain(_config(tmp, corpus, "full"))
    return tmp, _losses(tmp / "full")


def test_a_background_sharded_checkpoint_resumes_exactly_and_loads_as_a_model(tmp_path, corpus, reference):
    ref_dir, ref = reference
    pc = _config(tmp_path, corpus, "async", checkpoint_format="sharded", async_save=True)
    pretrain(pc)
    run = tmp_path / "async"
    assert _losses(run) == ref  # writing in the background does not touch training
    step3 = run / "checkpoints" / "step-00000003"
    assert sharded.is_sharded_checkpoint(step3) and (step3 / "dcp" / "__0_0.distcp").is_file()
    assert not (step3 / "model.safetensors").exists() and not (step3 / "optimizer.pt").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"

    # lmlab.load reads the last checkpoint as a model: the weights the run ended with
    final, last = lmlab.load(run), lmlab.load(run / "checkpoints" / "step-00000006")
    for (name, p), q in zip(final.named_parameters(), last.parameters()):
        assert torch.equal(p, q), name

    (run / "checkpoints" / "latest").write_text("step-00000003\n")  # as if stopped after step 3
    pc.resume = True
    summary = pretrain(pc)
    assert summary["resumed"] and summary["steps"] == 6
    assert _losses(run) == ref  # model, optimizer, schedule, data position and RNG: all restored


def test_a_full_checkpoint_resumes_into_a_sharded_run_and_back(tmp_path, corpus, reference):
    ref_dir, ref = reference
    run = tmp_path / "mixed"
    shutil.copytree(ref_dir / "full", run)
    (run / "checkpoints" / "latest").write_text("step-00000003\n")
    pc = _config(tmp_path, corpus, "mixed", checkpoint_format="sharded", save_every=1, keep_checkpoints=5)
    pc.resume = True
    pretrain(pc)  # from the full step-3 checkpoint; writes sharded ones at 4, 5 and 6
    assert _losses(run) == ref
    assert sharded.is_sharded_checkpoint(run / "checkpoints" / "step-00000004")
    (run / "checkpoints" / "latest").write_text("step-00000004\n")
    back = _config(tmp_path, corpus, "mixed", checkpoint_format="full", save_every=1, keep_checkpoints=5)
    back.resume = True
    pretrain(back)  # the sharded step-4 checkpoint, into a run that writes full ones
    assert _losses(run) == ref
    assert (run / "checkpoints" / "step-00000005" / "model.safetensors").is_file()


def test_a_crash_while_a_sharded_checkpoint_is_written_keeps_the_previous_one(tmp_path, corpus, reference, monkeypatch):
    _, ref = reference
    pc = _config(tmp_path, corpus, "crash", checkpoint_format="sharded")
    original = dcp.FileSystemWriter.write_data
    calls = {"n": 0}

    def write_then_die(self, plan, planner):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-6 save: the disk goes away mid-write
            raise OSError(28, "No space left on device")
        return original(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", write_then_die)
    with pytest.raises(CheckpointError, match=r"tmp-step-00000006/dcp: .*rank 0: OSError: .*No space left on device"):
        pretrain(pc)
    monkeypatch.undo()
    root = tmp_path / "crash" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000003"
    assert (root / ".tmp-step-00000006").is_dir() and not (root / "step-00000006").exists()
    pc.resume = True
    summary = pretrain(pc)
    assert summary["resumed"] and _losses(tmp_path / "crash") == ref
    assert not list(root.glob(".tmp-*"))  # the half-written folder is gone


def test_lmlab_convert_makes_a_transformers_folder_of_a_sharded_checkpoint(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    from lmlab.cli import main
    from lmlab.tokenizer import load_tokenizer

    pretrain(_config(tmp_path, corpus, "run", checkpoint_format="sharded", max_steps=3))
    ckpt, out = tmp_path / "run" / "checkpoints" / "step-00000003", tmp_path / "hf"
    assert main(["convert", str(ckpt), str(out), "--to", "hf"]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = lmlab.load(tmp_path / "run")  # the run's final model: the step-3 weights
    text = "and the lord said unto moses"
    ids = load_tokenizer(tmp_path / "run").encode(text)
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ids  # the run's tokenizer
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (ours(input_ids=x).logits - theirs(input_ids=x).logits).abs().max().item() <= 1e-5
    assert main(["convert", str(ckpt), str(tmp_path / "ours"), "--to", "lmlab"]) == 0
    again = lmlab.load(tmp_path / "ours")
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), again.parameters()))


class _Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


def test_a_sharded_checkpoint_that_pickles_objects_is_refused_without_running_them(tmp_path, corpus):
    pretrain(_config(tmp_path, corpus, "run", checkpoint_format="sharded", max_steps=3))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    from lmlab.train.optim import make_optimizer, make_scheduler

    model = lmlab.load(tmp_path / "run")
    optimizer = make_optimizer(model, 1e-3, 0.1, (0.9, 0.98))
    make_scheduler(optimizer, 2, 6, "cosine", 0.1)  # as the trainer's: it adds initial_lr
    view = sharded.dcp_view(model, optimizer, spread=False)
    _Payload.target = str(tmp_path / "pwned")
    view["optim"]["param_groups"][0]["lr"] = _Payload()  # a hyper-parameter that is code
    shutil.rmtree(ckpt / "dcp")
    dcp.save(view, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    write_manifest(ckpt)  # a forged checkpoint comes with a manifest that matches it
    pc = _config(tmp_path, corpus, "run", checkpoint_format="sharded", max_steps=4)
    pc.resume = True
    with pytest.raises(CheckpointError, match="step-00000003.*(Weights only|weights_only)"):
        pretrain(pc)
    assert not (tmp_path / "pwned").exists()


def test_a_missing_or_broken_shard_names_the_checkpoint(tmp_path, corpus):
    pretrain(_config(tmp_path, corpus, "run", checkpoint_format="sharded", max_steps=3))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    (ckpt / "dcp" / "__0_0.distcp").write_bytes(b"not a shard")
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: 11 bytes, the manifest says \d+: truncated"):
        lmlab.load(ckpt)
    pc = _config(tmp_path, corpus, "run", checkpoint_format="sharded", max_steps=4)
    pc.resume = True
    with pytest.raises(CheckpointError, match=r"no good checkpoint: .*__0_0.distcp: 11 bytes, the manifest says"):
        pretrain(pc)
    write_manifest(ckpt)  # the manifest agrees with the broken shard: the reader itself refuses it
    with pytest.raises(CheckpointError, match=r"step-00000003/dcp: not a readable sharded checkpoint"):
        lmlab.load(ckpt)
    with pytest.raises(CheckpointError, match="step-00000003: cannot restore the sharded checkpoint"):
        pretrain(pc)


def test_background_saves_need_the_sharded_format():
    with pytest.raises(ConfigError, match="async_save writes sharded checkpoints"):
        TrainConfig(max_steps=1, async_save=True).validate()
    assert TrainConfig(max_steps=1, parallel="fsdp").resolved_checkpoint_format() == "sharded"
    assert TrainConfig(max_steps=1, parallel="ddp", expert_parallel=2).resolved_checkpoint_format() == "sharded"
    assert TrainConfig(max_steps=1, parallel="ddp").resolved_checkpoint_format() == "full"
    TrainConfig(max_steps=1, parallel="fsdp", async_save=True).validate()
