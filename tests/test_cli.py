"""The command line: info reports the reference parameter counts; errors are one line, exit code 2."""

from __future__ import annotations

import pytest
import torch

import lmlab
from lmlab.cli import main
from lmlab.config import preset
from lmlab.info import model_stats


def test_info_gpt2_matches_transformers_parameter_count(capsys):
    assert main(["info", "gpt2"]) == 0
    assert "124,439,808" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name,count",
    [("gpt2", 124_439_808), ("bert-base", 110_106_428), ("t5-small", 60_506_624), ("roberta-base", 124_697_433)],
)
def test_preset_parameter_counts_equal_transformers(name, count):
    # transformers' counts for GPT2LMHeadModel, BertForPreTraining, T5ForConditionalGeneration, RobertaForMaskedLM
    assert model_stats(preset(name)).total_params == count


def test_gpt2_flops_per_token_follow_the_formula():
    s = model_stats(preset("gpt2"), context=1024)
    # 2 x (every Linear weight + the tied 50257 x 768 output projection) + 4 x layers x context x d_model
    linear = 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)
    assert s.flops_per_token == 2 * (linear + 50257 * 768) + 4 * 12 * 1024 * 768


def test_info_on_a_hf_folder(hf_folder, capsys):
    folder, model = hf_folder("BertForMaskedLM")
    assert main(["info", str(folder)]) == 0
    assert f"{sum(p.numel() for p in model.parameters()):,}" in capsys.readouterr().out


def test_unknown_model_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing" / "dir" / "x")]) == 2
    assert "error:" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """The README's main job, with 3 steps per model instead of 200."""
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "GPT: sampled continuation" in out and "And God said unto Moses," in out
    assert "BERT: fill-mask" in out and "probability" in out
    assert "The tiny BERT predicts" in out  # 3 steps: the note on the unigram plateau is shown
    assert (tmp_path / "demo" / "gpt" / "loss.png").is_file() and (
        tmp_path / "demo" / "bert" / "model.safetensors"
    ).is_file()


def test_generate_command_greedy_beams_sampling_and_stop(tiny_pretrained, capsys):
    gpt = str(tiny_pretrained["gpt"])
    assert main(["generate", "--model", gpt, "and the lord", "--max-new-tokens", "5"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("and the lord")
    assert (
        main(["generate", "--model", gpt, "and the lord", "--max-new-tokens", "5", "--beams", "3", "--num-return", "2"])
        == 0
    )
    assert capsys.readouterr().out.count("and the lord") == 2
    args = [
        "generate",
        "--model",
        gpt,
        "and the lord",
        "--max-new-tokens",
        "6",
        "--sample",
        "--top-k",
        "5",
        "--seed",
        "3",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == first  # a seed makes sampling reproducible
    assert main(["generate", "--model", gpt, "and the lord", "--max-new-tokens", "5", "--stream"]) == 0
    assert capsys.readouterr().out.strip() == greedy.strip()  # streamed piece by piece, the same text
    assert main(["generate", "--model", gpt, "x " * 70, "--max-new-tokens", "5"]) == 2
    assert "max_seq_len" in capsys.readouterr().err


def test_generate_in_bfloat16_decodes_with_bf16_weights(tiny_pretrained, capsys, monkeypatch):
    import lmlab.io

    loaded = []
    real_load = lmlab.io.load
    monkeypatch.setattr(lmlab.io, "load", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    gpt = str(tiny_pretrained["gpt"])
    assert main(["generate", "--model", gpt, "and the lord", "--max-new-tokens", "8", "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("and the lord") and len(text.split()) > 3
    assert {p.dtype for p in loaded[-1].parameters()} == {torch.bfloat16}


def test_fill_mask_command_lists_candidates_per_mask(tiny_pretrained, capsys):
    bert = str(tiny_pretrained["bert"])
    assert main(["fill-mask", "--model", bert, "the lord said unto [MASK]", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("0.") >= 3  # three probabilities
    assert main(["fill-mask", "--model", bert, "the [MASK] said unto [MASK]", "--top-k", "2"]) == 0
    assert "mask 2" in capsys.readouterr().out
    assert main(["fill-mask", "--model", bert, "no mask here"]) == 2
    assert "no [MASK]" in capsys.readouterr().err
    assert main(["fill-mask", "--model", str(tiny_pretrained["gpt"]), "the [MASK]"]) == 2


def test_keep_freed_memory_applies_on_glibc_and_can_be_turned_off():
    import os
    import platform
    import subprocess
    import sys

    code = "import lmlab; print(lmlab.keep_freed_memory(), lmlab.keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if k != "LMLAB_MALLOC"}
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    off = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**env, "LMLAB_MALLOC": "default"}
    ).stdout
    expected = "True True" if platform.libc_ver()[0] == "glibc" else "False False"
    assert on.split() == expected.split() and off.split() == ["False", "False"]


def test_flags_are_generated_from_the_settings_dataclasses():
    """A setting is one field: its flag, type, help and choices come from the dataclass."""
    import dataclasses

    from lmlab.cli import build_parser
    from lmlab.settings import FinetuneConfig, TrainConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    pretrain = {a.dest: a for a in sub["pretrain"]._actions}
    for f in dataclasses.fields(TrainConfig):
        action = pretrain[f"train.{f.name}"]
        assert action.option_strings == ["--" + f.name.replace("_", "-")] and f.metadata["help"] in action.help
    assert pretrain["train.schedule"].choices == ("cosine", "linear", "constant", "warmup-stable-decay")
    assert pretrain["model.moe_router"].choices == ("topk", "noisy", "dense", "expert-choice", "soft")
    finetune = {a.dest: a for a in sub["finetune"]._actions}
    assert set(finetune["task"].choices) == {"classify", "ner", "qa", "seq2seq", "chat"}  # from the task registry
    assert {f.name for f in dataclasses.fields(FinetuneConfig)} <= set(finetune)


def test_every_commands_help_renders():
    """argparse %-formats help text: a literal '%' in a setting's help (\"a 95% interval\") broke --help."""
    from lmlab.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, parser in sub.items():
        text = parser.format_help()
        assert "usage:" in text, name
    assert "95% interval" in sub["compare"].format_help()


def test_help_starts_without_importing_torch():
    import subprocess
    import sys

    code = "import sys; from lmlab.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_finetune_reads_a_yaml_config_and_flags_override_it(tmp_path):
    from lmlab.cli import build_parser
    from lmlab.cli.finetune import finetune_config

    cfg = tmp_path / "ft.yaml"
    cfg.write_text("task: ner\nmodel: runs/bert\ntrain: train.conll\nout: runs/ner\nepochs: 2\nlr: 0.001\n")
    fc = finetune_config(build_parser().parse_args(["finetune", "--config", str(cfg), "--lr", "3e-4"]))
    assert (fc.task, fc.model, fc.epochs, fc.lr) == ("ner", "runs/bert", 2.0, 3e-4)
    with pytest.raises(lmlab.ConfigError, match="fine-tuning needs --train, --out"):
        finetune_config(build_parser().parse_args(["finetune", "--task", "qa", "--model", "m"]))
    cfg.write_text("task: ner\nepoch: 2\n")
    with pytest.raises(lmlab.ConfigError, match=r"ft.yaml: unknown setting\(s\) epoch"):
        finetune_config(build_parser().parse_args(["finetune", "--config", str(cfg)]))
    cfg.write_text("task: ner\nmodel: m\ntrain: t\nout: o\nprecision: fp8\n")
    with pytest.raises(lmlab.ConfigError, match="precision 'fp8' is unknown; expected one of auto, fp32, bf16, fp16"):
        finetune_config(build_parser().parse_args(["finetune", "--config", str(cfg)]))
    fc = finetune_config(build_parser().parse_args(["finetune", "--config", str(cfg), "--precision", "fp32"]))
    assert fc.precision == "fp32"
