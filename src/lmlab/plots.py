"""Pictures of a run: loss curves (and, for MoE models, expert load) from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return Path(out)


def _short(layer: str) -> str:
    """decoder.layers.3.ffn -> decoder 3"""
    return layer.replace(".layers.", " ").replace(".ffn", "")


def loss_curves(metrics: str | Path, out: str | Path) -> Path | None:
    """Train and validation loss against step, learning rate below; None when there is nothing to plot."""
    records = read_metrics(metrics)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    if not train:
        return None
    plt = _pyplot()

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
    return _save(fig, out)


def expert_load(metrics: str | Path, out: str | Path) -> Path | None:
    """MoE routing at a glance: a layer x expert heat-map of the share of assignments each expert took
    over the last quarter of training (uniform = 1/E everywhere), and each layer's load CV against step.
    None when the run logged no routing statistics."""
    train = [r for r in read_metrics(metrics) if r["split"] == "train" and r.get("moe")]
    if not train:
        return None
    plt = _pyplot()
    import numpy as np

    tail = train[-max(1, len(train) // 4) :]
    names = [layer["layer"] for layer in tail[-1]["moe"]]
    load = np.array([[layer["load"] for layer in r["moe"]] for r in tail]).mean(0)  # (layers, experts)
    n_layers, n_experts = load.shape
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.5 * n_layers + 3), gridspec_kw={"width_ratios": [3, 2]})
    image = left.imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=max(load.max(), 2.0 / n_experts))
    left.set_yticks(range(n_layers), [_short(n) for n in names], fontsize=8)
    left.set_xticks(range(n_experts), range(n_experts), fontsize=7 if n_experts > 16 else 9)
    left.set_xlabel("expert")
    left.set_title(
        f"share of routed assignments, steps {tail[0]['step']}-{tail[-1]['step']} (uniform = {1 / n_experts:.3f})",
        fontsize=9,
    )
    fig.colorbar(image, ax=left, fraction=0.04)
    steps = [r["step"] for r in train]
    for i, name in enumerate(names):
        right.plot(steps, [r["moe"][i]["cv"] for r in train], label=_short(name))
    right.set_xlabel("optimizer step")
    right.set_ylabel("coefficient of variation of expert load")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    return _save(fig, out)
