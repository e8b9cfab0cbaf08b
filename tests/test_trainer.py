"""The trainer: exact resume, crash-safe checkpoints, budgets, metrics and plots; `lmlab pretrain` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lmlab
from lmlab.errors import ConfigError, DataError
from lmlab.pretrain import PretrainConfig, pretrain
from lmlab.train import TrainConfig
from lmlab.train.optim import lr_factor, param_groups

TINY = {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_ff": 64}


@pytest.fixture
def corpus(tmp_path):
    from lmlab.data.corpus import demo_corpus, read_documents

    docs = [d for _, d in zip(range(40), read_documents(demo_corpus("kjv"), doc_sep="blank"))]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _config(tmp_path, corpus, out="run", family="decoder", **train) -> PretrainConfig:
    t = dict(max_steps=6, batch_size=4, eval_every=3, save_every=3, log_every=1, warmup_steps=2, eval_batches=2)
    t.update(train)
    return PretrainConfig(
        out=str(tmp_path / out),
        family=family,
        data=[str(corpus)],
        doc_sep="blank",
        vocab_size=400,
        seq_len=32,
        cache_dir=str(tmp_path / "cache"),
        model=dict(TINY),
        train=TrainConfig(**t),
    )


def _losses(run) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"
    ]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_resume_continues_with_identical_losses(tmp_path, corpus, family):
    from lmlab.data.corpus import read_documents
    from lmlab.families import FAMILIES
    from lmlab.tokenizer import train_tokenizer

    # one tokenizer for both runs: the property under test is the trainer's, not the tokenizer trainer's
    train_tokenizer(FAMILIES[family].tokenizer_kind, read_documents(corpus, doc_sep="blank"), 400).save(
        tmp_path / "tok"
    )

    def config(out):
        pc = _config(tmp_path, corpus, out, family)
        pc.tokenizer = str(tmp_path / "tok")
        return pc

    pretrain(config("straight"))
    reference = _losses(tmp_path / "straight")
    assert len(reference) == 6

    def stop_after_four(kind, info):  # dies after step 4, past the step-3 checkpoint
        if kind == "step" and info["step"] == 4:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        pretrain(config("interrupted"), on_event=stop_after_four)
    resumed = config("interrupted")
    resumed.resume = True
    summary = pretrain(resumed)
    assert summary["resumed"] and summary["steps"] == 6
    assert _losses(tmp_path / "interrupted") == reference  # bit-identical, dropout and masking included


def test_crash_while_checkpointing_keeps_previous_checkpoint(tmp_path, corpus, monkeypatch):
    import lmlab.train.checkpoint as ck

    pretrain(_config(tmp_path, corpus, max_steps=3))
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # write half a file, then die
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise _Interrupt

    monkeypatch.setattr(ck.torch, "save", dying_save)
    again = _config(tmp_path, corpus, max_steps=6)
    again.resume = True
    with pytest.raises(
        lmlab.CheckpointError, match=r"step 6: the checkpoint could not be written .*step-00000003 is intact"
    ):
        pretrain(again)
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the partial folder is gone
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    latest = ck.latest_checkpoint(run)
    assert torch.load(latest / "state.pt", weights_only=True)["step"] == 3
    assert lmlab.load(latest).config.n_layers == 1
    final = _config(tmp_path, corpus, max_steps=6)
    final.resume = True
    assert pretrain(final)["steps"] == 6
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_output_folder_is_a_loadable_model_with_metrics_and_plot(tmp_path, corpus):
    summary = pretrain(_config(tmp_path, corpus, "bert", "encoder", max_steps=4))
    run = tmp_path / "bert"
    model = lmlab.load(run)
    assert model.config.heads == ("mlm", "nsp") and model.config.vocab_size == 400
    assert (run / "loss.png").stat().st_size > 1000 and (run / "tokenizer.json").is_file()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert val and {"loss", "ppl", "accuracy", "nsp_accuracy"} <= set(val[-1])
    assert summary["val"]["ppl"] == pytest.approx(torch.tensor(summary["val"]["loss"]).exp().item(), rel=1e-6)


@pytest.mark.parametrize("family", ["encoder-decoder", "prefix-lm"])
def test_other_families_pretrain(tmp_path, corpus, family):
    summary = pretrain(_config(tmp_path, corpus, family, family, max_steps=2))
    assert summary["steps"] == 2 and summary["val"]["loss"] > 0
    assert lmlab.load(tmp_path / family).config.family == family


def test_token_budget_stops_training(tmp_path, corpus):
    summary = pretrain(_config(tmp_path, corpus, max_steps=None, max_tokens=4 * 32 * 5))
    assert summary["steps"] == 5 and summary["tokens"] == 640


def test_sequence_longer_than_the_model_is_refused(tmp_path, corpus):
    pc = _config(tmp_path, corpus)
    pc.model["max_seq_len"] = 16
    with pytest.raises(ConfigError, match="seq_len=32 is longer than the model's max_seq_len=16"):
        pretrain(pc)


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    pc = _config(tmp_path, empty)
    with pytest.raises(DataError, match="empty.txt: no documents"):
        pretrain(pc)


def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = lmlab.Model(lmlab.preset("gpt2-tiny", n_layers=1))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(
        names[id(p)].endswith("weight") and "norm" not in names[id(p)] and "embed" not in names[id(p)]
        for p in decay["params"]
    )
    assert {"tok_embed.weight", "decoder.pos_embed.weight", "decoder.final_norm.weight"} <= {
        names[id(p)] for p in no_decay["params"]
    }


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(500, 10, None, "cosine", 0.1) == 1.0  # time budget only: constant after warm-up


def test_cli_pretrain_with_yaml_and_flags(tmp_path, corpus, capsys):
    from lmlab.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"family: decoder\ndata: {corpus}\ndoc_sep: blank\nvocab_size: 400\nseq_len: 32\n"
        f"cache_dir: {tmp_path / 'cache'}\nmodel: {{n_layers: 1, d_model: 32, n_heads: 2, d_ff: 64}}\n"
        "train: {batch_size: 4, eval_every: 2, eval_batches: 1, max_steps: 50}\n"
    )
    assert main(["pretrain", "--config", str(cfg), "--max-steps", "2", "--out", str(tmp_path / "cli")]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    run = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert run["pretrain"]["train"]["max_steps"] == 2 and run["model"]["n_layers"] == 1
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "cli"),
                "--data",
                str(corpus),
                "--doc-sep",
                "blank",
                "--seq-len",
                "32",
                "--max-tokens",
                "500",
            ]
        )
        == 0
    )
    assert "perplexity" in capsys.readouterr().out
    cfg.write_text("family: decoder\ntrain: {batch_sise: 4}\n")
    assert main(["pretrain", "--config", str(cfg), "--max-steps", "1"]) == 2
    assert "unknown train setting(s) batch_sise" in capsys.readouterr().err


@pytest.mark.parametrize(
    "family,norm,lr", [("encoder", "post", 5e-4), ("decoder", "pre", 1e-3), ("encoder", "pre", 1e-3)]
)
def test_default_learning_rate_is_halved_for_post_ln_models(tmp_path, corpus, family, norm, lr):
    pc = _config(tmp_path, corpus, family=family, max_steps=1)
    pc.model["norm_placement"] = norm
    pretrain(pc)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model"]["norm_placement"] == norm and run["pretrain"]["train"]["lr"] == lr
    given = _config(tmp_path, corpus, "given", family=family, max_steps=1, lr=2e-3)
    pretrain(given)
    assert json.loads((tmp_path / "given" / "run.json").read_text())["pretrain"]["train"]["lr"] == 2e-3


def test_bf16_autocast_trains(tmp_path, corpus):
    summary = pretrain(_config(tmp_path, corpus, max_steps=2, precision="bf16"))
    assert summary["steps"] == 2 and math.isfinite(summary["val"]["loss"])


@pytest.mark.slow
def test_torch_compile_gives_the_same_losses(tmp_path, corpus):
    pretrain(_config(tmp_path, corpus, "eager", max_steps=3))
    pretrain(_config(tmp_path, corpus, "compiled", max_steps=3, compile=True))
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-4)


def test_fp16_trains_with_a_gradient_scaler_and_resumes_exactly(tmp_path, corpus):
    """float16 autocast (for GPUs without native bf16) scales the loss; the scaler's state is checkpointed."""
    pretrain(_config(tmp_path, corpus, "straight", precision="fp16"))
    reference = _losses(tmp_path / "straight")
    assert len(reference) == 6 and all(math.isfinite(x) for x in reference)
    state = torch.load(tmp_path / "straight" / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] > 1  # scaled: 2**16 at the start, halved on an overflow

    def stop_after_four(kind, info):
        if kind == "step" and info["step"] == 4:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        pretrain(_config(tmp_path, corpus, "cut", precision="fp16"), on_event=stop_after_four)
    again = _config(tmp_path, corpus, "cut", precision="fp16")
    again.resume = True
    assert pretrain(again)["steps"] == 6
    assert _losses(tmp_path / "cut") == reference


def test_auto_precision_on_a_gpu_that_only_emulates_bf16_is_fp32_and_offers_fp16(monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulation (a T4 or V100 says yes, and runs bf16 slower than
    fp32): lmlab asks for native bf16 only. The GPU is mocked; the choice is what is tested."""
    from lmlab.quantize import auto_dtype
    from lmlab.train.trainer import precision_choice

    for native, capability, want in ((False, (7, 5), "fp32"), (False, (6, 1), "fp32"), (True, (8, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n or including_emulation
        )
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        choice = precision_choice("auto", torch.device("cuda"))
        assert choice["precision"] == want, (native, capability, choice)
        assert ("--precision fp16" in choice["why"]) == (not native and capability[0] >= 7)
        assert auto_dtype("cuda") == (torch.bfloat16 if native else torch.float32)
        assert precision_choice("fp16", torch.device("cuda"))["precision"] == "fp16"
    with pytest.raises(lmlab.ConfigError, match="fp16 trains with a gradient scaler"):
        TrainConfig(max_steps=1, precision="fp16", parallel="fsdp").validate()
