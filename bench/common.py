"""What every benchmark prints under its table: the software and the machine it ran on."""

from __future__ import annotations

import torch


def environment(device: str = "cpu", note: str = "") -> str:
    """'torch X, transformers Y, <GPU name or CPU and threads>[, note]'."""
    import transformers

    if device.startswith("cuda"):
        where = torch.cuda.get_device_name()
    else:
        from lmlab.compare.lab import machine
        from lmlab.runtime import cpu_flags

        flags = ", ".join(sorted(cpu_flags())) or "no AVX flags read"
        where = f"{machine()['cpu']} ({flags}), {torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, transformers {transformers.__version__}, {where}" + (
        f", {note}" if note else ""
    )
