"""`lmlab finetune` (settings from defaults, a YAML file, then flags) and `lmlab predict`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmlab.cli.flags import add_fields, collect
from lmlab.cli.output import TrainingProgress, console
from lmlab.errors import LmlabError
from lmlab.settings import FinetuneConfig, load_yaml, resumed_finetune_config
from lmlab.tasks import TASK_NAMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help=f"fine-tune a model folder for a task ({', '.join(TASK_NAMES)})")
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    p.add_argument("--task", choices=TASK_NAMES, help="the task (lmlab.tasks)")
    add_fields(p, FinetuneConfig, skip=("task",))
    p.add_argument(
        "--nproc",
        type=int,
        help="fine-tune on N processes of this machine: relaunches itself under torchrun with --parallel ddp "
        "(or the --parallel given); rank 0 alone evaluates and saves",
    )
    p.set_defaults(func=run_finetune)
    p = sub.add_parser("predict", help="predictions of a fine-tuned folder, as JSONL")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="a file of the task's format (labels are not needed)")
    p.add_argument("--out", help="JSONL file (default: standard output)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=run_predict)
    p = sub.add_parser("merge", help="merge a LoRA / DoRA adapter folder into a plain model folder")
    p.add_argument("adapter", help="an adapter folder of `lmlab finetune --method lora|dora`")
    p.add_argument("out", help="the merged folder to write")
    p.set_defaults(func=run_merge)


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    settings = load_yaml(args.config) if args.config else {}
    settings.update(collect(args, FinetuneConfig))
    if settings.get("resume"):  # the run's own settings from its folder; the ones given may change little
        if not settings.get("out"):
            raise LmlabError("--resume continues the run in --out: give --out")
        return resumed_finetune_config(settings.pop("out"), settings)
    return FinetuneConfig.from_dict(settings, args.config or "command line")


def run_finetune(args: argparse.Namespace) -> None:
    from lmlab.cli.pretrain import launched
    from lmlab.finetune import finetune

    fc = finetune_config(args)  # checks the settings before any process is started
    if launched(args, "finetune", lambda: finetune(fc)):
        return
    with TrainingProgress() as progress:
        result = finetune(fc, progress.run(f"fine-tune {fc.task}"))
    what = "model" if fc.method == "full" else f"{fc.method} adapter (PEFT's format)"
    console.print(
        f"done: {result['steps']} steps on {result['train_examples']:,} examples in "
        f"{result['minutes']:.1f} min; {what} saved to [bold]{fc.out}[/] "
        f"({result['trainable_params']:,} of {result['total_params']:,} parameters trained)"
    )
    if result.get("best"):
        best = result["best"]
        how = "early stopping" if result.get("stopped_early") else "the best evaluation"
        console.print(f"{how}: the saved model is step {best['step']}'s ({best['metric']} {best['value']:.4f})")
    if result["eval"]:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result["eval"].items() if isinstance(v, float))
        console.print(
            f"evaluation on {result['eval_examples']:,} examples: {shown}  (also in {fc.out}/eval_results.json)"
        )
        for key, name in (("bleu_signature", "BLEU"), ("chrf_signature", "chrF")):
            if key in result["eval"]:
                console.print(f"{name} signature: {result['eval'][key]}", highlight=False)
        if (Path(fc.out) / "predictions.jsonl").is_file():
            console.print(f"predictions: {fc.out}/predictions.jsonl")


def run_predict(args: argparse.Namespace) -> None:
    from lmlab.finetune import predict

    rows = predict(args.model, args.data, batch_size=args.batch_size)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.out:
        Path(args.out).write_text(lines, encoding="utf-8")
        console.print(f"{len(rows):,} predictions written to {args.out}")
    else:
        sys.stdout.write(lines)


def run_merge(args: argparse.Namespace) -> None:
    from lmlab.finetune import merge

    out = merge(args.adapter, args.out)
    console.print(f"merged {args.adapter} into [bold]{out}[/]")
