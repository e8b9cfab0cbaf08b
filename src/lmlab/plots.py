"""Pictures of a run: loss curves (and, for MoE models, expert load) from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curves(metrics: str | Path, out: str | Path) -> Path | None:
    """Train and validation loss against step, learning rate below; None when there is nothing to plot."""
    records = read_metrics(metrics)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if val:
        top.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation loss", lw=1.5)
    top.set_ylabel("loss (nats / token)")
    top.grid(alpha=0.3)
    top.legend()
    bottom.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
