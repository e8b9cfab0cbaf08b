"""lmlab must compute what transformers computes: same logits to 1e-5 in float32, both directions."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, transformers

import lmlab

TOL = 1e-5
VOCAB_TINY = 99
LENGTHS = [10, 7, 4]


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


def _inputs(arch: str, hf_model) -> dict[str, torch.Tensor]:
    pad = hf_model.config.pad_token_id
    ids, mask = padded_batch(LENGTHS, pad_id=pad if pad is not None else 0)
    kw = {"input_ids": ids, "attention_mask": mask}
    if arch == "BartForSequenceClassification":  # the head reads the decoder's state at each input's final </s>
        ids[torch.arange(len(LENGTHS)), torch.tensor(LENGTHS) - 1] = hf_model.config.eos_token_id
    elif arch.startswith(("T5", "Bart", "Switch")):
        dec, dmask = padded_batch([6, 8, 3], pad_id=pad, seed=1)
        kw.update(decoder_input_ids=dec, decoder_attention_mask=dmask)
    if arch.startswith("Bert"):
        kw["token_type_ids"] = (torch.arange(ids.shape[1]) >= 3).long().expand_as(ids).contiguous()
    return kw


def _compare(arch: str, ours, theirs, kw) -> None:
    with torch.no_grad():
        a, b = ours(**kw), theirs(**kw)
    mask = kw.get("decoder_attention_mask", kw["attention_mask"])
    if arch == "BertModel":
        assert _max_diff(a.last_hidden_state, b.last_hidden_state, mask) <= TOL
        assert _max_diff(a.pooler_output, b.pooler_output) <= TOL
    elif arch == "BertForPreTraining":
        assert _max_diff(a.prediction_logits, b.prediction_logits, mask) <= TOL
        assert _max_diff(a.seq_relationship_logits, b.seq_relationship_logits) <= TOL
    elif arch in ("BertForSequenceClassification", "BartForSequenceClassification"):
        assert _max_diff(a.logits, b.logits) <= TOL
    else:
        assert _max_diff(a.logits, b.logits, mask) <= TOL


ARCHS = [
    "BertModel",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "RobertaForMaskedLM",
    "GPT2LMHeadModel",
    "T5ForConditionalGeneration",
    "BartForConditionalGeneration",
    "BartForSequenceClassification",
    "SwitchTransformersForConditionalGeneration",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "LlamaForCausalLM",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_load_matches_transformers_logits(arch, hf_folder):
    folder, theirs = hf_folder(arch)
    ours = lmlab.load(folder)
    _compare(arch, ours, theirs, _inputs(arch, theirs))


@pytest.mark.parametrize("arch", ARCHS)
def test_export_to_hf_loads_back_with_same_logits(arch, hf_folder, tmp_path):
    folder, theirs = hf_folder(arch)
    ours = lmlab.load(folder)
    out = tmp_path / "exported"
    ours.save_pretrained(out, format="hf")
    auto = transformers.AutoModel if arch in ("BertModel",) else getattr(transformers, arch)
    back = auto.from_pretrained(out).eval()
    assert type(back).__name__ == arch
    _compare(arch, ours, back, _inputs(arch, theirs))


def test_t5_gated_gelu_matches_transformers(hf_folder):
    folder, theirs = hf_folder("T5ForConditionalGeneration", "t5-gated")
    ours = lmlab.load(folder)
    assert ours.config.activation == "geglu_tanh"
    _compare("T5ForConditionalGeneration", ours, theirs, _inputs("T5ForConditionalGeneration", theirs))


def test_pytorch_bin_is_read_weights_only(hf_folder):
    folder, theirs = hf_folder("GPT2LMHeadModel")
    # re-save the weights as a plain state dict in pytorch_model.bin
    state = lmlab.io.read_weights(folder)[0]
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    ours = lmlab.load(folder)
    _compare("GPT2LMHeadModel", ours, theirs, _inputs("GPT2LMHeadModel", theirs))


def test_loss_matches_transformers_for_causal_and_seq2seq(hf_folder):
    for arch in ("GPT2LMHeadModel", "BartForConditionalGeneration", "BertForMaskedLM"):
        folder, theirs = hf_folder(arch)
        ours = lmlab.load(folder)
        kw = _inputs(arch, theirs)
        labels = kw.get("decoder_input_ids", kw["input_ids"]).clone()
        labels[:, ::3] = -100
        kw.pop("decoder_input_ids", None)
        with torch.no_grad():
            a, b = ours(**kw, labels=labels), theirs(**kw, labels=labels)
        assert abs(a.loss.item() - b.loss.item()) <= 1e-5, arch


def test_hidden_states_match_transformers(hf_folder):
    folder, theirs = hf_folder("BertModel")
    ours = lmlab.load(folder)
    kw = _inputs("BertModel", theirs)
    with torch.no_grad():
        a = ours(**kw, output_hidden_states=True).hidden_states
        b = theirs(**kw, output_hidden_states=True).hidden_states
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert _max_diff(x, y, kw["attention_mask"]) <= TOL


def test_imported_gpt2_kv_cache_token_by_token_matches_transformers_full_forward(hf_folder):
    folder, theirs = hf_folder("GPT2LMHeadModel")
    ours = lmlab.load(folder)
    ids = padded_batch([12, 12], pad_id=0)[0]
    with torch.no_grad():
        reference = theirs(input_ids=ids).logits
        out = ours(input_ids=ids[:, :1], use_cache=True)
        steps = [out.logits]
        for t in range(1, ids.shape[1]):
            out = ours(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits)
    assert _max_diff(torch.cat(steps, 1), reference) <= TOL


@pytest.mark.parametrize(
    "name,arch", [("mixtral-tiny", "MixtralForCausalLM"), ("deepseekmoe-tiny", "Qwen2MoeForCausalLM")]
)
def test_moe_presets_export_to_transformers_with_same_logits(name, arch, tmp_path):
    """lmlab-made MoE decoders open in transformers: Mixtral, and a shared-expert model as Qwen2-MoE."""
    from lmlab.config import preset

    torch.manual_seed(0)
    cfg = preset(
        name,
        vocab_size=VOCAB_TINY,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        n_layers=3,
        **({"moe_d_ff": 16, "moe_shared_gate": True} if name.startswith("deepseek") else {}),
    )
    ours = lmlab.Model(cfg).eval()
    ours.save_pretrained(tmp_path, format="hf")
    back = getattr(transformers, arch).from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB_TINY, (2, 9))
    with torch.no_grad():
        assert _max_diff(ours(input_ids=ids).logits, back(input_ids=ids).logits) <= TOL


def test_imported_mixtral_greedy_generation_equals_transformers(hf_folder):
    folder, theirs = hf_folder("MixtralForCausalLM")
    ours = lmlab.load(folder)
    prompt = padded_batch([5], pad_id=0)[0]
    want = theirs.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = ours.generate(prompt, max_new_tokens=8)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "name,auto", [("gpt", "AutoModelForCausalLM"), ("bert", "AutoModelForMaskedLM"), ("t5", "AutoModelForSeq2SeqLM")]
)
def test_converted_folder_is_complete_for_transformers(name, auto, tiny_pretrained, tmp_path):
    """`lmlab convert DIR OUT --to hf` on a pre-trained folder: transformers' Auto classes load the model
    and the tokenizer, the tokenizer gives lmlab's ids, and the logits agree."""
    from lmlab.cli import main
    from lmlab.tokenizer import load_tokenizer

    src, out = tiny_pretrained[name], tmp_path / "hf"
    if name == "bert":  # pre-training gives BERT an mlm head; the fixture folder has (mlm, nsp)
        model = lmlab.load(src)
        lmlab.Model(model.config.replace(heads=("mlm",), pooler=False)).save_pretrained(tmp_path / "mlm")
        load_tokenizer(src).save(tmp_path / "mlm")
        src = tmp_path / "mlm"
    assert main(["convert", str(src), str(out), "--to", "hf"]) == 0
    theirs_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = load_tokenizer(src)
    text = "and the lord said unto Moses 7 , let my people go into the land"
    ids = ours_tok.encode(text)
    assert theirs_tok(text)["input_ids"] == ids
    theirs = getattr(transformers, auto).from_pretrained(out).eval()
    ours = lmlab.load(src)
    x = torch.tensor([ids])
    kw = {"decoder_input_ids": x[:, :5]} if name == "t5" else {}
    with torch.no_grad():
        assert _max_diff(ours(input_ids=x, **kw).logits, theirs(input_ids=x, **kw).logits) <= TOL


def test_llama_tiny_preset_exports_as_llama_for_causal_lm(tmp_path):
    torch.manual_seed(0)
    ours = lmlab.Model(
        lmlab.preset("llama-tiny", vocab_size=VOCAB_TINY, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=40)
    ).eval()
    ours.save_pretrained(tmp_path, format="hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids, mask = padded_batch(LENGTHS, pad_id=0)
    with torch.no_grad():
        assert (
            _max_diff(
                ours(input_ids=ids, attention_mask=mask).logits, theirs(input_ids=ids, attention_mask=mask).logits, mask
            )
            <= TOL
        )
