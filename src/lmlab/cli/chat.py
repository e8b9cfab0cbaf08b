"""`lmlab chat`: talk to a chat model in the terminal (or through a pipe: one message per line)."""

from __future__ import annotations

import argparse
import sys

from lmlab.cli.output import console, error_console
from lmlab.errors import LmlabError

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /quit"


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="the longest answer (default: 128, or half the model's context window if that is smaller)",
    )
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def sampling(args: argparse.Namespace) -> dict:
    return dict(
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="an interactive chat with a chat model folder (streams the answers)")
    p.add_argument("--model", required=True, help="a chat model folder (`lmlab finetune --task chat`)")
    p.add_argument("--system", default=None, help="the system message")
    add_sampling(p)
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> None:
    from lmlab.chat import ChatSession, stop_ids
    from lmlab.cli.generate import fitted_max_new_tokens, model_and_tokenizer

    model, tok = model_and_tokenizer(args.model)
    max_new = fitted_max_new_tokens(args.max_new_tokens, 128, model.config)
    session = ChatSession(model, tok, stop_ids(args.model, tok), args.system, max_new_tokens=max_new, **sampling(args))
    interactive = sys.stdin.isatty()
    console.print(f"chatting with {args.model} (context window {session.window} tokens); {HELP}", highlight=False)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                session.reset()
                console.print("(conversation reset)")
            elif command == "/system":
                session.system = rest.strip() or None
                console.print(f"(system message {'set' if session.system else 'removed'})")
            else:
                console.print(f"(unknown command {command}; {HELP})", highlight=False)
            continue
        try:
            answer = session.ask(line)
        except LmlabError as e:
            error_console().print(f"[bold red]error:[/] {e}", highlight=False)
            continue
        if session.dropped:
            console.print(
                f"(dropped the {session.dropped} oldest turns to fit the {session.window}-token context window)"
            )
        sys.stdout.write("assistant> ")
        for piece in answer:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        session.remember(answer)
