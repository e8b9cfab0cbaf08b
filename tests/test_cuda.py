"""On a CUDA GPU: parity with transformers there, flash attention under bf16, the grouped-GEMM experts,
torch.compile and a bf16 pre-training run. Skipped where torch sees no GPU (CI has none)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_hf, padded_batch

import lmlab

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 would make both sides' float32 matmuls differ at 1e-3; the parity claim is about float32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize(
    "arch", ["GPT2LMHeadModel", "BertForMaskedLM", "T5ForConditionalGeneration", "MixtralForCausalLM"]
)
def test_same_logits_as_transformers_on_the_gpu(tmp_path, arch):
    hf = build_hf(arch)
    hf.save_pretrained(tmp_path)
    ours = lmlab.load(tmp_path).cuda().eval()
    hf = hf.cuda()
    ids, mask = padded_batch([7, 5], pad_id=0, low=3)
    ids, mask = ids.cuda(), mask.cuda()
    kw = {"decoder_input_ids": ids[:, :4]} if "T5" in arch else {}
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, **kw).logits
        got = ours(input_ids=ids, attention_mask=mask, **kw).logits
    keep = mask.bool() if not kw else torch.ones(want.shape[:2], dtype=torch.bool, device="cuda")
    assert (got[keep] - want[keep]).abs().max() < 1e-4


def _flash_only():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # any other kernel needed -> RuntimeError


@pytest.mark.parametrize("preset", ["gpt2-tiny", "bert-tiny"])
def test_bf16_training_step_runs_on_flash_attention_and_tracks_float32(preset):
    from lmlab.config import preset as get_preset

    torch.manual_seed(0)
    model = lmlab.Model(get_preset(preset, vocab_size=512, max_seq_len=128, dropout=0.0)).cuda()
    ids = torch.randint(5, 512, (4, 128), device="cuda")
    labels = (
        ids
        if model.config.family == "decoder"
        else torch.where(torch.rand_like(ids, dtype=torch.float) < 0.15, ids, -100)
    )
    ref = model(input_ids=ids, labels=labels).loss
    with _flash_only(), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    assert math.isfinite(loss.item()) and abs(loss.item() - ref.item()) < 0.02 * ref.item()
    grads = [p.grad for p in model.parameters() if p.grad is not None]  # BERT's NSP head has none here
    assert len(grads) > 0.8 * len(list(model.parameters())) and all(torch.isfinite(g).all() for g in grads)


def test_grouped_gemm_is_used_for_bf16_experts_and_equals_the_loop(monkeypatch):
    import lmlab.model.moe.experts as moe
    from lmlab.config import ModelConfig
    from lmlab.model.moe import MoE

    assert moe._GROUPED_MM is not None, f"torch {torch.__version__} offers no grouped GEMM"
    calls = []
    real = moe._GROUPED_MM
    monkeypatch.setattr(moe, "_GROUPED_MM", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=256, n_heads=4, d_ff=512, activation="swiglu", bias=False, ffn="moe", moe_experts=16, moe_top_k=4
    )
    layer = MoE(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(2048, 256, device="cuda", dtype=torch.bfloat16)
    fast, _ = layer(x)
    assert calls, "the grouped GEMM was not taken"
    monkeypatch.setattr(moe, "_GROUPED_MM", None)
    slow, _ = layer(x)
    assert (fast.float() - slow.float()).abs().max() < 2e-2 * slow.float().abs().max()


def test_torch_compile_matches_eager_in_loss_and_gradients():
    from lmlab.config import preset as get_preset

    torch.manual_seed(0)
    model = lmlab.Model(get_preset("gpt2-tiny", vocab_size=512, max_seq_len=64, dropout=0.0)).cuda()
    ids = torch.randint(0, 512, (4, 64), device="cuda")
    eager = model(input_ids=ids, labels=ids).loss
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model)(input_ids=ids, labels=ids).loss
    compiled.backward()
    assert abs(compiled.item() - eager.item()) < 1e-4
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-4, rtol=1e-3), n


def test_pretrain_on_the_gpu_uses_bf16_and_compile_and_learns(tmp_path):
    from lmlab.pretrain import PretrainConfig, pretrain
    from lmlab.train import TrainConfig

    cfg = PretrainConfig(
        out=str(tmp_path / "run"),
        family="decoder",
        vocab_size=1000,
        seq_len=128,
        cache_dir=str(tmp_path / "cache"),
        train=TrainConfig(
            max_steps=60,
            batch_size=16,
            lr=2e-3,
            warmup_steps=10,
            eval_every=30,
            eval_batches=4,
            log_every=10,
            compile=True,
            device="cuda",
        ),
    )
    summary = pretrain(cfg)  # the built-in demo corpus
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["split"] == "train"]
    assert summary["steps"] == 60 and train[-1] < train[0] - 1.0
    assert math.isfinite(summary["val"]["loss"])
    assert lmlab.load(tmp_path / "run").config.vocab_size == 1000
