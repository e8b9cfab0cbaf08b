"""`lmlab compare`: the families side by side on one text under one budget, with a live table of the
contenders and their stages, then the claims table and where the report is."""

from __future__ import annotations

import argparse
from typing import Any

from rich.live import Live
from rich.table import Table

from lmlab.cli.flags import add_fields, collect
from lmlab.cli.output import console
from lmlab.compare.settings import BUDGETS, CompareConfig
from lmlab.errors import ConfigError
from lmlab.settings import load_yaml


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="pre-train every family (dense and MoE) on the same text under one budget, measure, and report",
    )
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    p.add_argument(
        "--budget",
        nargs="+",
        metavar="KIND [N]",
        help=f"what every contender gets the same amount of: {'|'.join(BUDGETS)}, optionally with the amount "
        "(e.g. --budget flops 4e13; default: equal training FLOPs at the demo's amount)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the units side by side as Ray tasks (pip install 'lmlab[ray]'): on the cluster at ADDRESS "
        "(HOST:PORT of `ray start --head`, auto, or ray://HOST:PORT); without one, on the Ray running on this machine "
        "or one started for the run (docs/compare-on-ray.md)",
    )
    add_fields(p, CompareConfig, skip=("budget", "budget_value"))
    p.set_defaults(func=run)


def compare_config(args: argparse.Namespace) -> CompareConfig:
    settings = load_yaml(args.config) if args.config else {}
    settings.update(collect(args, CompareConfig))
    if args.ray is not None:
        settings["ray"] = args.ray
    if args.budget:
        if len(args.budget) > 2 or args.budget[0] not in BUDGETS:
            raise ConfigError(
                f"--budget expects KIND [N] with KIND one of {', '.join(BUDGETS)}, got {' '.join(args.budget)}"
            )
        settings["budget"] = args.budget[0]
        if len(args.budget) == 2:
            try:
                settings["budget_value"] = float(args.budget[1])
            except ValueError:
                raise ConfigError(f"--budget {args.budget[0]} {args.budget[1]}: the amount is not a number") from None
    return CompareConfig.from_dict(settings, args.config or "command line")


class LiveTable:
    """One row per contender: its seeds done, the running unit's stage and step, and its last results."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.seeds = 0
        self.stage = ""
        self.live = Live(self.render(), console=console, refresh_per_second=2, transient=False)

    def render(self) -> Table:
        t = Table(title=f"lmlab compare {self.stage}".strip(), title_justify="left")
        placed = any(r.get("where") for r in self.rows.values())  # under --ray: the node of each seed
        columns = (
            ("contender", "steps", "seeds done", "now") + (("where",) if placed else ()) + ("bits/byte", "few-shot k=3")
        )
        for col in columns:
            t.add_column(col, no_wrap=col == "contender")
        for name, r in self.rows.items():
            now = "; ".join(r.get("now", {}).values())
            where = "; ".join(f"seed {seed}: {w}" for seed, w in r.get("where", {}).items())
            cells = [name, str(r.get("steps", "")), f"{r.get('done', 0)}/{self.seeds}", now]
            t.add_row(*cells, *([where] if placed else []), r.get("bpb", ""), r.get("fs", ""))
        return t

    def on_event(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "stage":
            self.stage = f"· {info['text']}"
        elif kind == "plan":
            self.seeds = info["seeds"]
            self.stage = ""
            for r in info["rows"]:
                self.rows[r["contender"]] = {"steps": r["steps"] if r["steps"] is not None else "timed"}
        elif kind == "unit":
            row = self.rows.setdefault(info["contender"], {})
            now, seed = row.setdefault("now", {}), info["seed"]
            if info.get("where"):
                w = info["where"]
                row.setdefault("where", {})[seed] = w
            if info["status"] == "running":
                st = info.get("stage") or {}
                step = f" {st.get('step')}/{st.get('steps')}" if "step" in st else ""
                now[seed] = f"seed {seed}: {st.get('stage', 'starting')}{step} ({info['elapsed']:.0f}s)"
            else:
                row["done"] = row.get("done", 0) + 1
                now.pop(seed, None)
                r = info.get("result")  # a lmlab.compare.results.UnitResult
                if r is not None:
                    i = r.intrinsic
                    bpb = i.bpb if i.bpb is not None else i.pll_bpb
                    if bpb is not None:
                        row["bpb"] = f"{bpb:.3f}" + ("" if i.bpb is not None else " (PLL)")
                    if "k3" in r.fewshot:
                        row["fs"] = f"{r.fewshot['k3'].accuracy:.3f}"
        self.live.update(self.render())


def print_plan(plan: dict[str, Any], cc: CompareConfig) -> None:
    t = Table(
        title=f"plan: {cc.budget} budget {plan['budget']:.3g} per unit, {plan['seeds']} seed(s), "
        f"{plan['train_tokens']:,} training tokens",
        title_justify="left",
    )
    for col in ("contender", "parameters", "steps", "tokens", "training FLOPs", "passes over the text"):
        t.add_column(col, no_wrap=col == "contender")
    for r in plan["plan"]:
        timed = r["steps"] is None
        t.add_row(
            r["contender"],
            f"{r['params'] / 1e6:.2f}M",
            "timed" if timed else f"{r['steps']:,}",
            "" if timed else f"{r['tokens']:.3g}",
            "" if timed else f"{r['train_flops']:.3g}",
            "" if timed else f"{r['passes']:.1f}",
        )
    console.print(t)
    console.print(f"plan: [bold]{cc.out}/plan.json[/]")


def run(args: argparse.Namespace) -> None:
    from lmlab.compare import compare
    from lmlab.compare.report import claims_rows

    cc = compare_config(args)
    table = LiveTable()
    with table.live:
        summary = compare(cc, table.on_event)
    if cc.plan_only:
        print_plan(summary, cc)
        return
    claims = Table(
        title="claims (from the measurements: confirmed / contradicted when both sides beat their baselines and "
        "the 95% interval of the difference excludes 0)",
        title_justify="left",
    )
    for col in ("claim", "measured", "verdict"):
        claims.add_column(col)
    for claim, metric, measured, verdict in claims_rows(summary):
        claims.add_row(claim, f"{metric}: {measured}", verdict)
    console.print(claims)
    console.print(f"report: [bold]{cc.out}/report.html[/] (and report.md, results.json)")
