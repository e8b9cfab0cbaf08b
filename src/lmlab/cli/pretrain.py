"""`lmlab pretrain`: settings from defaults, then a YAML file, then the flags given."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
from typing import Any

from lmlab.cli.flags import add_fields, collect
from lmlab.cli.output import TrainingProgress, console
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.settings import PretrainConfig, TrainConfig, load_yaml, resumed_pretrain_config

_MOE = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name.startswith("moe_"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pre-train a model on text (default: the built-in demo corpus)")
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    add_fields(p, PretrainConfig)
    add_fields(p.add_argument_group("training (budgets, optimisation)"), TrainConfig, dest="train.")
    p.add_argument(
        "--model-set",
        action="append",
        metavar="KEY=VALUE",
        help="override a ModelConfig field, e.g. --model-set n_layers=2 (repeatable)",
    )
    add_fields(
        p.add_argument_group(
            "Mixture-of-Experts (any --moe-* flag turns the FFNs into MoE layers; see lmlab.model.moe)"
        ),
        ModelConfig,
        dest="model.",
        only=_MOE,
    )
    p.add_argument(
        "--nproc",
        type=int,
        help="train on N processes of this machine: relaunches itself under torchrun with --parallel ddp "
        "(for several machines, run torchrun yourself; see the README)",
    )
    p.set_defaults(func=run)


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command `lmlab pretrain --nproc N ...` becomes: the same arguments without --nproc,
    with --parallel ddp unless a parallel mode was given."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    if not any(a == "--parallel" or a.startswith("--parallel=") for a in rest):
        rest += ["--parallel", "ddp"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "lmlab",
        *rest,
    ]


def _model_overrides(pairs: list[str] | None) -> dict[str, Any]:
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LmlabError(f"--model-set expects KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    """Defaults, then the YAML file, then the flags given on the command line."""
    settings = load_yaml(args.config) if args.config else {}
    settings.update(collect(args, PretrainConfig))
    settings["train"] = {**(settings.get("train") or {}), **collect(args, TrainConfig, "train.")}
    model = {**(settings.get("model") or {}), **_model_overrides(args.model_set)}
    moe = {k: v for k, v in collect(args, ModelConfig, "model.").items() if k in _MOE}
    if moe:
        model.update(moe)
        model.setdefault("ffn", "moe")
    settings["model"] = model
    if settings.get("resume"):  # the run's own settings from its folder; the ones given may change little
        return resumed_pretrain_config(settings.pop("out", None) or PretrainConfig.out, settings)
    return PretrainConfig.from_dict(settings, args.config or "command line")


def relaunch(args: argparse.Namespace, command_name: str) -> bool:
    """`--nproc N` (N > 1): run this very command again under torchrun on N processes of this machine and
    wait for it; True when it did (the caller has nothing left to do)."""
    if args.nproc is None:
        return False
    if args.nproc < 1:
        raise LmlabError(f"--nproc must be at least 1, got {args.nproc}")
    from lmlab.train.distributed import env_world

    if env_world().size > 1:
        raise LmlabError("--nproc starts torchrun itself: give it to lmlab, not to a process torchrun started")
    if args.nproc == 1:
        return False
    command = torchrun_command(args.argv, args.nproc)
    console.print(f"[bold]lmlab {command_name}[/] on {args.nproc} processes: {shlex.join(command)}", highlight=False)
    code = subprocess.call(command)
    if code:
        raise LmlabError(f"torchrun exited with status {code}; the processes' errors are above")
    return True


def launched(args: argparse.Namespace, command_name: str, quietly: Any) -> bool:
    """True when this process has nothing more to do: the command ran under torchrun (`--nproc`), or this
    is a rank other than 0 of a torchrun job, which runs `quietly()` and prints nothing."""
    from lmlab.train.distributed import env_world

    if relaunch(args, command_name):
        return True
    if not env_world().main:
        quietly()
        return True
    return False


def run(args: argparse.Namespace) -> None:
    from lmlab.pretrain import pretrain, resolved_names
    from lmlab.train.trainer import precision_choice, resolve_device

    pc = pretrain_config(args)  # checks the settings before any process is started
    if launched(args, "pretrain", lambda: pretrain(pc)):
        return
    family, preset, objective = resolved_names(pc)
    console.print(f"[bold]lmlab pretrain[/]: family={family} preset={preset} objective={objective} out={pc.out}")
    choice = precision_choice(pc.train.precision, resolve_device(pc.train.device))
    console.print(
        f"precision: {choice['precision']} ({choice['why']}; CPU flags: {', '.join(choice['cpu_flags']) or 'none read'})",
        highlight=False,
    )
    with TrainingProgress() as progress:
        summary = pretrain(pc, progress.run("pretrain"))
    console.print(
        f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['minutes']:.1f} min; "
        f"{summary['family']} model ({summary['parameters']:,} parameters, objective {summary['objective']}) "
        f"saved to [bold]{summary['out']}[/]; loss curves: {summary['plot']}"
    )
    if summary.get("routing_plot"):
        console.print(f"expert load heat-map: {summary['routing_plot']}")
    if summary["val"]:
        v = summary["val"]
        console.print(f"validation: loss {v['loss']:.4f}, perplexity {v['ppl']:.2f}")
