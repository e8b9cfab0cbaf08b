"""`lmlab info`, `lmlab presets`: sizes and FLOPs of a preset or a model folder."""

from __future__ import annotations

import argparse

from rich.table import Table

from lmlab.cli.output import console, human


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts and FLOPs/token of a preset or model folder")
    p.add_argument("model", help="preset name (see `lmlab presets`) or model folder")
    p.add_argument("--context", type=int, default=None, help="context length for the FLOPs (default: max length)")
    p.set_defaults(func=run_info)
    p = sub.add_parser("presets", help="list the named presets")
    p.set_defaults(func=run_presets)


def _layers(cfg) -> str:
    return f"{cfg.n_layers}" + (f" + {cfg.decoder_layers}" if cfg.spec.seq2seq else "")


def run_info(args: argparse.Namespace) -> None:
    from lmlab.info import model_stats
    from lmlab.io import load_config

    cfg = load_config(args.model)
    s = model_stats(cfg, args.context)
    table = Table(title=f"{args.model}  ({cfg.family}, heads: {', '.join(cfg.heads) or 'none'})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("", justify="right")
    table.add_row("parameters (total)", f"{s.total_params:,}", human(s.total_params))
    table.add_row("embedding parameters", f"{s.embedding_params:,}", human(s.embedding_params))
    table.add_row("non-embedding parameters", f"{s.non_embedding_params:,}", human(s.non_embedding_params))
    if s.active_params != s.total_params:
        table.add_row("active parameters / token", f"{s.active_params:,}", human(s.active_params))
    table.add_row(f"forward FLOPs / token (context {s.context})", f"{s.flops_per_token:,}", human(s.flops_per_token))
    table.add_row("training FLOPs / token (3x forward)", f"{s.train_flops_per_token:,}", human(s.train_flops_per_token))
    table.add_row("layers x d_model x heads", f"{_layers(cfg)} x {cfg.d_model} x {cfg.n_heads}", "")
    table.add_row("d_ff / activation / norm", f"{cfg.d_ff} / {cfg.activation} / {cfg.norm} ({cfg.norm_placement})", "")
    table.add_row("positions / max length", f"{cfg.position} / {cfg.max_seq_len}", "")
    if cfg.ffn == "moe":
        extra = [
            f"{n} {kind}"
            for n, kind in (
                (cfg.moe_zero_experts, "zero"),
                (cfg.moe_copy_experts, "copy"),
                (cfg.moe_constant_experts, "constant"),
                (cfg.moe_shared_experts, "shared"),
            )
            if n
        ]
        k = (
            "all"
            if cfg.moe_router == "dense"
            else (f"{cfg.moe_slots} slots each" if cfg.moe_router == "soft" else f"top-{cfg.moe_top_k}")
        )
        cap = "dropless" if cfg.moe_capacity_factor is None else f"capacity {cfg.moe_capacity_factor}"
        table.add_row(
            "experts / router",
            f"{cfg.moe_experts} x d_ff {cfg.expert_d_ff}"
            + (f" + {', '.join(extra)}" if extra else "")
            + f" / {cfg.moe_router} {k}, {cap}",
            "",
        )
        table.add_row("MoE layers", f"every {cfg.moe_every}", "")
    console.print(table)


def run_presets(args: argparse.Namespace) -> None:
    from lmlab.config import PRESETS, preset
    from lmlab.info import model_stats

    table = Table(title="presets")
    for col in ("name", "family", "layers", "width", "positions", "params"):
        table.add_column(col, justify="right" if col in ("layers", "width", "params") else "left", no_wrap=True)
    for name in PRESETS:
        cfg = preset(name)
        table.add_row(
            name,
            cfg.family,
            _layers(cfg).replace(" ", ""),
            str(cfg.d_model),
            cfg.position,
            human(model_stats(cfg).total_params),
        )
    console.print(table)
