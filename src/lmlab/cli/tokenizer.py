"""`lmlab tokenizer train`: a WordPiece, byte-level BPE or Unigram tokenizer trained on text."""

from __future__ import annotations

import argparse

from lmlab.cli.output import console
from lmlab.families import TOKENIZER_KINDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a tokenizer on text")
    t.add_argument("--kind", choices=TOKENIZER_KINDS, required=True)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--data", nargs="+", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--doc-sep", choices=("line", "blank"), default="line")
    t.add_argument("--field", default="text")
    t.add_argument("--skip-bad-lines", action="store_true")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> None:
    from lmlab.data.corpus import read_corpus
    from lmlab.tokenizer import train_tokenizer

    tok = train_tokenizer(
        args.kind, read_corpus(args.data, args.doc_sep, args.field, args.skip_bad_lines), args.vocab_size
    )
    tok.save(args.out)
    console.print(
        f"trained a {args.kind} tokenizer of {tok.vocab_size:,} tokens; saved to [bold]{args.out}[/] "
        f"(special: {', '.join(f'{r}={t}' for r, t in tok.specials.items())})"
    )
