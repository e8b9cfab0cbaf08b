"""What every benchmark prints under its table: the software and the machine it ran on."""

from __future__ import annotations

import platform

import torch


def environment(device: str = "cpu", note: str = "") -> str:
    """'torch X, transformers Y, <GPU name or CPU and threads>[, note]'."""
    import transformers

    where = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    return f"torch {torch.__version__}, transformers {transformers.__version__}, {where}" + (
        f", {note}" if note else ""
    )
