"""AdamW with decay / no-decay groups, and warm-up + cosine / linear / constant / warmup-stable-decay schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; never biases, norm gains or embedding tables (nanoGPT and BERT do the same)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8
) -> torch.optim.AdamW:
    # the fused kernel (one pass over each tensor) exists for CUDA and, since torch 2.4, for the CPU
    devices = {p.device.type for p in model.parameters()}
    fused = devices <= {"cuda", "cpu"} and len(devices) == 1
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_factor(
    step: int, warmup: int, total: int | None, schedule: str, min_ratio: float, decay_fraction: float = 0.2
) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based). warmup-stable-decay holds
    the peak after warm-up and decays linearly to `min_ratio` over the last `decay_fraction` of the steps
    (the schedule MiniCPM and Hägele et al., 2024 train with: any prefix of the run is a usable model
    before its cool-down)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or not total:
        return 1.0
    if schedule == "warmup-stable-decay":
        decay = max(1, round(decay_fraction * total))
        start = max(warmup, total - decay)
        if step < start:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * min(1.0, (step - start + 1) / max(1, total - start))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup: int,
    total: int | None,
    schedule: str,
    min_ratio: float,
    decay_fraction: float = 0.2,
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, schedule, min_ratio, decay_fraction)
    )
