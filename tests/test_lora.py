"""LoRA and DoRA fine-tuning through PEFT: only the adapters and the new head train, the folder is PEFT's
own format (PEFT reads it), lmlab.load merges it, `lmlab merge` / --merge write a plain folder that
exports to transformers; MoE experts take one adapter each; bad settings are named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import _sst_like

import lmlab
from lmlab.errors import ConfigError
from lmlab.finetune import FinetuneConfig, finetune, task_model

peft = pytest.importorskip("peft")


def _config(tiny_pretrained, tmp_path, name, family="gpt", **kw):
    train, dev = _sst_like(tmp_path / "train.tsv", 300, 0), _sst_like(tmp_path / "dev.tsv", 100, 1)
    base = dict(task="classify", model=str(tiny_pretrained[family]), train=str(train), eval=str(dev))
    base.update(out=str(tmp_path / name), epochs=3, lr=1e-2, batch_size=16, max_len=32, method="lora")
    return FinetuneConfig(**{**base, **kw})


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("method, family", [("lora", "bert"), ("dora", "gpt")])
def test_only_adapters_and_the_head_train_and_peft_reads_the_folder(method, family, tiny_pretrained, tmp_path):
    fc = _config(tiny_pretrained, tmp_path, method, family, method=method, merge=True)
    result = finetune(fc)
    out = tmp_path / method
    assert result["eval"]["accuracy"] >= 0.75  # the planted word, learnt through the adapters (0.89-0.92 here)
    assert result["trainable_params"] < result["total_params"] / 4
    # PEFT's files: the adapters and the new head, nothing of the frozen backbone
    saved = load_file(out / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in saved)
    heads = ("base_model.model.classifier.", "base_model.model.pooler.")
    assert all(("lora_" in k) or k.startswith(heads) for k in saved), sorted(saved)
    assert any("lora_magnitude_vector" in k for k in saved) == (method == "dora")
    adapter = json.loads((out / "adapter_config.json").read_text())
    pooled = ["classifier", "pooler"] if family == "bert" else ["classifier"]
    assert adapter["modules_to_save"] == pooled and adapter["use_dora"] == (method == "dora")
    assert adapter["base_model_name_or_path"] == str(tiny_pretrained[family].resolve())
    # tensor by tensor: the merged model differs from the base exactly where adapters were
    base, merged = lmlab.load(tiny_pretrained[family]), lmlab.load(out)
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    targets = ("attn.qkv.weight", "attn.out.weight", "ffn.up.weight", "ffn.down.weight")
    for name, value in merged_sd.items():
        if name.startswith(("classifier.", "pooler.")) or name not in base_sd:
            continue
        changed = not torch.equal(value, base_sd[name])
        assert changed == name.endswith(targets), name
    # PEFT itself reads the folder onto the task model: the same logits as lmlab.load's merge
    ids = torch.randint(5, base.config.vocab_size, (3, 12))
    if family == "bert":  # [CLS] first, as the classifier pools it
        ids[:, 0] = base.config.cls_token_id
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(task_model(base, "classify", ["0", "1"]), str(out)).eval()
        torch.testing.assert_close(_logits(theirs, ids), _logits(merged, ids), atol=1e-5, rtol=0)
    # --merge: a plain folder with the same logits, which transformers reads
    plain = lmlab.load(out / "merged")
    torch.testing.assert_close(_logits(plain, ids), _logits(merged, ids), atol=1e-5, rtol=0)
    assert not (out / "merged" / "adapter_config.json").exists()
    if family == "bert":  # lmlab exports BERT's classifier as BertForSequenceClassification
        transformers = pytest.importorskip("transformers")
        hf = tmp_path / "hf"
        lmlab.io.convert(out / "merged", hf, to="hf")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(hf).eval()
        with torch.no_grad():
            want = model(ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(want, _logits(merged, ids), atol=1e-4, rtol=0)


def test_moe_experts_take_one_adapter_each(tiny_pretrained, tmp_path):
    from conftest import tiny_config

    from lmlab.adapters import add_lora
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_pretrained["gpt"])
    cfg = tiny_config("gpt2-tiny", tok).replace(ffn="moe", moe_experts=4, moe_top_k=2)
    torch.manual_seed(0)
    model = lmlab.Model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, "lora", r=2, kinds=["experts"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("experts" in n and "lora_" in n for n in trainable)
    ranks = [p.shape[0] for n, p in model.named_parameters() if "lora_A" in n]
    assert ranks and all(r == 2 * 4 for r in ranks)  # rank 2 for each of the 4 experts
    ids = torch.randint(5, cfg.vocab_size, (2, 10))
    with torch.no_grad():  # lora_B starts at zero: the adapted model is the model
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    frozen = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(v, before[k.replace(".base_layer", "")]) for k, v in frozen.items() if k in before)


def test_bad_settings_are_named(tiny_pretrained, tmp_path, monkeypatch):
    from lmlab.adapters import targets_of

    model = lmlab.load(tiny_pretrained["gpt"])
    with pytest.raises(
        ConfigError, match="experts match.*no layer of this model; the kinds it has: qkv, out, up, down"
    ):
        targets_of(model, ["experts"])
    with pytest.raises(ConfigError, match="unknown kind"):
        targets_of(model, ["attention"])
    with pytest.raises(ConfigError, match="--merge merges adapters"):
        finetune(_config(tiny_pretrained, tmp_path, "full", method="full", merge=True))
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"lmlab\[peft\]"):
        finetune(_config(tiny_pretrained, tmp_path, "nopeft"))


def test_lora_chat_trains_the_added_tokens_rows_and_peft_on_the_transformers_base_agrees(tiny_pretrained, tmp_path):
    transformers = pytest.importorskip("transformers")
    from conftest import chat_files

    from lmlab.adapters import _task_base, export_hf

    train, dev = chat_files(tmp_path, 160, 10)
    out = tmp_path / "chat"
    notes = []
    fc = FinetuneConfig(
        task="chat", model=str(tiny_pretrained["gpt"]), train=str(train), eval=str(dev), out=str(out),
        epochs=4, lr=1e-2, max_len=48, max_target_len=8, method="lora", merge=True,
    )  # fmt: skip
    result = finetune(fc, lambda kind, info: notes.append(info["text"]) if kind == "note" else None)
    assert any("tok_embed) trains whole for the 2 added tokens" in n for n in notes), notes
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < 0.7 * losses[0]  # 5.9 -> 1.6 here
    assert result["trainable_params"] < result["total_params"] / 2
    # tensor by tensor: only the adapted layers and the embedding table (with its 2 new rows) changed
    base, merged = lmlab.load(tiny_pretrained["gpt"]).state_dict(), lmlab.load(out)
    targets = ("attn.qkv.weight", "attn.out.weight", "ffn.up.weight", "ffn.down.weight")
    for name, value in merged.state_dict().items():
        if name == "tok_embed.weight":
            assert value.shape[0] == base[name].shape[0] + 2 and not torch.equal(value[:-2], base[name])
            continue
        assert (not torch.equal(value, base[name])) == name.endswith(targets), name
    ids = torch.randint(5, merged.config.vocab_size, (2, 10))
    ids[:, -1] = merged.config.vocab_size - 1  # an added token
    with torch.no_grad():  # PEFT's unmerged model computes what the merged folders do
        unmerged = peft.PeftModel.from_pretrained(_task_base(out), str(out)).eval()
        torch.testing.assert_close(_logits(unmerged, ids), _logits(merged, ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(_logits(lmlab.load(out / "merged"), ids), _logits(merged, ids), atol=1e-5, rtol=0)
    # transformers + PEFT on the exported base: the adapter under GPT-2's names (Conv1D: fan_in_fan_out)
    exported = export_hf(out, tmp_path / "peft")
    assert "transformer.h.0.attn.c_attn" in exported["target_modules"]
    assert exported["modules_to_save"] == ["lm_head", "transformer.wte"]
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base")
    theirs = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, _logits(merged, ids), atol=1e-4, rtol=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base")  # merged in transformers
    merged_hf = peft.PeftModel.from_pretrained(model, str(tmp_path / "peft")).merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(merged_hf(ids).logits, _logits(merged, ids), atol=1e-4, rtol=0)


def test_a_lora_classifier_converts_for_transformers_and_peft(tiny_pretrained, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmlab.adapters import export_hf
    from lmlab.cli import main

    finetune(_config(tiny_pretrained, tmp_path, "cls", "bert", epochs=1))
    assert main(["convert", str(tmp_path / "cls"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # BERT's fused qkv: one adapter per projection, sharing A
    assert {"bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"} <= set(
        written["target_modules"]
    )
    assert written["modules_to_save"] == ["bert.pooler.dense", "classifier"] and written["fan_in_fan_out"] is False
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "peft" / "base")
    theirs = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "peft")).eval()
    ours = lmlab.load(tmp_path / "cls")
    ids = torch.randint(5, ours.config.vocab_size, (3, 12))
    ids[:, 0] = ours.config.cls_token_id
    with torch.no_grad():
        want = theirs(ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(want, _logits(ours, ids), atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="not an adapter folder"):
        export_hf(tiny_pretrained["bert"], tmp_path / "x")
