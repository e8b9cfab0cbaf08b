"""Training throughput of lmlab against Hugging Face transformers at the same config, in the same run.

Each measurement runs in a fresh subprocess (so its peak RSS is its own), lmlab and transformers
alternate round by round, and the median of the rounds is reported. One training step is
forward + backward + fused AdamW step on a random batch, in float32 on the CPU (bf16 autocast on a GPU).
MFU = achieved training FLOP/s / the machine's measured peak (best of several large fp32 matmuls,
same threads, before and after the runs), with training FLOPs/token = 3 x forward FLOPs/token from
`lmlab.info.model_stats`; for BERT only the FLOPs the loss needs are counted (the MLM head at the
15% masked positions), for both libraries. lmlab is called as its trainer calls it
(`labelled_logits_only=True`: vocabulary logits only where there is a label); transformers'
BertForMaskedLM projects every position.

    python bench/train_throughput.py                      # both models, default config
    python bench/train_throughput.py --model gpt2 --rounds 5 --steps 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

import torch
from common import environment


def peak_flops(device: str, reps: int = 10, trials: int = 5) -> float:
    """Best of `trials` timings of a large matmul: a single timing is easily disturbed. A GPU needs a
    larger one than a CPU to reach its peak."""
    n = 8192 if device.startswith("cuda") else 2048
    return max(_matmul_flops(device, n, reps) for _ in range(trials))


def _matmul_flops(device: str, n: int, reps: int) -> float:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The model shape and batch flags `hf_config` reads (this benchmark's and bench/scale.py's)."""
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)


def hf_config(kind: str, a: argparse.Namespace):
    import transformers

    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=a.vocab,
            n_embd=a.d_model,
            n_layer=a.layers,
            n_head=a.heads,
            n_inner=4 * a.d_model,
            n_positions=a.seq_len,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=a.dropout,
            embd_pdrop=a.dropout,
            attn_pdrop=a.dropout,
        )
    return transformers.BertConfig(
        vocab_size=a.vocab,
        hidden_size=a.d_model,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        intermediate_size=4 * a.d_model,
        max_position_embeddings=a.seq_len,
        hidden_dropout_prob=a.dropout,
        attention_probs_dropout_prob=a.dropout,
    )


def _measure(kind: str, impl: str, a: argparse.Namespace, queue) -> None:
    import tempfile

    import transformers

    import lmlab

    if a.malloc == "keep":
        lmlab.keep_freed_memory()  # this process serves both the lmlab and the transformers runs alike
    torch.manual_seed(0)
    device = a.device
    arch = {"gpt2": transformers.GPT2LMHeadModel, "bert": transformers.BertForMaskedLM}[kind]
    hf = arch(hf_config(kind, a))
    if impl == "lmlab":
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            del hf
            model = lmlab.load(d)
    else:
        model = hf
    model.to(device).train()
    # fused AdamW for both: lmlab's trainer uses it, and so does transformers' Trainer by default on torch >= 2.8
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if a.compile:
        model = torch.compile(model)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq_len), device=device)
    labels = ids if kind == "gpt2" else torch.where(torch.rand(ids.shape, device=device) < 0.15, ids, -100)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step() -> None:
        with autocast:  # each library as its trainer calls it: lmlab projects only labelled positions
            extra = {"labelled_logits_only": True} if impl == "lmlab" else {}
            loss = model(input_ids=ids, labels=labels, **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    mem = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    queue.put({"tokens_per_s": a.steps * a.batch * a.seq_len / dt, "peak_bytes": mem})


def measure(kind: str, impl: str, a: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_measure, args=(kind, impl, a, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("gpt2", "bert", "both"), default="both")
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.1, help="all dropout rates (transformers' default 0.1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep: glibc keeps freed memory for reuse (lmlab.keep_freed_memory, as the lmlab "
        "command runs); default: glibc's own behaviour",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (compiled during the warm-up)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()

    from lmlab.hf import config_from_hf
    from lmlab.info import model_stats

    peak = peak_flops(a.device)
    kinds = ("gpt2", "bert") if a.model == "both" else (a.model,)
    rows = []
    for kind in kinds:
        raw = hf_config(kind, a).to_dict()
        raw["architectures"] = ["GPT2LMHeadModel" if kind == "gpt2" else "BertForMaskedLM"]
        stats = model_stats(config_from_hf(raw), context=a.seq_len)
        needed = stats.train_flops_per_token
        if kind == "bert":  # the MLM head's work at the 85% of positions without a label is not needed
            needed -= 6 * (a.d_model * a.d_model + a.vocab * a.d_model) * 0.85
        runs: dict[str, list[dict]] = {"lmlab": [], "transformers": []}
        for _ in range(a.rounds):
            for impl in ("lmlab", "transformers"):
                runs[impl].append(measure(kind, impl, a))
        peak = max(peak, peak_flops(a.device))  # measured again after the runs; the best counts
        med = {impl: statistics.median(r["tokens_per_s"] for r in rs) for impl, rs in runs.items()}
        mem = {impl: max(r["peak_bytes"] for r in rs) for impl, rs in runs.items()}
        for impl in ("lmlab", "transformers"):
            rows.append(
                {
                    "model": kind,
                    "impl": impl,
                    "tokens_per_s": med[impl],
                    "peak_mb": mem[impl] / 2**20,
                    "train_flops_per_token": needed,
                    "ratio": med[impl] / med["transformers"],
                    "params": stats.total_params,
                }
            )
    for r in rows:  # against the best peak seen over the whole run
        r["mfu"] = r["tokens_per_s"] * r["train_flops_per_token"] / peak
    print(
        f"\ntraining throughput, {a.device}, d_model={a.d_model} layers={a.layers} heads={a.heads} "
        f"vocab={a.vocab} seq_len={a.seq_len} batch={a.batch} dropout={a.dropout}{' compiled' if a.compile else ''} malloc={a.malloc}; median of {a.rounds} rounds x {a.steps} steps; "
        f"peak {peak / 1e9:.1f} GFLOP/s"
    )
    print(environment(a.device, "bf16 autocast" if a.device.startswith("cuda") else ""))
    print("| model | implementation | tokens/s | vs transformers | MFU | peak memory (MB) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['impl']} | {r['tokens_per_s']:,.0f} | {r['ratio']:.3f}x | {r['mfu']:.1%} | "
            f"{r['peak_mb']:,.0f} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "peak_flops": peak, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
