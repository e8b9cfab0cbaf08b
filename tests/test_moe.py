"""MoE layer: the sorted dispatch equals a per-token reference; routing, capacity and losses do what they claim."""

from __future__ import annotations

import pytest
import torch

import lmlab
from lmlab.config import ModelConfig
from lmlab.model.moe import MoE


def moe_cfg(**kw) -> ModelConfig:
    base = dict(family="decoder", vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=24, ffn="moe",
                moe_experts=4, moe_top_k=2, max_seq_len=32, dropout=0.0, attn_dropout=0.0)
    return ModelConfig(**{**base, **kw})


def reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the obviously correct computation."""
    x_TD = x.reshape(-1, x.shape[-1])
    _, weights, experts = layer.route(x_TD)
    rows = []
    for t in range(x_TD.shape[0]):
        y = sum(weights[t, j] * layer._expert(int(experts[t, j]), x_TD[t:t + 1])[0] for j in range(layer.top_k))
        if layer.shared is not None:
            y = y + layer.shared(x_TD[t:t + 1])[0]
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("kw", [dict(moe_top_k=1), dict(moe_top_k=2, activation="swiglu"),
                                dict(moe_experts=8, moe_top_k=3, moe_shared_experts=1)])
def test_dispatch_equals_per_token_reference_in_forward_and_gradients(kw):
    torch.manual_seed(0)
    layer = MoE(moe_cfg(**kw))
    x = torch.randn(3, 7, 16, requires_grad=True)
    fast = layer(x)
    grads_fast = torch.autograd.grad(fast.square().sum(), [x, layer.w_up, layer.w_down, layer.router.weight])
    slow = reference(layer, x)
    grads_slow = torch.autograd.grad(slow.square().sum(), [x, layer.w_up, layer.w_down, layer.router.weight])
    assert (fast - slow).abs().max() <= 1e-6
    for a, b in zip(grads_fast, grads_slow):
        assert (a - b).abs().max() <= 1e-6


def test_top_k_picks_the_largest_and_renormalises():
    torch.manual_seed(0)
    layer = MoE(moe_cfg(moe_top_k=2))
    x = torch.randn(20, 16)
    logits, weights, experts = layer.route(x)
    assert torch.equal(experts.sort(-1).values, logits.topk(2, -1).indices.sort(-1).values)
    assert torch.allclose(weights.sum(-1), torch.ones(20))
    switch = MoE(moe_cfg(moe_top_k=1))
    logits, weights, _ = switch.route(x)
    assert torch.allclose(weights[:, 0], logits.softmax(-1).max(-1).values)  # Switch: the raw probability


def test_capacity_drops_exactly_the_overflow_in_token_order():
    layer = MoE(moe_cfg(moe_top_k=1, moe_capacity_factor=1.0))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # every token with a positive first feature goes to expert 0
    x = torch.randn(1, 12, 16)
    x[..., 0] = 1.0
    out = layer(x)
    capacity = 3  # ceil(1.0 * 12 tokens * 1 / 4 experts)
    assert (out[0, :capacity].abs().sum(-1) > 0).all()
    assert (out[0, capacity:] == 0).all()  # dropped tokens contribute nothing: they ride the residual
    assert layer.stats["dropped"].item() == pytest.approx(9 / 12)


def test_load_balancing_loss_equals_its_formula_on_a_hand_example():
    layer = MoE(moe_cfg(moe_experts=2, moe_top_k=1, moe_aux_weight=0.5))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0  # logits (x0, 0)
    x = torch.zeros(4, 16)
    x[:, 0] = torch.tensor([2.0, 1.0, -1.0, 3.0])
    layer(x)
    p0 = torch.sigmoid(x[:, 0])  # softmax over (x0, 0)
    f = torch.tensor([3 / 4, 1 / 4])  # tokens 0, 1, 3 choose expert 0
    P = torch.stack([p0.mean(), (1 - p0).mean()])
    assert layer.aux_loss.item() == pytest.approx(0.5 * 2 * (f * P).sum().item(), rel=1e-6)


def test_padding_counts_in_neither_losses_nor_statistics():
    torch.manual_seed(0)
    layer = MoE(moe_cfg(moe_z_weight=0.1))
    real = torch.randn(1, 5, 16)
    padded = torch.cat([real, torch.randn(1, 3, 16) * 5], dim=1)
    layer(real)
    loss, load = layer.aux_loss.clone(), layer.stats["load"].clone()
    layer(padded, token_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]]))
    assert torch.allclose(layer.aux_loss, loss) and torch.allclose(layer.stats["load"], load)


def test_aux_loss_is_always_part_of_the_training_loss():
    torch.manual_seed(0)
    model = lmlab.Model(moe_cfg(moe_every=2))
    assert [type(b.ffn).__name__ for b in model.decoder.layers] == ["DenseFFN", "MoE"]
    x = torch.randint(0, 50, (2, 10))
    out = model(x, labels=x)
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 50), x[:, 1:].reshape(-1))
    assert out.aux_loss > 0 and torch.allclose(out.loss, plain + out.aux_loss, atol=1e-6)


def test_moe_model_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = lmlab.Model(moe_cfg(moe_router="noisy", moe_shared_experts=1)).eval()
    model.save_pretrained(tmp_path)
    back = lmlab.load(tmp_path)
    x = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(x).logits, back(x).logits)  # noise only while training


@pytest.mark.parametrize("kw,field", [(dict(moe_top_k=5), "moe_top_k"), (dict(moe_capacity_factor=0.0),
                                      "moe_capacity_factor"), (dict(moe_router="hash"), "moe_router"),
                                      (dict(moe_experts=0), "moe_experts")])
def test_bad_moe_config_is_refused(kw, field):
    with pytest.raises(lmlab.ConfigError, match=f"ModelConfig.{field}"):
        moe_cfg(**kw)


def test_info_counts_all_experts_as_parameters_but_only_k_in_flops():
    from lmlab.info import model_stats

    dense = model_stats(moe_cfg(ffn="dense"), context=8)
    moe = model_stats(moe_cfg(moe_experts=4, moe_top_k=2), context=8)
    expert = 16 * 24 * 2  # up + down of one expert
    dense_bias = 24 + 16  # the dense FFN has biases, the experts have none
    assert moe.total_params - dense.total_params == 2 * (3 * expert + 16 * 4 - dense_bias)  # per layer: 3 experts + router
    assert moe.flops_per_token - dense.flops_per_token == 2 * 2 * (expert + 16 * 4)  # 1 extra active expert + router
