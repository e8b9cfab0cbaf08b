"""`lmlab generate` (continue or answer a prompt) and `lmlab fill-mask` (encoders)."""

from __future__ import annotations

import argparse
import sys

from rich.table import Table

from lmlab.cli.output import console, error_console
from lmlab.errors import LmlabError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt (decoder / prefix-lm) or answer it (encoder-decoder)")
    p.add_argument("--model", required=True, help="model folder with its tokenizer")
    p.add_argument("prompt")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate (default: 64, or half the model's context window if that is smaller)",
    )
    p.add_argument("--beams", type=int, default=1, help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam scores / length**penalty")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy / beam decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-return", type=int, default=1, help="sequences to return (samples, or the n best beams)")
    p.add_argument("--stop", action="append", help="stop when the text contains this string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (one sequence)")
    p.add_argument(
        "--prompt-lookup",
        type=int,
        default=None,
        metavar="K",
        help="greedy decoding with drafts of up to K tokens copied from the text so far, verified in one "
        "forward (the output is greedy's; faster where the answer repeats its input)",
    )
    p.add_argument(
        "--draft-model",
        default=None,
        metavar="DIR",
        help="greedy decoding with drafts from this smaller model (the same tokenizer), verified in one forward",
    )
    p.add_argument("--draft-tokens", type=int, default=5, help="tokens per draft with --draft-model (default 5)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user message: render it with the folder's chat template and print the answer",
    )
    p.add_argument("--system", default=None, help="with --chat: the system message")
    add_decoding_flags(p)
    p.set_defaults(func=run_generate)
    p = sub.add_parser("fill-mask", help="top candidates for each [MASK] of a sentence (encoders)")
    p.add_argument("--model", required=True, help="encoder folder with an mlm head and its tokenizer")
    p.add_argument("text", help='e.g. "Paris is the [MASK] of France."')
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=run_fill_mask)


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    """--dtype and --quantize, as `lmlab generate` and `lmlab serve` take them (lmlab.quantize)."""
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="weights and activations while decoding (scores are ranked in float32). auto: bfloat16 on "
        "CPUs with native bf16 matmuls (AMX / AVX-512-bf16), float32 otherwise (without them bf16 "
        "batches decode slower; docs/benchmarks.md)",
    )
    p.add_argument(
        "--quantize",
        choices=("none", "int8", "fp16"),
        default="none",
        help="linear layers through torch's fbgemm kernels (lmlab.quantize): int8 weights (a quarter of the "
        "bytes) or fp16 weights (half, float32 activations)",
    )


def model_and_tokenizer(folder: str, dtype: str | None = None, quantize: str | None = None):
    """The folder's model (`lmlab.load` with `dtype` and `quantize`; as saved without them) and its tokenizer."""
    from lmlab.io import load
    from lmlab.tokenizer import load_tokenizer

    model = load(folder, dtype=dtype, quantize=quantize)
    try:
        tok = load_tokenizer(folder)
    except LmlabError as e:
        raise LmlabError(f"{folder}: the model folder has no usable tokenizer ({e})") from None
    return model, tok


def fitted_max_new_tokens(given: int | None, default: int, cfg) -> int:
    """--max-new-tokens as given, or `default` where it leaves half the model's window to the prompt
    (else that half, said once)."""
    if given is not None:
        return given
    value, note = cfg.fit_default(default, "--max-new-tokens", share=2)
    if note:  # on standard error: standard output is the generated text
        error_console().print(f"note: {note}", highlight=False)
    return value


def run_generate(args: argparse.Namespace) -> None:
    from lmlab.generate import complete, stream

    model, tok = model_and_tokenizer(args.model, args.dtype, args.quantize)
    args.max_new_tokens = fitted_max_new_tokens(args.max_new_tokens, 64, model.config)
    head = "" if model.config.spec.seq2seq else args.prompt  # a decoder continues the prompt: show it
    prompt, stops = args.prompt, None
    if args.chat:
        from lmlab.chat import ChatSession, stop_ids

        session = ChatSession(model, tok, stop_ids(args.model, tok), args.system, max_new_tokens=args.max_new_tokens)
        session.history.append({"role": "user", "content": args.prompt})
        prompt, _ = session.prompt()
        head, stops = "", session.stops
    elif args.system:
        raise LmlabError("--system goes with --chat")
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_strings=args.stop or None,
        eos_token_id=stops,
    )
    if args.prompt_lookup is not None:
        kw["prompt_lookup_num_tokens"] = args.prompt_lookup
    if args.draft_model is not None:
        kw["assistant_model"], _ = model_and_tokenizer(args.draft_model, args.dtype, args.quantize)
        kw["num_assistant_tokens"] = args.draft_tokens
    if args.stream and args.beams == 1 and args.num_return == 1:
        pieces = stream(model, tok, prompt, **kw)
        sys.stdout.write(head)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    outs = complete(
        model,
        tok,
        prompt,
        num_beams=args.beams,
        length_penalty=args.length_penalty,
        num_return_sequences=args.num_return,
        **kw,
    )
    for i, c in enumerate(outs):
        if len(outs) > 1:
            console.rule(f"{i + 1}")
        console.print(f"[bold]{head}[/]{c.text}" if head else c.text, highlight=False)


def run_fill_mask(args: argparse.Namespace) -> None:
    from lmlab.generate import fill_mask

    model, tok = model_and_tokenizer(args.model)
    for i, candidates in enumerate(fill_mask(model, tok, args.text, top_k=args.top_k)):
        table = Table(title=f"mask {i + 1}" if args.text.count("[MASK]") > 1 else None)
        table.add_column("candidate")
        table.add_column("probability", justify="right")
        for token, p in candidates:
            table.add_row(token, f"{p:.4f}")
        console.print(table)
