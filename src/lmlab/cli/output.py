"""What the command line prints with: one console (text is never wrapped mid-sentence; tables fit the
terminal), number formatting, and the one progress renderer every training command uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(soft_wrap=True)  # soft wrap: a message is one line whatever the width (tests, logs, pipes)


def error_console() -> Console:
    return Console(stderr=True, soft_wrap=True)


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


class TrainingProgress:
    """Progress bars driven by the trainer's events (start, step, eval): `with TrainingProgress() as p:
    run(..., on_event=p.run("pretrain"))`. Each run gets a bar showing steps, loss, learning rate and,
    when reported, tokens per second; validations are printed above the bars."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )

    def __enter__(self) -> TrainingProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def run(self, name: str, preparing: str | None = None) -> Callable[[str, dict[str, Any]], None]:
        """An on_event callback for one run; `preparing` shows a bar before training starts."""
        state: dict[str, Any] = {"task": None, "tps": None}
        if preparing:
            state["task"] = self.progress.add_task(f"{name}: {preparing}", total=None, status="")

        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind == "start":
                if state["task"] is None:
                    state["task"] = self.progress.add_task(name, total=info["total_steps"], status="")
                self.progress.update(state["task"], description=name, total=info["total_steps"], completed=info["step"])
            elif kind == "step":
                state["tps"] = info.get("tokens_per_s", state["tps"])
                status = f"loss {info['loss']:.4f}  lr {info['lr']:.2e}"
                if state["tps"]:
                    status += f"  {state['tps']:,.0f} tok/s"
                self.progress.update(state["task"], completed=info["step"], status=status)
            elif kind == "note":
                self.progress.console.print(f"{name}: {info['text']}")
            elif kind == "eval" and "ppl" in info:
                extra = f", accuracy {info['accuracy']:.3f}" if "accuracy" in info else ""
                self.progress.console.print(
                    f"{name} step {info['step']}: validation loss {info['loss']:.4f}, "
                    f"perplexity {info['ppl']:.2f}{extra}"
                )

        return on_event
