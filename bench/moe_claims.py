"""Three claims MoE users read about, tested small and honestly on the built-in demo corpus (KJV).

(a) The load-balancing loss evens out the experts: a GShard-style top-2 decoder (8 experts, dropless)
    trained with alpha = 0.01 and with alpha = 0; we report the coefficient of variation (CV) of the
    expert load, averaged over MoE layers and the last quarter of training.
(b) A top-1 MoE decoder beats the dense decoder of the same active FLOPs after the same tokens:
    switch-tiny (8 experts as wide as the dense FFN in every 2nd layer, capacity factor 1.25) against
    gpt2-tiny; we report validation loss.
(c) MoE++ zero-computation experts raise throughput at equal quality: moepp-tiny (8 FFN experts + 1
    zero, 1 copy, 2 constant experts, gating residuals) against mixtral-tiny (the same 8 FFN experts,
    top-2); we report training tokens/s (mean over logging windows, evaluation excluded), the share of
    assignments that went to FFN experts, and validation loss.

Every run trains on the same tokenizer, data, split, seed, batch size, sequence length and token budget;
the runs of a pair run back to back. What we measure is reported, whichever way it falls.

    python bench/moe_claims.py --tokens 500000 --out runs/moe_claims
    python bench/moe_claims.py --tokens 500000 --out runs/moe_claims --runs mixtral moepp --keep   # re-run (c)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lmlab.plots import read_metrics
from lmlab.pretrain import PretrainConfig, pretrain
from lmlab.train import TrainConfig

RUNS = {  # name -> (preset, ModelConfig overrides)
    "top2-lb": ("gshard-tiny", {"moe_capacity_factor": None, "moe_every": 1, "moe_aux_weight": 0.01}),
    "top2-no-lb": ("gshard-tiny", {"moe_capacity_factor": None, "moe_every": 1, "moe_aux_weight": 0.0}),
    "dense": ("gpt2-tiny", {}),
    "switch": ("switch-tiny", {}),
    "mixtral": ("mixtral-tiny", {}),
    "moepp": ("moepp-tiny", {}),
}


def run(name: str, a: argparse.Namespace, tokenizer: str | None) -> dict:
    preset, overrides = RUNS[name]
    out = Path(a.out) / name
    train = TrainConfig(
        max_tokens=a.tokens,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup_steps=a.warmup,
        eval_every=10**9,
        eval_batches=a.eval_batches,
        save_every=10**9,
        log_every=10,
        seed=a.seed,
    )
    pc = PretrainConfig(
        out=str(out),
        preset=preset,
        seq_len=a.seq_len,
        model=overrides,
        train=train,
        tokenizer=tokenizer,
        vocab_size=a.vocab_size,
    )
    summary = pretrain(pc)
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    result = {
        "name": name,
        "preset": preset,
        "overrides": overrides,
        "val_loss": summary["val"]["loss"],
        "val_ppl": summary["val"]["ppl"],
        "parameters": summary["parameters"],
        "tokens": summary["tokens"],
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in records[1:] or records),
        "curve": [(r["step"], r["loss"]) for r in records],
    }
    moe = [r["moe"] for r in records if r.get("moe")]
    if moe:
        tail = moe[-max(1, len(moe) // 4) :]
        result["cv"] = statistics.mean(layer["cv"] for rec in tail for layer in rec)
        result["cv_curve"] = [
            (r["step"], statistics.mean(layer["cv"] for layer in r["moe"])) for r in records if r.get("moe")
        ]
        import lmlab

        n_ffn = lmlab.load(out).config.moe_experts
        result["ffn_share"] = statistics.mean(sum(layer["load"][:n_ffn]) for rec in tail for layer in rec)
    return result


def plot(results: dict[str, dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in ("top2-lb", "top2-no-lb"):
        steps, cv = zip(*results[name]["cv_curve"])
        axes[0].plot(steps, cv, label=f"{name} (final CV {results[name]['cv']:.2f})")
    axes[0].set_title("(a) expert-load CV, top-2, 8 experts")
    axes[0].set_ylabel("coefficient of variation of load")
    for ax, pair, title in (
        (axes[1], ("dense", "switch"), "(b) same active FLOPs: train loss"),
        (axes[2], ("mixtral", "moepp"), "(c) MoE++ vs plain MoE: train loss"),
    ):
        for name in pair:
            steps, loss = zip(*results[name]["curve"])
            ax.plot(
                steps,
                loss,
                label=f"{name} (val {results[name]['val_loss']:.3f}, {results[name]['tokens_per_s']:,.0f} tok/s)",
                lw=1,
            )
        ax.set_title(title)
        ax.set_ylabel("training loss")
        ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per run")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=40)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--out", default="runs/moe_claims")
    ap.add_argument("--plot", help="where to write the figure (default: OUT/moe_claims.png)")
    ap.add_argument(
        "--keep", action="store_true", help="keep the results already in OUT/results.json for runs not named in --runs"
    )
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    tokenizer = None
    if a.keep and (out / "results.json").is_file():  # e.g. re-measure one pair on a quiet machine
        results = {k: v for k, v in json.loads((out / "results.json").read_text()).items() if k not in a.runs}
        tokenizer = str(out / next(iter(results)) / "tokenizer.json") if results else None
    for name in a.runs:
        results[name] = run(name, a, tokenizer)
        tokenizer = tokenizer or str(out / name / "tokenizer.json")  # every later run uses the first one's
        (out / "results.json").write_text(json.dumps(results, indent=2))
        r = results[name]
        print(
            f"{name}: val loss {r['val_loss']:.4f}, {r['tokens_per_s']:,.0f} tok/s"
            + (f", load CV {r['cv']:.3f}" if "cv" in r else ""),
            flush=True,
        )

    print(
        f"\nMoE claims on the demo corpus: {a.tokens:,} training tokens per run, seq_len {a.seq_len}, "
        f"batch {a.batch_size}, lr {a.lr}, seed {a.seed}\n"
    )
    print(
        "| claim | run | parameters | validation loss | tokens/s | load CV | FFN share |\n|---|---|---|---|---|---|---|"
    )
    claim = {"top2-lb": "a", "top2-no-lb": "a", "dense": "b", "switch": "b", "mixtral": "c", "moepp": "c"}
    for name in [n for n in RUNS if n in results]:
        r = results[name]
        print(
            f"| ({claim[name]}) | {name} ({r['preset']}) | {r['parameters']:,} | {r['val_loss']:.4f} | "
            f"{r['tokens_per_s']:,.0f} | {r.get('cv', float('nan')):.3f} | {r.get('ffn_share', float('nan')):.2f} |"
        )
    if set(RUNS) <= set(results):
        print(f"\nfigure: {plot(results, Path(a.plot) if a.plot else out / 'moe_claims.png')}")


if __name__ == "__main__":
    main()
