"""One life of a crash-campaign run: `python child.py CONFIG.json MARKERS` runs lmlab's pre-training
(resuming from the run's checkpoints) and appends a marker line to MARKERS as it enters and leaves
each phase (start, every step, evaluations, checkpoint writes, the final save), so that the harness
can aim its SIGKILL and tell afterwards where it landed. Under torchrun only rank 0 writes markers."""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    config, markers = sys.argv[1], sys.argv[2]
    main_rank = os.environ.get("RANK", "0") == "0"
    fd = os.open(markers, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if main_rank else None

    def mark(phase: str) -> None:
        if fd is not None:
            os.write(fd, f"{time.monotonic():.6f} {phase}\n".encode())

    import lmlab.pretrain as pretrain_module
    import lmlab.train.trainer as trainer_module
    from lmlab.pretrain import PretrainConfig, pretrain

    def around(name: str, f):
        def wrapped(*a, **k):
            mark(f"{name}-begin")
            out = f(*a, **k)
            mark(f"{name}-end")
            return out

        return wrapped

    trainer_module.Trainer._save = around("save", trainer_module.Trainer._save)
    trainer_module.evaluate = around("eval", trainer_module.evaluate)
    pretrain_module.save = around("final", pretrain_module.save)

    def on_event(kind: str, info: dict) -> None:
        if kind in ("start", "step"):
            mark(kind)
        elif kind == "note":
            print(info["text"], flush=True)

    pc = PretrainConfig.from_dict(json.loads(open(config).read()))
    pretrain(pc, on_event)
    mark("done")


if __name__ == "__main__":
    main()
