"""Training on several processes (lmlab.train.distributed): two gloo processes on this CPU against one
process with the same global batch; the precision choice on both CPU kinds; the launcher; bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from lmlab.cli.pretrain import torchrun_command
from lmlab.config import preset
from lmlab.errors import ConfigError
from lmlab.pretrain import PretrainConfig, pretrain
from lmlab.settings import TrainConfig
from lmlab.train import distributed, sharded
from lmlab.train.trainer import precision_choice

TINY = {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_ff": 64, "dropout": 0.0}
WORKER = Path(__file__).with_name("distributed_worker.py")
EP_WORKER = Path(__file__).with_name("expert_parallel_worker.py")
AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"})
EPYC = frozenset({"avx2"})


def _tokenizer(tmp_path: Path, corpus: Path, family: str) -> str:
    """One tokenizer for every run of a test, trained once."""
    from lmlab.data.corpus import read_documents
    from lmlab.families import FAMILIES
    from lmlab.tokenizer import train_tokenizer

    folder = tmp_path / f"tok-{family}"
    if not folder.exists():
        train_tokenizer(FAMILIES[family].tokenizer_kind, read_documents(corpus, doc_sep="blank"), 400).save(folder)
    return str(folder)


def _config(tmp_path, corpus, out, family="decoder", **train) -> PretrainConfig:
    t = dict(max_steps=5, batch_size=4, eval_every=100, save_every=100, log_every=1, warmup_steps=2, eval_batches=2)
    # float32 on every CPU kind: a rank's half batch rounds differently from the whole one, which bf16
    # autocast (auto's choice with AMX / AVX-512-bf16) lifts from 1e-7 to 1e-4, above the 1e-5 compared
    t.update({"precision": "fp32", **train})
    return PretrainConfig(
        out=str(tmp_path / out),
        family=family,
        data=[str(corpus)],
        doc_sep="blank",
        tokenizer=_tokenizer(tmp_path, corpus, family),
        seq_len=32,
        cache_dir=str(tmp_path / "cache"),
        model=dict(TINY),
        train=TrainConfig(**t),
    )


def _losses(run: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="100")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(pc: PretrainConfig, tmp_path: Path, name: str, nproc: int = 2, stop: int | None = None):
    """Run tests/distributed_worker.py on `nproc` gloo processes; the completed process."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(pc.to_dict()))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER), str(path)
    ]  # fmt: skip
    command += [str(stop)] if stop is not None else []
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=_env())


@pytest.mark.parametrize(
    "family, accum, parallel",
    [
        ("decoder", 1, "ddp"),
        ("encoder", 2, "ddp"),  # BERT: masked-token counts differ between the ranks' halves
        ("decoder", 2, "fsdp"),
        pytest.param("encoder", 1, "fsdp", marks=pytest.mark.slow),  # ddp's BERT and fsdp's GPT cover both halves
    ],
)
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, corpus, family, accum, parallel):
    one = _config(tmp_path, corpus, "one", family, grad_accum=accum)
    pretrain(one)
    two = _config(tmp_path, corpus, "two", family, grad_accum=accum, parallel=parallel)
    done = _torchrun(two, tmp_path, "two")
    assert done.returncode == 0, done.stderr[-3000:]
    reference, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(got) == len(reference) == 5
    assert got == pytest.approx(reference, abs=1e-5, rel=0)
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["distributed"] == {"parallel": parallel, "world_size": 2, "backend": "gloo"}
    # rank 0 alone wrote the metrics (one record per step) and the model folder
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == len(
        (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    )
    import lmlab

    a, b = lmlab.load(tmp_path / "one"), lmlab.load(tmp_path / "two")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
    torch.manual_seed(one.train.seed)  # the weights both runs started from: training moved them
    start = lmlab.Model(a.config)
    assert max((p - q).abs().max().item() for p, q in zip(start.parameters(), b.parameters())) > 1e-3


@pytest.mark.parametrize(
    "parallel", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"]
)  # fsdp's gathers and reshards the more; the expert-parallel test resumes a ddp run on one process
def test_a_two_process_run_stopped_past_a_checkpoint_resumes_on_two_or_one_process(tmp_path, corpus, parallel):
    def config(out, **kw):
        return _config(tmp_path, corpus, out, max_steps=6, save_every=3, parallel=parallel, collective_timeout=10, **kw)

    straight = _torchrun(config("straight"), tmp_path, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = _losses(tmp_path / "straight")

    stopped = _torchrun(config("stopped"), tmp_path, "stopped", stop=4)  # rank 0 dies after step 4
    assert stopped.returncode != 0
    # the other rank does not hang: its next collective fails with a message naming the rank and the step
    assert "rank 1 of 2, step 5: a collective failed" in stopped.stderr
    step3 = tmp_path / "stopped" / "checkpoints" / "step-00000003"
    if parallel == "fsdp":  # sharded (torch.distributed.checkpoint): each rank wrote its shard
        assert sorted(p.name for p in (step3 / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(tmp_path / "stopped", tmp_path / "stopped-one")

    again = config("stopped")
    again.resume = True
    resumed = _torchrun(again, tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(tmp_path / "stopped") == pytest.approx(reference, abs=1e-6, rel=0)

    alone = config("stopped-one")
    alone.resume, alone.train.parallel = True, "none"
    summary = pretrain(alone)
    assert summary["resumed"] and summary["steps"] == 6
    assert _losses(tmp_path / "stopped-one") == pytest.approx(reference, abs=1e-5, rel=0)


def test_background_sharded_checkpoints_reshard_from_one_process_onto_two(tmp_path, corpus):
    """A sharded checkpoint one process wrote in the background resumes on two FSDP processes (weights
    and optimizer state resharded), and a two-process run saving in the background trains as one."""

    def config(out, **kw):
        return _config(tmp_path, corpus, out, max_steps=6, save_every=3, checkpoint_format="sharded", **kw)

    pretrain(config("one", async_save=True))
    reference = _losses(tmp_path / "one")
    (tmp_path / "one" / "checkpoints" / "latest").write_text("step-00000003\n")  # as if stopped after step 3
    later = config("one", parallel="fsdp", async_save=True)
    later.resume = True
    done = _torchrun(later, tmp_path, "later")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(tmp_path / "one") == pytest.approx(reference, abs=1e-5, rel=0)
    step6 = tmp_path / "one" / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in (step6 / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    import lmlab

    a, b = lmlab.load(step6), lmlab.load(tmp_path / "one")  # the shards read back whole, in one process
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_lmlab_pretrain_nproc_launches_torchrun(tmp_path, corpus):
    pc = _config(tmp_path, corpus, "cli", max_steps=2)
    command = [
        sys.executable, "-m", "lmlab", "pretrain", "--data", str(corpus), "--doc-sep", "blank",
        "--family", "decoder", "--tokenizer", pc.tokenizer, "--seq-len", "32", "--out", str(tmp_path / "cli"),
        "--max-steps", "2", "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--nproc", "2",
        *[x for k, v in TINY.items() for x in ("--model-set", f"{k}={v}")],
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.distributed.run" in done.stdout and "--parallel ddp" in done.stdout
    assert done.stdout.count("lmlab pretrain: family=decoder") == 1  # only rank 0 prints
    assert "precision: fp32" in done.stdout or "precision: bf16" in done.stdout
    assert json.loads((tmp_path / "cli" / "run.json").read_text())["distributed"]["world_size"] == 2


def test_a_batch_that_does_not_divide_among_the_processes_is_refused(tmp_path, corpus):
    with pytest.raises(ConfigError, match="batch_size 3 .* does not divide among 2 processes"):
        distributed.check_batch(3, distributed.World(0, 2))
    pc = _config(tmp_path, corpus, "odd", batch_size=3, parallel="ddp")
    done = _torchrun(pc, tmp_path, "odd")
    assert done.returncode != 0
    # every rank says why, and nothing waits for a collective
    assert done.stderr.count("does not divide among 2 processes") == 2


def test_resuming_a_checkpoint_of_another_model_fails_on_every_rank_without_a_hang(tmp_path, corpus):
    pretrain(_config(tmp_path, corpus, "other", max_steps=2, save_every=2))  # a 2-layer model's checkpoint
    pc = _config(tmp_path, corpus, "other", max_steps=4, parallel="ddp", collective_timeout=30)
    pc.model["n_layers"] = 3
    pc.resume = True
    done = _torchrun(pc, tmp_path, "other")
    assert done.returncode != 0
    assert done.stderr.count("describes a different model") == 2, done.stderr[-3000:]


def test_parallel_ddp_without_torchrun_says_how_to_launch(tmp_path, corpus, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        pretrain(_config(tmp_path, corpus, "no-torchrun", parallel="ddp"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="add --parallel ddp"):
        pretrain(_config(tmp_path, corpus, "no-flag"))


def test_the_torchrun_command_drops_nproc_and_asks_for_ddp():
    cmd = torchrun_command(["pretrain", "--family", "decoder", "--nproc", "2", "--out", "x"], 2)
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[5:] == ["-m", "lmlab", "pretrain", "--family", "decoder", "--out", "x", "--parallel", "ddp"]
    kept = torchrun_command(["pretrain", "--nproc=4", "--parallel", "ddp"], 4)
    assert kept.count("--parallel") == 1 and "--nproc=4" not in kept


def test_shards_are_the_rows_of_the_global_batch_and_weights_restore_the_global_mean():
    labels = torch.tensor([[1, -100, 2, 3], [-100, -100, 4, -100], [5, 6, 7, 8], [9, -100, -100, -100]])
    full = {"input_ids": torch.arange(16).view(4, 4), "labels": labels}
    parts = [distributed.shard(full, distributed.World(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), full["input_ids"])
    # masked LM: 4 and 5 labelled tokens of 9; the weighted means average to the global mean
    weights = [distributed.loss_weight(full, p, distributed.World(r, 2), shifts=False) for r, p in enumerate(parts)]
    assert weights == pytest.approx([2 * 4 / 9, 2 * 5 / 9])
    values = torch.randn(4, 4)
    means = [values[r * 2 : r * 2 + 2][p["labels"] != -100].mean() for r, p in enumerate(parts)]
    averaged = sum(w * m for w, m in zip(weights, means)) / 2
    assert averaged == pytest.approx(values[labels != -100].mean().item(), abs=1e-6)


def test_precision_auto_is_bf16_on_cpus_with_native_bf16_and_fp32_on_avx2():
    cpu = torch.device("cpu")
    amx = precision_choice("auto", cpu, AMX)
    assert amx["precision"] == "bf16" and "AMX" in amx["why"] and "amx_bf16" in amx["cpu_flags"]
    assert precision_choice("auto", cpu, frozenset({"avx512_bf16"}))["precision"] == "bf16"
    epyc = precision_choice("auto", cpu, EPYC)
    assert epyc["precision"] == "fp32" and epyc["cpu_flags"] == ["avx2"]
    assert precision_choice("fp32", cpu, AMX)["precision"] == "fp32"  # asked for: kept
    assert precision_choice("bf16", cpu, EPYC)["precision"] == "bf16"


def test_the_precision_choice_is_stored_in_run_json(tmp_path, corpus):
    pretrain(_config(tmp_path, corpus, "prec", max_steps=1, precision="auto"))
    run = json.loads((tmp_path / "prec" / "run.json").read_text())
    assert run["precision"] == precision_choice("auto", torch.device("cpu"))
    assert run["distributed"] == {"parallel": "none", "world_size": 1, "backend": None}
    assert asdict(TrainConfig())["parallel"] == "none"


@pytest.mark.parametrize(
    "kind", [pytest.param("top2", marks=pytest.mark.slow), "fine-grained", "switch-capacity", "moe++"]
)  # moe++ routes top-2 too
def test_an_expert_parallel_moe_layer_equals_the_one_process_layer(tmp_path, kind):
    out = tmp_path / "ep.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(EP_WORKER)]
    done = subprocess.run(command + [kind, str(out)], capture_output=True, text=True, timeout=240, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["chosen"][result["unused"]] == 0  # an expert that gets no token
    assert result["local_experts"] * 2 == result["experts"]
    if kind == "switch-capacity":
        assert result["dropped"] > 0  # tokens over capacity were dropped, the same way on both sides
    assert len(result["diffs"]) >= 8  # outputs and every parameter's gradient, on both ranks
    worst = max(result["diffs"].items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-6, worst


def test_expert_parallelism_needs_a_number_of_experts_the_ranks_divide():
    from lmlab.train.expert_parallel import experts_per_rank

    assert experts_per_rank(8, 2) == 4
    with pytest.raises(ConfigError, match="over 3 ranks .* the layer has 8"):
        experts_per_rank(8, 3)


def test_switch_with_router_jitter_on_two_expert_parallel_processes_trains_as_one(tmp_path, corpus):
    """switch-tiny's jitter (0.01) multiplies the router input by noise: every rank draws it for the
    global batch and keeps its rows, so two expert-parallel processes give the one-process losses."""

    def config(out, **kw):
        pc = _config(tmp_path, corpus, out, **kw)
        pc.preset, pc.model = "switch-tiny", {**TINY, "moe_experts": 4}
        return pc

    assert preset("switch-tiny").moe_jitter == 0.01
    pretrain(config("one"))
    reference = _losses(tmp_path / "one")
    run = _torchrun(config("run", parallel="ddp", expert_parallel=2), tmp_path, "run")
    assert run.returncode == 0, run.stderr[-3000:]
    assert _losses(tmp_path / "run") == pytest.approx(reference, abs=1e-5, rel=0)


def test_router_noise_drawn_for_the_global_batch_is_the_one_process_noise():
    from lmlab.model.moe.router import TokenChoiceRouter

    cfg = preset("switch-tiny", d_model=8)
    router = TokenChoiceRouter(cfg).train()
    x = torch.ones(12, 8)
    torch.manual_seed(0)
    whole = router._noise(x, "jitter")
    parts = []
    for rank in range(3):
        router.noise_shard = (rank, 3)
        torch.manual_seed(0)
        parts.append(router._noise(x[4 * rank : 4 * rank + 4], "jitter"))
    assert torch.equal(torch.cat(parts), whole)
    assert (whole - 1).abs().max() <= 0.01 and whole.std() > 0


@pytest.mark.parametrize(
    "parallel, nproc",
    [
        ("ddp", 2),
        ("fsdp", 2),
        pytest.param("fsdp", 4, marks=pytest.mark.slow),
        pytest.param("ddp", 4, marks=pytest.mark.slow),
    ],
)
def test_experts_sharded_over_pairs_train_as_one_process_and_reshard(tmp_path, corpus, parallel, nproc):
    """Experts sharded over pairs of processes, the load-balancing loss counting every rank's tokens
    (moe_stats global, the default), as one process does. With 4 processes there are two copies of each expert:
    DDP sums their gradients; under FSDP2 each expert layer is sharded over its copies, the rest over
    every rank. The losses and final weights are one process's. The sharded checkpoint resumes on
    two processes (a different mesh when 4 wrote it) and on one plain process."""
    moe = dict(ffn="moe", moe_experts=4, moe_top_k=2, moe_aux_weight=0.05)

    def config(out, **kw):
        pc = _config(tmp_path, corpus, out, max_steps=6, save_every=3, **kw)
        pc.model.update(moe)
        return pc

    pretrain(config("one"))
    reference = _losses(tmp_path / "one")
    run = _torchrun(config("run", parallel=parallel, expert_parallel=2), tmp_path, "run", nproc=nproc)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _losses(tmp_path / "run") == pytest.approx(reference, abs=1e-5, rel=0)
    assert sharded.is_sharded_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000003")
    import lmlab

    a, b = lmlab.load(tmp_path / "one"), lmlab.load(tmp_path / "run")  # every expert, gathered whole
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name

    for name, procs in (("two", 2), ("alone", 1)):
        if procs == nproc:
            continue  # the same mesh again: the four-process runs resume on a different one
        shutil.copytree(tmp_path / "run", tmp_path / name)
        (tmp_path / name / "checkpoints" / "latest").write_text("step-00000003\n")
        later = config(name, **(dict(parallel=parallel, expert_parallel=2) if procs == 2 else {}))
        later.resume = True
        if procs == 1:
            assert pretrain(later)["resumed"]
        else:
            done = _torchrun(later, tmp_path, name, nproc=procs)
            assert done.returncode == 0, done.stderr[-3000:]
        assert _losses(tmp_path / name) == pytest.approx(reference, abs=1e-5, rel=0), name


def test_expert_parallel_settings_that_cannot_work_are_refused():
    from lmlab.config import preset

    moe = preset("gpt2-tiny").replace(ffn="moe", moe_experts=4)
    distributed.check_expert_parallel(2, distributed.World(0, 2), moe)
    distributed.check_expert_parallel(2, distributed.World(0, 4), moe)  # two groups of two
    with pytest.raises(ConfigError, match="must divide the number of processes"):
        distributed.check_expert_parallel(4, distributed.World(0, 6), moe)
    with pytest.raises(ConfigError, match="must divide the number of processes"):
        distributed.check_expert_parallel(4, distributed.World(0, 2), moe)
    with pytest.raises(ConfigError, match="over 3 ranks .* the layer has 4"):
        distributed.check_expert_parallel(3, distributed.World(0, 3), moe)
    with pytest.raises(ConfigError, match="needs a model with MoE layers"):
        distributed.check_expert_parallel(2, distributed.World(0, 2), preset("gpt2-tiny"))
    with pytest.raises(ConfigError, match="runs with --parallel ddp or fsdp"):
        TrainConfig(max_steps=1, expert_parallel=2).validate()


@pytest.mark.slow
def test_moe_load_balancing_from_every_ranks_counts_matches_one_process_and_local_counts_do_not(tmp_path, corpus):
    moe = dict(ffn="moe", moe_experts=4, moe_top_k=2, moe_aux_weight=0.05)

    def config(out, **kw):
        pc = _config(tmp_path, corpus, out, **kw)
        pc.model.update(moe)
        return pc

    pretrain(config("one"))
    reference = _losses(tmp_path / "one")
    for stats in ("global", "local"):
        done = _torchrun(config(stats, parallel="ddp", moe_stats=stats), tmp_path, stats)
        assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(tmp_path / "global") == pytest.approx(reference, abs=1e-5, rel=0)
    assert max(abs(a - b) for a, b in zip(_losses(tmp_path / "local"), reference)) > 1e-5
