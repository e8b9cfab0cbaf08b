"""lmlab.quantize: the decoding choice on both CPU kinds, int8 linear layers, and their quality."""

from __future__ import annotations

import copy
import gzip
import math

import pytest
import torch
from torch import nn

import lmlab
from lmlab.errors import ConfigError
from lmlab.quantize import Fp16Linear, Int8Linear, decoding_choice, int8_engine, quantize_fp16, quantize_int8

needs_int8 = pytest.mark.skipif(int8_engine() is None, reason="torch has no int8 engine on this machine")
needs_fbgemm = pytest.mark.skipif(int8_engine() not in ("x86", "fbgemm"), reason="fp16 weights need fbgemm (x86)")


def test_the_decoding_choice_follows_the_cpu_flags_on_both_kinds():
    amx = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"})
    epyc = frozenset({"avx2"})
    assert decoding_choice("auto", flags=amx)["dtype"] == "bfloat16"
    assert decoding_choice("auto", flags=frozenset({"avx512_bf16"}))["dtype"] == "bfloat16"
    auto = decoding_choice("auto", flags=epyc)
    assert auto["dtype"] == "float32" and "avx2" in auto["why"]
    assert decoding_choice("float32", flags=amx)["dtype"] == "float32"  # asked for: kept
    assert decoding_choice("bfloat16", flags=epyc)["dtype"] == "bfloat16"
    with pytest.raises(ConfigError):
        decoding_choice("float16")
    with pytest.raises(ConfigError):
        decoding_choice("auto", "int4")


@needs_int8
def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    layer = nn.Linear(256, 512)
    x = torch.randn(3, 5, 256)
    q = Int8Linear(layer.weight, layer.bias)
    want, got = layer(x), q(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max() / want.abs().max() < 0.03
    assert decoding_choice("auto", "int8")["quantize"] == "int8"
    # the fast float32 path (the op's C++ entry point) and the converting path agree with the wrapped op
    wrapped = torch.ops.quantized.linear_dynamic(x.reshape(-1, 256), q._packed, q.reduce_range).view(3, 5, 512)
    row = torch.ops.quantized.linear_dynamic(x[0], q._packed, q.reduce_range)  # 2-D in: its own scale
    assert torch.equal(got, wrapped) and torch.equal(q(x[0]), row)
    half = q(x.bfloat16())
    assert half.dtype == torch.bfloat16 and half.shape == want.shape
    assert (half.float() - want).abs().max() / want.abs().max() < 0.05


@needs_fbgemm
def test_fp16_weights_change_only_the_rounding_of_each_weight():
    torch.manual_seed(0)
    layer = nn.Linear(256, 512)
    x = torch.randn(3, 5, 256)
    q = Fp16Linear(layer.weight, layer.bias)
    # the float32 product with every weight rounded to float16: all the layer changes
    want = torch.nn.functional.linear(x, layer.weight.half().float(), layer.bias)
    got = q(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert (got - layer(x)).abs().max() > 0  # and the rounding is there
    assert q(x.bfloat16()).dtype == torch.bfloat16
    assert decoding_choice("auto", "fp16") == {
        "dtype": "float32",
        "quantize": "fp16",
        "why": decoding_choice("auto", "fp16")["why"],
    }


@needs_int8
def test_quantize_swaps_projections_and_the_head_but_not_routers(tiny_pretrained):
    from lmlab.config import preset
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_pretrained["gpt"])
    small = dict(n_layers=2, d_model=64, n_heads=2, d_ff=128, max_seq_len=64, ffn="moe", moe_experts=4, moe_every=2)
    cfg = preset("gpt2-tiny", vocab_size=tok.vocab_size, **small, **tok.model_ids())
    torch.manual_seed(0)
    model = lmlab.Model(cfg).eval()
    ids = torch.tensor([tok.encode("the lord said unto moses")])
    with torch.no_grad():
        want = model(ids).logits
    q = copy.deepcopy(model)
    n = quantize_int8(q)
    routers = [m for name, m in q.named_modules() if name.endswith("router.gate")]
    assert routers and all(type(m) is nn.Linear for m in routers)
    # attention q/k/v and out in both layers, the dense FFN of layer 0, the tied lm head's int8 copy
    assert n == 7 == sum(isinstance(m, Int8Linear) for m in q.modules())
    with torch.no_grad():
        got = q(ids).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@needs_int8
def test_int8_keeps_held_out_perplexity_within_one_percent(tmp_path, monkeypatch):
    """A tiny GPT pre-trained on the demo corpus: int8 perplexity on held-out chapters within 1% of float32."""
    from lmlab.cli import main
    from lmlab.data.corpus import demo_corpus
    from lmlab.tokenizer import load_tokenizer

    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    chapters = gzip.open(demo_corpus("kjv"), "rt", encoding="utf-8").read().split("\n\n")
    (tmp_path / "train.txt").write_text("\n\n".join(chapters[:120]))
    held_out = "\n".join(chapters[-20:]).splitlines()
    out = tmp_path / "gpt"
    args = ["pretrain", "--preset", "gpt2-tiny", "--data", str(tmp_path / "train.txt"), "--doc-sep", "blank"]
    args += ["--out", str(out), "--max-steps", "60", "--batch-size", "16", "--seq-len", "64", "--vocab-size", "1000"]
    for setting in ("n_layers=2", "d_model=128", "n_heads=4", "d_ff=512"):
        args += ["--model-set", setting]
    args += ["--lr", "2e-3"]
    assert main(args) == 0
    model, tok = lmlab.load(out).eval(), load_tokenizer(out)
    q = copy.deepcopy(model)
    quantize_int8(q)
    h = copy.deepcopy(model)
    quantize_fp16(h) if int8_engine() in ("x86", "fbgemm") else None

    def perplexity(m):
        total, n = 0.0, 0
        with torch.no_grad():
            for line in held_out[:200]:
                ids = torch.tensor([tok.encode(line, add_special_tokens=False)[:64]])
                if ids.shape[1] < 2:
                    continue
                loss = m(ids, labels=ids).loss
                total, n = total + float(loss) * (ids.shape[1] - 1), n + ids.shape[1] - 1
        return math.exp(total / n)

    counts = torch.ones(tok.vocab_size)  # the unigram baseline, add-one smoothed, from the training text
    for chapter in chapters[:120]:
        counts += torch.bincount(torch.tensor(tok.encode(chapter, add_special_tokens=False)), minlength=tok.vocab_size)
    logp = (counts / counts.sum()).log()
    scored = [tok.encode(line, add_special_tokens=False)[:64] for line in held_out[:200]]
    unigram = math.exp(
        -sum(float(logp[t]) for ids in scored if len(ids) > 1 for t in ids[1:])
        / sum(len(ids) - 1 for ids in scored if len(ids) > 1)
    )
    base, int8 = perplexity(model), perplexity(q)
    assert base < 0.8 * unigram, (base, unigram)  # it learned more than word frequencies
    print(f"held-out perplexity: float32 {base:.3f}, int8 {int8:.3f} ({int8 / base - 1:+.3%})")
    assert abs(int8 / base - 1) < 0.01, (base, int8)
    fp16 = perplexity(h)  # float16 weights: 11 bits of mantissa, two orders of magnitude closer than int8
    assert abs(fp16 / base - 1) < 0.001, (base, fp16)


def test_load_takes_the_decoding_dtype_and_quantization_by_name(tiny_pretrained):
    """lmlab.load(folder, dtype="auto") picks what `lmlab generate --dtype auto` picks, in the library."""
    import lmlab

    folder = tiny_pretrained["gpt"]
    auto = lmlab.load(folder, dtype="auto")
    want = decoding_choice("auto")
    assert auto.decoding == want and auto.tok_embed.weight.dtype == getattr(torch, want["dtype"])
    assert lmlab.load(folder, dtype="bfloat16").tok_embed.weight.dtype == torch.bfloat16
    assert lmlab.load(folder, dtype=torch.bfloat16).tok_embed.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype 'float8' is unknown; expected one of auto, float32, bfloat16"):
        lmlab.load(folder, dtype="float8")
    with pytest.raises(ConfigError, match="quantize must be one of none, int8, fp16"):
        lmlab.load(folder, quantize="int4")
    if int8_engine() is not None:
        q = lmlab.load(folder, quantize="int8")
        assert q.decoding["quantize"] == "int8" and any(isinstance(m, Int8Linear) for m in q.modules())
    if int8_engine() in ("x86", "fbgemm"):
        h = lmlab.load(folder, quantize="fp16")
        assert h.decoding["quantize"] == "fp16" and isinstance(h.lm_head.packed, Fp16Linear)
        ids = torch.tensor([[5, 6, 7, 8]])
        with torch.no_grad():
            want, got = lmlab.load(folder)(ids).logits, h(ids).logits
        assert 0 < (got - want).abs().max() < 1e-3 * want.abs().max()


@needs_fbgemm
@pytest.mark.parametrize("kind", ["int8", "fp16"])
def test_packed_layers_compile_as_one_graph(tiny_pretrained, kind):
    """torch.compile cannot trace fbgemm's packed weights; lmlab's packed layers reach it as one opaque
    op (`lmlab::packed_linear`), so a quantized model compiles whole (fullgraph) with eager's logits,
    and a deep copy is a layer of its own that outlives the original."""
    from lmlab.quantize import quantize_linear

    model = lmlab.load(tiny_pretrained["gpt"]).eval()
    quantize_linear(model, kind)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = model(ids).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # raises on any graph break
        assert torch.allclose(compiled(ids).logits, want, atol=1e-6)
        twin = copy.deepcopy(model)
        keys = {m.key for m in model.modules() if hasattr(m, "key")}
        assert keys.isdisjoint(m.key for m in twin.modules() if hasattr(m, "key"))
        del model, compiled
        assert torch.allclose(torch.compile(twin, backend="aot_eager", fullgraph=True)(ids).logits, want, atol=1e-6)
