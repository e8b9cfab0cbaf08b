"""Training at scale on this machine: the precision `--precision auto` picks against transformers, and
one process against two.

Part 1, precision, in one process: a training step (forward, backward, fused AdamW) of the same
GPT-2-shaped model for
- lmlab in float32;
- lmlab with `--precision auto`'s choice (bf16 autocast on CPUs with AMX / AVX-512-bf16, float32
  elsewhere);
- lmlab under bf16 autocast, forced;
- transformers in float32 (its default);
- transformers under bf16 autocast.
The contenders alternate round by round and the median step time is reported, with ratios against
transformers' float32 and bf16 steps.

Part 2, processes: `lmlab pretrain` on the demo corpus with one process (all cores) and with
`--nproc 2` (DDP over gloo, one core each), the same global batch and steps; training tokens/s
from metrics.jsonl (the median of the logged windows after the first). On a 2-core machine two
processes share the cores one process already uses, so no speed-up is to be expected: the figure
shows what DDP's communication costs, not how it scales.

    python bench/scale.py                          # both parts
    python bench/scale.py --part precision --rounds 5
    python bench/scale.py --part processes --steps 40
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import environment
from train_throughput import add_shape_args, hf_config


def precision_part(a: argparse.Namespace) -> list[dict]:
    import transformers

    import lmlab
    from lmlab.train.trainer import precision_choice

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config("gpt2", a)).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = lmlab.load(d).train()
    auto = precision_choice("auto", torch.device("cpu"))
    ids = torch.randint(0, a.vocab, (a.batch, a.seq_len))
    models = {"lmlab": ours, "transformers": hf}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for name, m in models.items()}
    native = auto["precision"] == "bf16"
    contenders = {
        "lmlab float32": ("lmlab", None),
        f"lmlab --precision auto ({auto['precision']})": ("lmlab", torch.bfloat16 if native else None),
        "lmlab bf16 autocast": ("lmlab", torch.bfloat16),
        "transformers float32": ("transformers", None),
        "transformers bf16 autocast": ("transformers", torch.bfloat16),
    }
    if not native and not a.force_bf16:  # emulated bf16 GEMMs: a step would take minutes
        bf16_note = emulated_bf16_note()
        contenders = {k: v for k, v in contenders.items() if v[1] is None}

    def step(name: str, dtype: torch.dtype | None) -> float:
        model, opt = models[name], opts[name]
        extra = {"labelled_logits_only": True} if name == "lmlab" else {}  # as lmlab's trainer calls it
        ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        t = time.perf_counter()
        with ctx:
            loss = model(input_ids=ids, labels=ids, **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for name, (impl, dtype) in contenders.items():  # warm-up
        step(impl, dtype)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(a.rounds):
        for name, (impl, dtype) in contenders.items():
            times[name].append(statistics.median(step(impl, dtype) for _ in range(a.steps_per_round)))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nPart 1: precision. auto's choice here: {auto['precision']} ({auto['why']})")
    if not native and not a.force_bf16:
        print(bf16_note)
    print(environment())
    print(
        f"GPT-2 shape d_model={a.d_model} layers={a.layers} vocab={a.vocab}, batch {a.batch} x {a.seq_len}, "
        f"median of {a.rounds} rounds x {a.steps_per_round} steps"
    )
    bf16 = "transformers bf16 autocast" in med
    print(
        "| contender | ms per step | tokens/s | vs transformers float32 |"
        + (" vs transformers bf16 |" if bf16 else "")
        + "\n|---|---|---|---|"
        + ("---|" if bf16 else "")
    )
    rows = []
    for name in contenders:
        row = {
            "contender": name,
            "ms_per_step": med[name] * 1e3,
            "tokens_per_s": a.batch * a.seq_len / med[name],
            "vs_hf_fp32": med["transformers float32"] / med[name],
        }
        if bf16:
            row["vs_hf_bf16"] = med["transformers bf16 autocast"] / med[name]
        rows.append(row)
        tail = f" {row['vs_hf_bf16']:.2f}x |" if bf16 else ""
        print(f"| {name} | {row['ms_per_step']:.0f} | {row['tokens_per_s']:,.0f} | {row['vs_hf_fp32']:.2f}x |{tail}")
    return rows


def emulated_bf16_note(n: int = 2048, k: int = 512) -> str:
    """Why the bf16 contenders were left out: one (n x k) @ (k x n) matmul and its backward, both ways."""
    x, w = torch.randn(n, k), torch.randn(k, n, requires_grad=True)
    took = {}
    for name, ctx in (("float32", contextlib.nullcontext()), ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        t = time.perf_counter()
        with ctx:
            y = x @ w
        y.float().sum().backward()
        took[name] = time.perf_counter() - t
    return (
        f"bf16 contenders left out (--force-bf16 runs them): no native bf16 on this CPU; one {n}x{k}x{n} matmul "
        f"with its backward takes {took['float32']:.2f} s in float32 and {took['bf16']:.2f} s under bf16 autocast "
        f"({took['bf16'] / took['float32']:.0f}x slower)"
    )


def processes_part(a: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for nproc in (1, 2, 1, 2):  # alternating: each count twice
            out = Path(d) / f"run-{nproc}-{len(rows)}"
            command = [
                sys.executable, "-m", "lmlab", "pretrain", "--preset", "gpt2-tiny", "--out", str(out),
                "--max-steps", str(a.steps), "--batch-size", str(a.global_batch), "--log-every", "5",
                "--eval-every", str(10 * a.steps), "--save-every", str(10 * a.steps), "--nproc", str(nproc),
                "--cache-dir", str(Path(d) / "cache"),
            ]  # fmt: skip
            if nproc > 1:
                command += ["--parallel", "ddp"]
            t = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, text=True)
            wall = time.perf_counter() - t
            records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            speeds = [r["tokens_per_s"] for r in records if r["split"] == "train"][1:]
            rows.append({"processes": nproc, "tokens_per_s": statistics.median(speeds), "wall_s": wall})
    print("\nPart 2: processes. lmlab pretrain --preset gpt2-tiny on the demo corpus, global batch "
          f"{a.global_batch}, {a.steps} steps; each count run twice, alternating")  # fmt: skip
    print(environment())
    print("| processes | training tokens/s (median of 2 runs) | wall s incl. start-up |\n|---|---|---|")
    summary = []
    for n in (1, 2):
        mine = [r for r in rows if r["processes"] == n]
        row = {
            "processes": n,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
            "wall_s": statistics.median(r["wall_s"] for r in mine),
        }
        summary.append(row)
        print(f"| {n} | {row['tokens_per_s']:,.0f} | {row['wall_s']:.1f} |")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("precision", "processes", "both"), default="both")
    add_shape_args(ap)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--force-bf16", action="store_true", help="part 1: time bf16 autocast even where it is emulated")
    ap.add_argument("--steps", type=int, default=30, help="part 2: training steps per run")
    ap.add_argument("--global-batch", type=int, default=16, help="part 2: sequences per step, all processes")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    result = {"args": vars(a)}
    if a.part in ("precision", "both"):
        result["precision"] = precision_part(a)
    if a.part in ("processes", "both"):
        result["processes"] = processes_part(a)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
