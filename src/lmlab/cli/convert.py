"""`lmlab convert`: a model folder rewritten in the other layout, tokenizer included."""

from __future__ import annotations

import argparse

from lmlab.cli.output import console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a model folder between lmlab and Hugging Face layouts")
    p.add_argument(
        "src",
        help="model folder (lmlab or transformers layout), training checkpoint (full or sharded: "
        "RUN/checkpoints/step-N) or Hub id",
    )
    p.add_argument("dst", help="output folder")
    p.add_argument("--to", choices=("hf", "lmlab"), default="hf", help="output layout (default: hf)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lmlab.io import convert

    r = convert(args.src, args.dst, to=args.to)
    fmt = "transformers (Auto classes)" if args.to == "hf" else "lmlab"
    tok = "with its tokenizer" if r["tokenizer"] else "without a tokenizer (the source folder has none)"
    console.print(f"wrote {fmt} folder [bold]{r['out']}[/] ({r['family']}, heads: {', '.join(r['heads'])}), {tok}")
