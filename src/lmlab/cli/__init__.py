"""The `lmlab` command: one module per command, each a thin layer over library calls. A command module
has `register(subparsers)`, which adds its parser(s) with their `func`; flags that mirror settings are
generated from the settings dataclasses (lmlab.cli.flags). Nothing here imports torch until a command
runs, so `lmlab --help` is quick."""

from __future__ import annotations

import argparse
import sys

from lmlab.cli import (
    chat,
    compare,
    convert,
    demo,
    evaluate,
    finetune,
    generate,
    info,
    pretrain,
    route,
    serve,
    tokenizer,
)
from lmlab.cli.output import error_console
from lmlab.errors import LmlabError

COMMANDS = (info, compare, generate, chat, serve, finetune, route, convert, demo, pretrain, tokenizer, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmlab", description="Pre-train, fine-tune and compare Transformer language models of every family."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what a command that relaunches itself (pretrain --nproc) passes on
    from lmlab.runtime import keep_freed_memory

    keep_freed_memory()  # large tensors reuse freed pages instead of fresh ones (LMLAB_MALLOC=default: off)
    try:
        args.func(args)
    except LmlabError as e:
        error_console().print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
