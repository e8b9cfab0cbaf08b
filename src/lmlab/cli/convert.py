"""`lmlab convert`: a model folder rewritten in the other layout, tokenizer included."""

from __future__ import annotations

import argparse

from lmlab.cli.output import console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a model folder between lmlab and Hugging Face layouts, or to GGUF for llama.cpp"
    )
    p.add_argument(
        "src",
        help="model folder (lmlab or transformers layout), training checkpoint (full or sharded: "
        "RUN/checkpoints/step-N) or Hub id",
    )
    p.add_argument("dst", help="output folder (a .gguf file with --to gguf)")
    p.add_argument(
        "--to",
        choices=("hf", "lmlab", "gguf"),
        default="hf",
        help="output layout (default: hf); gguf: one file for llama.cpp / ollama, GPT-2- and LLaMA-style "
        'decoders, tokenizer included (needs pip install "lmlab[gguf]")',
    )
    p.add_argument(
        "--quantize",
        choices=("f32", "f16", "q8_0", "q4_0"),
        default=None,
        help="GGUF weight type of the 2-D weights (default: f16; norms and biases stay f32)",
    )
    p.add_argument("--force", action="store_true", help="replace DST if it exists (GGUF)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lmlab.errors import ConfigError
    from lmlab.io import convert

    if args.to == "gguf":
        from lmlab.export_gguf import write_gguf

        r = write_gguf(args.src, args.dst, args.quantize or "f16", force=args.force)
        kinds = ", ".join(f"{n} {k}" for k, n in r["tensors"].items())
        console.print(
            f"wrote GGUF [bold]{r['out']}[/] ({r['architecture']}, {r['quantize']}: {kinds} tensors, "
            f"{r['bytes'] / 2**20:.1f} MiB) with its tokenizer"
        )
        for note in r["notes"]:
            console.print(f"note: {note}")
        return
    if args.quantize or args.force:
        raise ConfigError("--quantize and --force apply to --to gguf only")
    r = convert(args.src, args.dst, to=args.to)
    fmt = "transformers (Auto classes)" if args.to == "hf" else "lmlab"
    tok = "with its tokenizer" if r["tokenizer"] else "without a tokenizer (the source folder has none)"
    console.print(f"wrote {fmt} folder [bold]{r['out']}[/] ({r['family']}, heads: {', '.join(r['heads'])}), {tok}")
