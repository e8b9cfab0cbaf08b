"""`lmlab convert`: a model folder rewritten in the other layout, tokenizer included."""

from __future__ import annotations

import argparse

from lmlab.cli.output import console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a model folder between lmlab and Hugging Face layouts, or to GGUF (llama.cpp) or ONNX (ONNX Runtime)",
    )
    p.add_argument(
        "src",
        help="model folder (lmlab or transformers layout), training checkpoint (full or sharded: "
        "RUN/checkpoints/step-N) or Hub id",
    )
    p.add_argument("dst", help="output folder (a .gguf file with --to gguf)")
    p.add_argument(
        "--to",
        choices=("hf", "lmlab", "gguf", "onnx", "peft"),
        default="hf",
        help="output layout (default: hf); gguf: one file for llama.cpp / ollama, GPT-2-, LLaMA-, Mixtral- and Qwen2-MoE-style "
        'decoders and BERT-style encoders (embeddings), tokenizer included (needs pip install "lmlab[gguf]"); onnx: a folder of ONNX graphs '
        "(encoders; decoders and prefix-LMs with a KV cache; encoder-decoders as encoder + decoder) with the "
        'tokenizer (needs pip install "lmlab[onnx]"); peft: a LoRA adapter folder (lmlab finetune --method lora) '
        "as a PEFT adapter under transformers' module names, with DST/base its base model in transformers' layout "
        "(hf writes the adapter merged)",
    )
    p.add_argument(
        "--quantize",
        choices=("f32", "f16", "q8_0", "q4_0", "int8"),
        default=None,
        help="GGUF: the type of the 2-D weights, f32|f16|q8_0|q4_0 (default: f16; norms and biases stay f32); "
        "ONNX: int8 also writes ONNX Runtime's dynamically quantized graphs (*.int8.onnx)",
    )
    p.add_argument(
        "--optimize",
        action="store_true",
        help="ONNX, encoders: fuse attention, residual + norm and GELU into ONNX Runtime's operators",
    )
    p.add_argument("--force", action="store_true", help="replace DST if it exists (GGUF, ONNX)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lmlab.errors import ConfigError
    from lmlab.io import convert

    if args.to == "onnx":
        from lmlab.export_onnx import write_onnx

        if args.quantize not in (None, "int8"):
            raise ConfigError(f"--quantize {args.quantize} is a GGUF type; ONNX takes --quantize int8")
        r = write_onnx(args.src, args.dst, optimize=args.optimize, quantize=args.quantize, force=args.force)
        files = ", ".join(f for g in r["graphs"] for f in (g["file"], g.get("int8")) if f)
        tok = "with its tokenizer" if r["tokenizer"] else "without a tokenizer (the source folder has none)"
        console.print(
            f"wrote ONNX folder [bold]{r['out']}[/] ({r['family']}: {files}; {r['bytes'] / 2**20:.1f} MiB) {tok}"
        )
        return
    if args.optimize:
        raise ConfigError("--optimize applies to --to onnx only")
    if args.to == "peft":
        from lmlab.adapters import export_hf

        r = export_hf(args.src, args.dst)
        console.print(
            f"wrote PEFT adapter [bold]{r['out']}[/] (targets: {', '.join(r['target_modules'])}; saved whole: "
            f"{', '.join(r['modules_to_save'] or ['none'])}) on its base [bold]{r['base']}[/] (transformers' layout)"
        )
        return
    if args.to == "gguf":
        from lmlab.export_gguf import write_gguf

        if args.quantize == "int8":
            raise ConfigError("--quantize int8 is ONNX's; GGUF takes f32, f16, q8_0 or q4_0 (q8_0 is its int8)")
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
        raise ConfigError("--quantize and --force apply to --to gguf and --to onnx only")
    r = convert(args.src, args.dst, to=args.to)
    fmt = "transformers (Auto classes)" if args.to == "hf" else "lmlab"
    tok = "with its tokenizer" if r["tokenizer"] else "without a tokenizer (the source folder has none)"
    console.print(f"wrote {fmt} folder [bold]{r['out']}[/] ({r['family']}, heads: {', '.join(r['heads'])}), {tok}")
