"""Model folders: lmlab's own format round-trips, and bad folders fail with one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import padded_batch
from safetensors.torch import save_file

import lmlab
from lmlab import CheckpointError, ConfigError, ModelConfig


@pytest.mark.parametrize("name", ["bert-tiny", "gpt2-tiny", "t5-tiny", "bart-tiny", "prefix-lm-tiny"])
def test_lmlab_format_round_trip_keeps_logits(name, tmp_path):
    torch.manual_seed(0)
    model = lmlab.Model(lmlab.preset(name, n_layers=1, vocab_size=99)).eval()
    model.save_pretrained(tmp_path / name)
    back = lmlab.load(tmp_path / name)
    assert back.config == model.config
    ids, mask = padded_batch([6, 4], pad_id=model.config.pad_token_id or 0)
    kw = {"decoder_input_ids": ids[:, :3]} if model.config.family == "encoder-decoder" else {}
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask, **kw).logits, back(ids, attention_mask=mask, **kw).logits)


def test_save_writes_no_temporary_files(tmp_path):
    lmlab.Model(lmlab.preset("gpt2-tiny", n_layers=1)).save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_prefix_lm_refuses_hf_export_and_says_why(tmp_path):
    model = lmlab.Model(lmlab.preset("prefix-lm-tiny", n_layers=1))
    with pytest.raises(ConfigError, match="no transformers counterpart"):
        model.save_pretrained(tmp_path / "x", format="hf")
    assert not (tmp_path / "x").exists()


def test_hf_export_refuses_a_config_transformers_cannot_express(tmp_path):
    model = lmlab.Model(lmlab.preset("gpt2-tiny", n_layers=1, position="rope"))
    with pytest.raises(ConfigError, match="position='rope'"):
        model.save_pretrained(tmp_path / "x", format="hf")


def test_folder_without_config_names_the_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no config\.json.*found: model\.safetensors"):
        lmlab.load(tmp_path)


def test_unknown_model_type_lists_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'falcon' is not supported; lmlab reads bert"):
        lmlab.load(tmp_path)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForMultipleChoice"]})
    )
    with pytest.raises(CheckpointError, match="BertForMultipleChoice"):
        lmlab.load(tmp_path)


def test_invalid_json_reports_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "bert",\n  oops\n}')
    with pytest.raises(CheckpointError, match="line 3"):
        lmlab.load(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(hf_folder):
    folder, _ = hf_folder("GPT2LMHeadModel")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_embd"] = 48  # the weights are 32 wide
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'transformer\.wte\.weight' has shape "
        r"\(99, 32\), but config\.json implies \(99, 48\)",
    ):
        lmlab.load(folder)


def test_missing_tensor_is_named(hf_folder):
    folder, _ = hf_folder("BertForMaskedLM")
    state = lmlab.io.read_weights(folder)[0]
    del state["cls.predictions.bias"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'cls.predictions.bias' is missing"):
        lmlab.load(folder)


class _NotATensor:
    pass


def test_pickle_that_is_not_weights_only_is_refused(hf_folder):
    folder, _ = hf_folder("GPT2LMHeadModel")
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        torch.save({"weight": torch.zeros(2), "payload": _NotATensor()}, f)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a weights-only checkpoint"):
        lmlab.load(folder)


def test_corrupt_safetensors_is_reported(hf_folder):
    folder, _ = hf_folder("GPT2LMHeadModel")
    (folder / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        lmlab.load(folder)


def test_offline_hub_id_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("huggingface_hub")
    with pytest.raises(CheckpointError, match="offline"):
        lmlab.load("some-org/some-model-that-is-not-here")


def test_lmlab_config_with_unknown_field_is_refused(tmp_path):
    model = lmlab.Model(lmlab.preset("gpt2-tiny", n_layers=1))
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["model"]["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unknown ModelConfig field.*n_layer"):
        lmlab.load(tmp_path)


def test_convert_cli_round_trip(hf_folder, tmp_path):
    from lmlab.cli import main

    folder, theirs = hf_folder("BartForConditionalGeneration")
    assert main(["convert", str(folder), str(tmp_path / "ours"), "--to", "lmlab"]) == 0
    assert "lmlab_format" in json.loads((tmp_path / "ours" / "config.json").read_text())
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "theirs"), "--to", "hf"]) == 0
    from conftest import transformers

    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "theirs").eval()
    ids, mask = padded_batch([5, 3], pad_id=1)
    with torch.no_grad():
        a = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits
        b = back(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-6


def test_config_rejects_bad_values_by_field():
    for kw, field in [
        ({"family": "gpt"}, "family"),
        ({"n_heads": 5}, "n_heads"),
        ({"activation": "tanh"}, "activation"),
        ({"heads": ("mlm",)}, "heads"),
        ({"n_kv_heads": 5, "n_heads": 4, "d_model": 32}, "n_kv_heads"),
        ({"dropout": 1.5}, "dropout"),
        ({"ffn": "moe-nope"}, "ffn"),
    ]:
        with pytest.raises(ConfigError, match=f"ModelConfig.{field}"):
            ModelConfig(**kw)
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'"):
        lmlab.preset("gpt5")
