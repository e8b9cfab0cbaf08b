"""Forward + backward time of lmlab's MoE layer against transformers' MixtralSparseMoeBlock and against a
dense SwiGLU FFN of the same active FLOPs (the physical limit: an MoE layer has to do those matmuls too).

All three run in the same process on the same input, alternating, and the median of the repeats is
reported. lmlab's layer gets transformers' weights (same routing, outputs checked equal before timing)
and computes what it always computes on top: its load-balancing loss (routing statistics are computed
only when read, as the trainer does every step). Every pass starts with the parameters' gradients
cleared, as in a training step, so no implementation pays for adding into gradients left by the last.
transformers' block is taken from a MixtralForCausalLM, so it runs the experts kernel transformers
picks by default for this device and torch (`grouped_mm` on torch >= 2.9); its per-expert loop
("eager") is timed too.

    python bench/moe_layer.py                       # top-1, top-2 and two 64-expert fine-grained settings
    python bench/moe_layer.py --repeats 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import environment

SETTINGS = {  # name -> (experts, expert d_ff, top-k); every setting has 2048 active FFN units per token
    "top-1": (8, 2048, 1),
    "top-2": (8, 1024, 2),
    "64 fine-grained, top-8": (64, 256, 8),  # DeepSeekMoE-like: experts a quarter of the FFN
    "64 fine-grained, top-16": (64, 128, 16),  # an eighth: every token copied 16 times
}


def build(experts: int, d_ff: int, k: int, a: argparse.Namespace, hf_experts: str | None = None):
    import transformers

    from lmlab.config import ModelConfig
    from lmlab.model.ffn import DenseFFN
    from lmlab.model.moe import MoE

    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(
        hidden_size=a.hidden,
        intermediate_size=d_ff,
        num_local_experts=experts,
        num_experts_per_tok=k,
        hidden_act="silu",
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=128,
    )
    kwargs = {"experts_implementation": hf_experts} if hf_experts else {}
    hf_model = transformers.MixtralForCausalLM._from_config(hf_cfg, **kwargs)
    hf = hf_model.model.layers[0].mlp  # MixtralSparseMoeBlock with the kernel transformers chose
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.02)
    cfg = ModelConfig(
        d_model=a.hidden,
        n_heads=8,
        d_ff=d_ff,
        activation="swiglu",
        bias=False,
        ffn="moe",
        moe_experts=experts,
        moe_top_k=k,
        moe_aux_weight=0.01,
        moe_renormalize=True,
    )  # Mixtral's code renormalises at k=1 too
    ours = MoE(cfg)
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.experts.w_up.copy_(hf.experts.gate_up_proj.transpose(1, 2))
        ours.experts.w_down.copy_(hf.experts.down_proj.transpose(1, 2))
    dense = DenseFFN(cfg.replace(ffn="dense"), d_ff=k * d_ff)
    return hf, ours, dense, hf_model.config._experts_implementation


def timed(fn, x: torch.Tensor, grad: torch.Tensor, module: torch.nn.Module) -> float:
    """One forward + backward, with the parameters' gradients cleared first, as a training step runs
    them (`zero_grad(set_to_none=True)`): backward then writes the gradients instead of adding to them."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    y = fn(x)
    y.backward(grad)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="weights and activations (default: float32 on the CPU, bfloat16 on a GPU)",
    )
    ap.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep: glibc keeps freed memory for reuse (lmlab.keep_freed_memory); default: glibc's own",
    )
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    import lmlab

    if a.malloc == "keep":
        lmlab.keep_freed_memory()  # one process: every implementation benefits alike

    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    dtype = getattr(torch, a.dtype)
    tol = 1e-5 if dtype == torch.float32 else 5e-2

    rows = []
    for name in a.settings:
        experts, d_ff, k = SETTINGS[name]
        hf, ours, dense, default = build(experts, d_ff, k, a)
        hf_eager = build(experts, d_ff, k, a, "eager")[0]
        for m in (hf, ours, dense, hf_eager):
            m.to(device=a.device, dtype=dtype)
        x = torch.randn(1, a.tokens, a.hidden, device=a.device, dtype=dtype)
        grad = torch.randn_like(x)
        with torch.no_grad():
            for block in (hf, hf_eager):
                err = (block(x.clone()) - ours(x)[0]).abs().max().item()
                assert err < tol, f"lmlab and transformers disagree by {err}"
        impls = {
            "lmlab": (ours, lambda t: ours(t)[0]),
            f"transformers ({default}, its default)": (hf, lambda t: hf(t.clone())),
            "dense SwiGLU, same active FLOPs": (dense, lambda t: dense(t)),
        }
        if default != "eager":
            impls["transformers (eager loop)"] = (hf_eager, lambda t: hf_eager(t.clone()))
        times: dict[str, list[float]] = {n: [] for n in impls}
        for n, (m, fn) in impls.items():  # warm-up
            timed(fn, x, grad, m)
        for _ in range(a.repeats):
            for n, (m, fn) in impls.items():
                times[n].append(timed(fn, x, grad, m))
        med = {n: statistics.median(t) for n, t in times.items()}
        dense_t = med["dense SwiGLU, same active FLOPs"]
        for n, t in med.items():
            rows.append(
                {
                    "setting": name,
                    "experts": experts,
                    "d_ff": d_ff,
                    "top_k": k,
                    "impl": n,
                    "ms": t * 1e3,
                    "vs_dense": t / dense_t,
                    "lmlab_speedup": t / med["lmlab"],
                }
            )
    print(
        f"\nMoE layer forward + backward, hidden {a.hidden}, {a.tokens} tokens, SwiGLU experts, {a.dtype} on {a.device}, malloc={a.malloc}, "
        f"median of {a.repeats}"
    )
    print(environment(a.device))
    print("| setting | implementation | ms | time / dense | lmlab speed-up |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} ({r['experts']} x {r['d_ff']}) | {r['impl']} | {r['ms']:.1f} | {r['vs_dense']:.2f}x | "
            f"{r['lmlab_speedup']:.2f}x |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
