"""The model's own behaviour: mask policies, KV cache, heads, positions, grouped-query attention."""

from __future__ import annotations

import pytest
import torch

import lmlab
from lmlab import KVCache, Model, ModelConfig

TOL = 1e-5


def tiny(family: str, **kw) -> Model:
    heads = {"encoder": ("mlm",), "decoder": ("lm",), "prefix-lm": ("lm",), "encoder-decoder": ("lm",)}[family]
    cfg = ModelConfig(
        family=family,
        vocab_size=61,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=48,
        max_seq_len=40,
        heads=heads,
        dropout=0.0,
        attn_dropout=0.0,
        pad_token_id=0,
        decoder_start_token_id=0,
        **kw,
    )
    torch.manual_seed(0)
    return Model(cfg).eval()


def ids(B: int = 2, T: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 61, (B, T), generator=torch.Generator().manual_seed(seed))


def _changed_positions(model: Model, x: torch.Tensor, at: int, **kw) -> torch.Tensor:
    """Which positions' logits change when token `at` changes (batch row 0)."""
    y = x.clone()
    y[0, at] = (y[0, at] % 60) + 1
    with torch.no_grad():
        a, b = model(x, **kw).logits[0], model(y, **kw).logits[0]
    return ((a - b).abs().amax(-1) > 1e-6).nonzero().flatten()


def test_decoder_is_causal():
    changed = _changed_positions(tiny("decoder"), ids(), at=5)
    assert changed.min().item() == 5


def test_encoder_is_bidirectional():
    changed = _changed_positions(tiny("encoder", type_vocab_size=2), ids(), at=5)
    assert changed.tolist() == list(range(12))


def test_prefix_lm_is_bidirectional_inside_prefix_and_causal_after():
    model, x = tiny("prefix-lm", position="rope", norm="rmsnorm", activation="swiglu"), ids()
    prefix = torch.tensor([6, 6])
    assert _changed_positions(model, x, at=4, prefix_lengths=prefix).min().item() == 0  # inside the prefix
    assert _changed_positions(model, x, at=8, prefix_lengths=prefix).min().item() == 8  # after it


def test_padding_does_not_change_real_tokens():
    """A right-padded row gives the same outputs at its real positions as the unpadded row alone."""
    for family in ("encoder", "decoder", "prefix-lm"):
        model = tiny(family)
        x = ids(1, 7)
        padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], dim=1)
        mask = (padded != 0).long()
        kw = {"prefix_lengths": torch.tensor([3])} if family == "prefix-lm" else {}
        with torch.no_grad():
            alone = model(x, **kw).logits
            pad = model(padded, attention_mask=mask, **kw).logits[:, :7]
        assert (alone - pad).abs().max() <= TOL, family


def _incremental(model: Model, x: torch.Tensor, first: int, step: int = 1, **kw) -> torch.Tensor:
    cache, outs = None, []
    with torch.no_grad():
        out = model(x[:, :first], use_cache=True, **kw)
        cache, outs = out.past_key_values, [out.logits]
        for t in range(first, x.shape[1], step):
            out = model(x[:, t : t + step], past_key_values=cache)
            outs.append(out.logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False},
        {"position": "sinusoidal", "n_kv_heads": 2},
        {"position": "relative"},
    ],
)
def test_decoder_kv_cache_matches_full_forward(variant):
    model, x = tiny("decoder", **variant), ids(2, 15)
    with torch.no_grad():
        full = model(x).logits
    assert (_incremental(model, x, first=4) - full).abs().max() <= TOL
    assert (_incremental(model, x, first=3, step=4) - full).abs().max() <= TOL  # chunks of 4


def test_prefix_lm_kv_cache_matches_full_forward():
    model, x = tiny("prefix-lm", position="rope", norm="rmsnorm", activation="swiglu"), ids(2, 14)
    prefix = torch.tensor([5, 5])
    with torch.no_grad():
        full = model(x, prefix_lengths=prefix).logits
    assert (_incremental(model, x, first=5, prefix_lengths=prefix) - full).abs().max() <= TOL


def test_kv_cache_with_left_padding_matches_full_forward():
    model = tiny("decoder")
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # row 1 is left-padded by 4
    x = x.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(x, attention_mask=mask, position_ids=pos).logits
        out = model(x[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6], use_cache=True)
        logits = [out.logits]
        for t in range(6, 12):
            out = model(
                x[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                position_ids=pos[:, t : t + 1],
                past_key_values=out.past_key_values,
            )
            logits.append(out.logits)
    inc = torch.cat(logits, 1)
    assert (inc[mask.bool()] - full[mask.bool()]).abs().max() <= TOL


@pytest.mark.parametrize("arch", ["T5ForConditionalGeneration", "BartForConditionalGeneration"])
def test_encoder_decoder_kv_cache_matches_full_forward(arch, hf_folder):
    from conftest import padded_batch

    folder, _ = hf_folder(arch)
    model = lmlab.load(folder)
    src, src_mask = padded_batch([9, 5], pad_id=model.config.pad_token_id)
    dec = padded_batch([7, 7], pad_id=model.config.pad_token_id, seed=3)[0]
    with torch.no_grad():
        full = model(src, attention_mask=src_mask, decoder_input_ids=dec).logits
        enc = model(src, attention_mask=src_mask, decoder_input_ids=dec[:, :1])
        memory = enc.encoder_last_hidden_state
        cache, outs = KVCache(model.config.decoder_layers, cross=True), []
        for t in range(dec.shape[1]):
            out = model(
                attention_mask=src_mask,
                decoder_input_ids=dec[:, t : t + 1],
                encoder_outputs=memory,
                past_key_values=cache,
            )
            outs.append(out.logits)
    assert (torch.cat(outs, 1) - full).abs().max() <= TOL


def test_kv_cache_reorder_selects_batch_rows():
    model, x = tiny("decoder"), ids(3, 6)
    with torch.no_grad():
        out = model(x, use_cache=True)
        out.past_key_values.reorder(torch.tensor([2, 2, 0]))
        nxt = model(ids(3, 1, seed=5), past_key_values=out.past_key_values).logits
        ref = model(torch.cat([x[[2, 2, 0]], ids(3, 1, seed=5)], 1)).logits[:, -1:]
    assert (nxt - ref).abs().max() <= TOL


def test_too_long_input_is_refused_with_the_limit():
    model = tiny("decoder")
    with pytest.raises(lmlab.LmlabError, match="max_seq_len=40"):
        model(ids(1, 41))


def test_heads_compute_losses():
    torch.manual_seed(0)
    x = ids(2, 10)
    for heads, kw in [
        (("classify",), {"labels": torch.tensor([0, 2])}),
        (("tag",), {"labels": torch.randint(0, 3, (2, 10))}),
        (("span",), {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])}),
    ]:
        cfg = ModelConfig(
            family="encoder",
            vocab_size=61,
            d_model=32,
            n_layers=1,
            n_heads=4,
            d_ff=48,
            heads=heads,
            num_labels=3,
            max_seq_len=16,
        )
        out = Model(cfg)(x, **kw)
        assert out.loss is not None and out.loss.item() > 0 and out.loss.requires_grad
    out = Model(
        ModelConfig(
            family="encoder", vocab_size=61, d_model=32, n_layers=1, n_heads=4, d_ff=48, heads=("span",), max_seq_len=16
        )
    )(x)
    assert out.start_logits.shape == out.end_logits.shape == (2, 10)


def test_decoder_classification_pools_last_real_token():
    cfg = ModelConfig(
        family="decoder",
        vocab_size=61,
        d_model=32,
        n_layers=1,
        n_heads=4,
        d_ff=48,
        heads=("classify",),
        num_labels=3,
        max_seq_len=16,
        dropout=0.0,
        attn_dropout=0.0,
    )
    model = Model(cfg).eval()
    x = ids(1, 6)
    padded = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(x).logits
        b = model(padded, attention_mask=(torch.arange(9) < 6).long()[None]).logits
    assert (a - b).abs().max() <= TOL


def test_encoder_decoder_labels_are_shifted_into_decoder_inputs():
    model = tiny("encoder-decoder")
    src, labels = ids(2, 8), ids(2, 5, seed=1)
    with torch.no_grad():
        via_labels = model(src, labels=labels)
        explicit = model(src, decoder_input_ids=model.shift_right(labels), labels=labels)
    assert torch.equal(model.shift_right(labels)[:, 0], torch.zeros(2, dtype=torch.long))
    assert torch.allclose(via_labels.loss, explicit.loss)


def test_training_step_reduces_loss():
    model = tiny("decoder").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = ids(4, 16)
    losses = []
    for _ in range(20):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "family,heads", [("encoder", ("mlm",)), ("decoder", ("lm",)), ("prefix-lm", ("lm",)), ("encoder-decoder", ("lm",))]
)
def test_labelled_logits_only_gives_the_same_loss_and_rows(family, heads):
    model = tiny(family)
    x = ids(2, 12)
    labels = x.clone()
    labels[:, ::3] = -100
    kw = {"prefix_lengths": torch.tensor([4, 6])} if family == "prefix-lm" else {}
    if family == "encoder-decoder":
        kw["decoder_input_ids"] = model.shift_right(labels)
    with torch.no_grad():
        full = model(x, labels=labels, **kw)
        sparse = model(x, labels=labels, labelled_logits_only=True, **kw)
    assert torch.allclose(full.loss, sparse.loss, atol=1e-6)
    targets = (
        labels
        if family in ("encoder", "encoder-decoder")
        else torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    )
    assert torch.allclose(full.logits[targets != -100], sparse.logits, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, 40, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear_in_values_and_gradients_for_any_row_count(rows, bias):
    from lmlab.model.linear import Linear

    torch.manual_seed(0)
    layer = Linear(24, 40, bias=bias)
    x = torch.randn(rows, 1, 24, requires_grad=True)
    y = layer(x)
    assert y.shape == (rows, 1, 40) and y.is_contiguous()
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.allclose(y, want, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, layer.weight], g)
    want_grads = torch.autograd.grad(want, [x, layer.weight], g)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, want_grads))


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("scaled", [False, True])
def test_gated_activation_equals_autograd_of_the_plain_expression(act, scaled):
    from lmlab.model.ffn import ACT_FNS, gated_activation

    torch.manual_seed(0)
    h = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(2, 5, 1, dtype=torch.float64, requires_grad=True) if scaled else None
    out = gated_activation(h, act, scale)
    gate, up = h.chunk(2, dim=-1)
    want = ACT_FNS[act](gate) * up * (scale if scaled else 1.0)
    assert out.shape == (2, 5, 6) and torch.allclose(out, want, atol=1e-12)
    g = torch.randn_like(out)
    inputs = [h, scale] if scaled else [h]
    grads = torch.autograd.grad(out, inputs, g)
    want_grads = torch.autograd.grad(want, inputs, g)
    for a, b in zip(grads, want_grads):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)
    if act != "relu":  # the hand-written backward is the derivative (relu's kink aside)
        assert torch.autograd.gradcheck(lambda h, s: gated_activation(h, act, s), (h, scale))


def test_t5_init_gives_transformers_t5_standard_deviations():
    """init="t5": Mesh TensorFlow's fan-in init (transformers' T5 with initializer_factor 1), checked by
    the sample standard deviation of every kind of weight; task heads keep init_std."""
    import lmlab

    torch.manual_seed(0)
    cfg = lmlab.preset("t5-tiny", init="t5", vocab_size=4000)
    m = lmlab.Model(cfg)
    d, hd, f = cfg.d_model, cfg.dim_head, cfg.d_ff
    q_rows = cfg.n_heads * hd
    p = {name: w.detach() for name, w in m.named_parameters()}
    assert float(p["encoder.rel_bias.weight"].std()) == pytest.approx(d**-0.5, rel=0.3)  # only 128 values
    want = {
        "tok_embed.weight": 1.0,
        "encoder.layers.0.attn.out.weight": q_rows**-0.5,
        "encoder.layers.0.ffn.up.weight": d**-0.5,
        "encoder.layers.0.ffn.down.weight": f**-0.5,
        "decoder.layers.1.cross_attn.q.weight": (d * hd) ** -0.5,
        "decoder.layers.1.cross_attn.kv.weight": d**-0.5,
    }
    for name, std in want.items():
        assert float(p[name].std()) == pytest.approx(std, rel=0.1), name
    qkv = p["decoder.layers.0.attn.qkv.weight"]
    assert float(qkv[:q_rows].std()) == pytest.approx((d * hd) ** -0.5, rel=0.1)
    assert float(qkv[q_rows:].std()) == pytest.approx(d**-0.5, rel=0.1)
    normal = lmlab.Model(lmlab.preset("t5-tiny", vocab_size=4000))  # the default stays GPT-style
    assert float(normal.tok_embed.weight.detach().std()) == pytest.approx(cfg.init_std, rel=0.1)
    with pytest.raises(lmlab.ConfigError, match="ModelConfig.init: got 'xavier'"):
        lmlab.preset("t5-tiny", init="xavier").validate()


# ---- packed documents that do not see each other ---------------------------------------------------
PACKING_VARIANTS = [
    ("decoder", {}),
    ("decoder", {"position": "rope", "norm": "rmsnorm"}),
    ("encoder", {}),
    ("prefix-lm", {}),
    ("encoder-decoder", {}),
    ("encoder-decoder", {"position": "relative"}),
]


@pytest.mark.parametrize("family, kw", PACKING_VARIANTS)
def test_a_packed_sequence_computes_what_each_document_computes_alone(family, kw):
    model = tiny(family, **kw)
    lengths, prefixes = (5, 7, 3), (2, 4, 1)
    docs = [ids(1, n, seed=n) for n in lengths]
    packed = torch.cat(docs, dim=1)
    document_ids = torch.cat([torch.full((1, n), k) for k, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        if family == "encoder-decoder":
            targets = [ids(1, n + 1, seed=10 + n) for n in lengths]
            decoder_document_ids = torch.cat([torch.full((1, n + 1), k) for k, n in enumerate(lengths)], dim=1)
            out = model(
                packed,
                decoder_input_ids=torch.cat(targets, dim=1),
                document_ids=document_ids,
                decoder_document_ids=decoder_document_ids,
            ).logits
            alone = [model(d, decoder_input_ids=t).logits for d, t in zip(docs, targets)]
        elif family == "prefix-lm":
            prefix_mask = torch.cat([torch.arange(n) < p for n, p in zip(lengths, prefixes)])[None]
            out = model(packed, document_ids=document_ids, prefix_mask=prefix_mask).logits
            alone = [model(d, prefix_lengths=torch.tensor([p])).logits for d, p in zip(docs, prefixes)]
        else:
            out = model(packed, document_ids=document_ids).logits
            alone = [model(d).logits for d in docs]
        whole = model(packed, prefix_lengths=torch.tensor([2])).logits if family == "prefix-lm" else None
    torch.testing.assert_close(out, torch.cat(alone, dim=1), atol=1e-5, rtol=0)
    if family in ("decoder", "encoder"):  # without the documents, the later ones see the earlier ones
        with torch.no_grad():
            crossing = model(packed).logits
        assert (crossing[:, 5:] - out[:, 5:]).abs().max() > 1e-3
    if whole is not None:
        assert (whole - out).abs().max() > 1e-3


def test_document_positions_restart_with_each_document():
    from lmlab.model.model import document_positions

    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
