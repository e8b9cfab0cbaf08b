"""`lmlab demo`: the README's main job, pre-training a tiny GPT and BERT on the built-in corpus, then using them."""

from __future__ import annotations

import argparse

from rich.table import Table

from lmlab.cli.output import TrainingProgress, console
from lmlab.errors import LmlabError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="pre-train a tiny GPT and BERT on the built-in corpus, sample, fill masks")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per model (default: 200)")
    p.add_argument("--skip-minilm", action="store_true", help="skip the real-weights similarity part")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lmlab.demo import train_demo_models, use_demo_models

    console.rule("[bold]lmlab demo: a tiny GPT and a tiny BERT pre-trained on the King James Bible")
    with TrainingProgress() as progress:
        results = train_demo_models(args.out, args.steps, lambda name: progress.run(name, "tokenizer + data"))
    for name, r in results.items():
        console.print(
            f"{name}: {r['parameters']:,} parameters, {r['tokens']:,} training tokens in "
            f"{r['minutes']:.1f} min, objective {r['objective']}; folder {r['out']}, curves {r['plot']}"
        )
    used = use_demo_models(args.out)
    console.rule("[bold]GPT: sampled continuation (top-k 40, temperature 0.8, seed 0)")
    console.print(f"[bold]{used['prompt']}[/]{used['continuation']}", highlight=False)
    console.rule("[bold]BERT: fill-mask")
    console.print(used["masked"], highlight=False)
    table = Table()
    table.add_column("candidate")
    table.add_column("probability", justify="right")
    for token, p in used["candidates"]:
        table.add_row(token, f"{p:.3f}")
    console.print(table)
    accuracy = (results["bert"].get("val") or {}).get("accuracy")
    if accuracy is not None and accuracy < 0.2:
        # say what the table shows rather than let it pass for a finding about BERT
        console.print(
            f"[dim]The tiny BERT predicts {accuracy:.0%} of masked tokens right. Masked LM learns only from "
            "the 15% of tokens it masks, so after this few steps it still proposes the corpus's most "
            "frequent words, where a tiny GPT learns from every token. It climbs slowly with more steps "
            "(--steps 400: 12% measured); docs/benchmarks.md (fine-tuning) has the measurements.[/]",
            highlight=False,
        )
    if not args.skip_minilm:
        _minilm()


def _minilm() -> None:
    from lmlab.demo import minilm_folder, rank_by_similarity

    try:
        folder = minilm_folder()
    except LmlabError as e:
        console.print(f"(skipping the real-weights part: {e})")
        return
    console.rule("[bold]real weights: all-MiniLM-L6-v2 (BERT architecture) loaded by lmlab")
    for query, hits in rank_by_similarity(folder):
        console.print(f"{query!r} -> " + "; ".join(f"{s} ({score:.2f})" for s, score in hits), highlight=False)
