"""`lmlab eval`: perplexity on text (pseudo-perplexity for encoders), or few-shot multiple choice."""

from __future__ import annotations

import argparse

from lmlab.cli.output import console
from lmlab.errors import LmlabError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity (pseudo-perplexity for encoders) on text, or zero-/few-shot "
        "multiple-choice accuracy (lm-evaluation-harness's conventions)",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--data", nargs="+", help="text files: loss and perplexity")
    p.add_argument("--task", help="JSONL of {query, choices, gold}: log-likelihood multiple choice")
    p.add_argument("--shots", type=int, default=0, help="solved examples in the prompt (with --task)")
    p.add_argument("--seed", type=int, default=0, help="which examples become shots")
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per window (default: 128, or the model's max_seq_len if smaller)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=20_000)
    p.add_argument("--doc-sep", choices=("line", "blank"), default="line")
    p.add_argument("--field", default="text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.task:
        from lmlab.fewshot import evaluate_task

        r = evaluate_task(args.model, args.task, shots=args.shots, seed=args.seed, limit=args.limit)
        console.print(
            f"{args.model} on {args.task}, {r['shots']}-shot, {r['questions']} questions: accuracy "
            f"{r['accuracy']:.4f}, accuracy per character {r['accuracy_norm']:.4f} (chance {r['chance']:.4f})"
        )
        return
    if not args.data:
        raise LmlabError("give --data (perplexity on text) or --task (multiple-choice scoring)")
    from lmlab.evaluate import evaluate_text

    r = evaluate_text(
        args.model,
        args.data,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        doc_sep=args.doc_sep,
        field=args.field,
    )
    for note in r["notes"]:
        console.print(f"note: {note}", highlight=False)
    console.print(
        f"{args.model} ({r['family']}) on {', '.join(args.data)}: loss {r['loss']:.4f}, "
        f"{'pseudo-' if 'pseudo' in r['method'] else ''}perplexity {r['ppl']:.2f} over "
        f"{r['tokens']:,} tokens\nmethod: {r['method']}"
    )
