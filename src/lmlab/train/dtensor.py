"""Whether a model's parameters are FSDP2 shards: asked by the expert-parallel, sharded-checkpoint and
distributed modules alike, so it sits below all three."""

from __future__ import annotations

from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is under FSDP2 (its parameters are DTensor shards)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())
