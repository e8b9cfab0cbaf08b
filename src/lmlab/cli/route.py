"""`lmlab route`: which experts of every MoE layer took each token, and with what weight."""

from __future__ import annotations

import argparse

from rich.table import Table

from lmlab.cli.output import console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("route", help="which experts each token of a text goes to, per MoE layer")
    p.add_argument("--model", required=True, help="model folder with an MoE model and its tokenizer")
    p.add_argument("text", help="the text to route")
    p.add_argument("--top", type=int, default=None, help="show at most this many experts per layer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lmlab.route import route_text

    names, rows = route_text(args.model, args.text, args.top)
    table = Table(title=f"routing of {len(rows)} tokens (expert weight; a dropped token shows no expert)")
    table.add_column("#", justify="right")
    table.add_column("token")
    for name in names:
        table.add_column(name.replace(".layers.", " ").replace(".ffn", ""))
    for i, row in enumerate(rows):
        table.add_row(
            str(i), repr(row.token)[1:-1], *[" ".join(f"{e}:{w:.2f}" for e, w in layer) or "-" for layer in row.layers]
        )
    console.print(table)
