"""Training: the loop, optimizer groups and schedules, atomic checkpoints with exact resume."""

from lmlab.train.trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
