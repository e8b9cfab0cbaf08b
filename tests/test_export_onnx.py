"""ONNX export (lmlab.export_onnx): every graph run in ONNX Runtime against lmlab's own forward, with and
without the KV cache, at batch sizes and lengths other than the ones it was exported with."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import lmlab
from lmlab.errors import ConfigError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from lmlab.export_onnx import OnnxDecoder, write_onnx  # noqa: E402

TOL = 1e-4


def _session(folder, name):
    return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])


def _run(session, feed):
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(None, {k: v for k, v in feed.items() if k in inputs})))


def _empty_cache(manifest, batch):
    c = manifest["cache"]
    empty = np.zeros((batch, c["kv_heads"], 0, c["head_dim"]), np.float32)
    return {f"past_key_values.{i}.{kv}": empty for i in range(c["layers"]) for kv in ("key", "value")}


def _left_padded(lengths, pad, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = 1
    return ids.masked_fill(mask == 0, pad), mask


@pytest.fixture(scope="module")
def trained_gpt(tmp_path_factory, tiny_pretrained):
    """The tiny decoder after 150 steps on the tiny text (so int8 has signal to lose), exported with its
    int8 graph: (model folder, ONNX folder, 24 held-out windows of 20 tokens)."""
    from conftest import tiny_text

    from lmlab.tokenizer import load_tokenizer

    src = tiny_pretrained["gpt"]
    tok = load_tokenizer(src)
    model = lmlab.load(src)
    stream = torch.tensor([i for line in tiny_text() for i in tok.encode(line)])
    n = len(stream) // 20
    data = stream[: n * 20].view(n, 20)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    train, held = data[:-24], data[-24:]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        batch = train[torch.randint(0, len(train), (16,))]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    root = tmp_path_factory.mktemp("trained-gpt")
    model.eval().save_pretrained(root / "model")
    tok.save(root / "model")
    r = write_onnx(root / "model", root / "onnx", quantize="int8")
    assert [g["file"] for g in r["graphs"]] == ["model.onnx"] and r["tokenizer"]
    assert r["graphs"][0]["int8"] == "model.int8.onnx"
    return root / "model", root / "onnx", held


@pytest.mark.parametrize("name", ["gpt", "prefix"])
def test_a_decoder_graph_gives_lmlabs_logits_with_and_without_its_cache(tmp_path, tiny_pretrained, trained_gpt, name):
    if name == "gpt":
        src, out, _ = trained_gpt
    else:
        src, out = tiny_pretrained[name], tmp_path / "onnx"
        write_onnx(src, out)
    model = lmlab.load(src).eval()
    cfg = model.config
    manifest = json.loads((out / "onnx.json").read_text())
    session = _session(out, "model.onnx")
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["past_key_values.0.key"] == ["batch", cfg.kv_heads, "past_sequence", cfg.dim_head]
    assert shapes["attention_mask"] == ["batch", "total_sequence"]

    # a batch of 3 (exported with 2), left-padded, the whole prompt in one call with an empty past
    ids, mask = _left_padded([9, 6, 11], cfg.pad_token_id or 0, cfg.vocab_size)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # a prefix-LM's bidirectional prefix is fed whole in the first call (8 tokens below)
    extra = {"prefix_lengths": torch.tensor([8, 8, 8])} if name == "prefix" else {}
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=positions, **extra).logits
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feed |= {k: v.numpy() for k, v in extra.items()} | _empty_cache(manifest, 3)
    got = _run(session, feed)
    real = mask.bool().numpy()
    assert np.abs(got["logits"][real] - ref.numpy()[real]).max() < TOL
    assert got["present.0.key"].shape == (3, cfg.kv_heads, 11, cfg.dim_head)

    # the same sequences fed 8 + 1 + 2 tokens at a time, the cache passed back in
    feed, worst = _empty_cache(manifest, 3), 0.0
    for a, b in ((0, 8), (8, 9), (9, 11)):
        feed |= {
            "input_ids": ids[:, a:b].numpy(),
            "attention_mask": mask[:, :b].numpy(),
            "position_ids": positions[:, a:b].numpy(),
        } | {k: v.numpy() for k, v in extra.items()}
        step = _run(session, feed)
        feed |= {k.replace("present", "past_key_values"): v for k, v in step.items() if k != "logits"}
        worst = max(worst, float(np.abs(step["logits"][real[:, a:b]] - ref.numpy()[:, a:b][real[:, a:b]]).max()))
    assert worst < TOL

    # greedy decoding through ONNX Runtime gives lmlab's tokens
    ids, mask = _left_padded([5, 8], cfg.pad_token_id or 0, cfg.vocab_size, seed=1)
    want = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[], pad_token_id=cfg.pad_token_id)
    got = OnnxDecoder(out).greedy(ids.numpy(), 12, mask.numpy())
    assert np.array_equal(got, want.numpy())


def test_an_encoder_graph_gives_hidden_states_embeddings_and_head_outputs(tmp_path, tiny_pretrained, capsys):
    from lmlab.cli import main
    from lmlab.embed import sentence_embeddings
    from lmlab.tokenizer import encode_batch, load_tokenizer

    src = tiny_pretrained["bert"]
    model = lmlab.load(src).eval()
    tok = load_tokenizer(src)
    texts = ["the lord said unto moses", "a king", "let my people go into the land of the river and the field"]
    ids, mask = encode_batch(tok, texts, 64, model.config.pad_token_id)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
    embeddings = sentence_embeddings(model, tok, texts)
    fused = tmp_path / "fused"
    # through the command line, fused, with ONNX Runtime's int8 graph beside it (the decoders' tests run
    # the graphs as exported; the fusions rewrite this one after export)
    assert main(["convert", str(src), str(fused), "--to", "onnx", "--quantize", "int8", "--optimize"]) == 0
    said = capsys.readouterr().out
    assert "model.onnx, model.int8.onnx" in said and "with its tokenizer" in said
    assert {"model.onnx", "model.int8.onnx", "onnx.json", "tokenizer.json"} <= {p.name for p in fused.iterdir()}
    manifest = json.loads((fused / "onnx.json").read_text())
    # ONNX Runtime's fused operators replaced attention and residual + norm
    assert manifest["graphs"][0]["fused"].get("sdpa_via_mha") == model.config.n_layers
    outputs = {}
    for name in ("model.onnx", "model.int8.onnx"):
        session = _session(fused, name)
        assert [o.name for o in session.get_outputs()] == [
            "last_hidden_state",
            "sentence_embedding",
            "pooler_output",
            "logits",
            "nsp_logits",
        ]
        outputs[name] = _run(
            session, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": 0 * ids.numpy()}
        )
    got, real = outputs["model.onnx"], mask.bool().numpy()
    assert np.abs(got["last_hidden_state"][real] - ref.last_hidden_state.numpy()[real]).max() < TOL
    assert np.abs(got["logits"][real] - ref.logits.numpy()[real]).max() < TOL
    assert np.abs(got["pooler_output"] - ref.pooler_output.numpy()).max() < TOL
    assert np.abs(got["nsp_logits"] - ref.nsp_logits.numpy()).max() < TOL
    assert np.abs(got["sentence_embedding"] - embeddings.numpy()).max() < TOL
    # int8 (weights per channel, activations per tensor at run time): the same embeddings, nearly
    cosine = (outputs["model.int8.onnx"]["sentence_embedding"] * embeddings.numpy()).sum(-1)
    assert cosine.min() > 0.999


def test_an_encoder_decoder_exports_as_encoder_and_cached_decoder(tmp_path, tiny_pretrained):
    src = tiny_pretrained["t5"]
    model = lmlab.load(src).eval()
    cfg = model.config
    out = tmp_path / "onnx"
    r = write_onnx(src, out)
    assert [g["file"] for g in r["graphs"]] == ["encoder.onnx", "decoder.onnx"]
    manifest = json.loads((out / "onnx.json").read_text())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    dec = torch.randint(5, cfg.vocab_size, (3, 6), generator=g)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, decoder_input_ids=dec)
    memory = _run(_session(out, "encoder.onnx"), {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    real = mask.bool().numpy()
    h = memory["last_hidden_state"]
    assert np.abs(h[real] - ref.encoder_last_hidden_state.numpy()[real]).max() < TOL
    decoder, feed, worst = _session(out, "decoder.onnx"), _empty_cache(manifest, 3), 0.0
    for a, b in ((0, 4), (4, 5), (5, 6)):
        feed |= {
            "decoder_input_ids": dec[:, a:b].numpy(),
            "decoder_attention_mask": np.ones((3, b), np.int64),
            "decoder_position_ids": np.arange(a, b)[None].repeat(3, 0),
            "encoder_hidden_states": h,
            "encoder_attention_mask": mask.numpy(),
        }
        step = _run(decoder, feed)
        feed |= {k.replace("present", "past_key_values"): v for k, v in step.items() if k != "logits"}
        worst = max(worst, float(np.abs(step["logits"] - ref.logits[:, a:b].numpy()).max()))
    assert worst < TOL


def test_int8_keeps_a_trained_decoders_perplexity_within_one_percent(trained_gpt):
    src, out, held = trained_gpt
    model = lmlab.load(src)

    def perplexity(session):
        feed = {
            "input_ids": held.numpy(),
            "attention_mask": np.ones_like(held.numpy()),
            "position_ids": np.arange(held.shape[1])[None].repeat(len(held), 0),
        } | _empty_cache(json.loads((out / "onnx.json").read_text()), len(held))
        logits = torch.from_numpy(_run(session, feed)["logits"])
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), held[:, 1:].reshape(-1))
        return math.exp(nll.item())

    fp32, int8 = perplexity(_session(out, "model.onnx")), perplexity(_session(out, "model.int8.onnx"))
    assert fp32 < 0.2 * model.config.vocab_size  # it learned something: int8 has signal to lose
    assert abs(int8 / fp32 - 1) < 0.01, (fp32, int8)


def test_what_onnx_cannot_hold_is_refused_with_the_reason(tmp_path, tiny_pretrained, monkeypatch):
    from lmlab.config import preset

    moe = tmp_path / "moe"
    lmlab.Model(preset("mixtral-tiny", n_layers=1, vocab_size=256)).save_pretrained(moe)
    with pytest.raises(ConfigError, match="Mixture-of-Experts.*data-dependent shapes"):
        write_onnx(moe, tmp_path / "moe-onnx")
    with pytest.raises(ConfigError, match="--optimize applies to encoders.*KV cache"):
        write_onnx(tiny_pretrained["gpt"], tmp_path / "x", optimize=True)
    with pytest.raises(ConfigError, match="'q8_0' is unknown for ONNX"):
        write_onnx(tiny_pretrained["gpt"], tmp_path / "x", quantize="q8_0")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="exists; pass --force"):
        write_onnx(tiny_pretrained["gpt"], tmp_path / "taken")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)
    with pytest.raises(ConfigError, match=r"lmlab\[onnx\]"):
        write_onnx(tiny_pretrained["gpt"], tmp_path / "y")


def test_convert_cli_refuses_what_onnx_does_not_take(tmp_path, tiny_pretrained, capsys):
    from lmlab.cli import main

    src = str(tiny_pretrained["bert"])
    (tmp_path / "m").mkdir()
    assert main(["convert", src, str(tmp_path / "m"), "--to", "onnx"]) != 0
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["convert", src, str(tmp_path / "n"), "--to", "onnx", "--quantize", "q4_0"]) != 0
    assert "ONNX takes --quantize int8" in capsys.readouterr().err
    assert main(["convert", src, str(tmp_path / "n.gguf"), "--to", "gguf", "--quantize", "int8"]) != 0
    assert "q8_0 is its int8" in capsys.readouterr().err
    assert main(["convert", src, str(tmp_path / "n"), "--to", "hf", "--optimize"]) != 0
    assert "--optimize applies to --to onnx only" in capsys.readouterr().err
