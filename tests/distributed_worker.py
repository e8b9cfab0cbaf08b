"""One rank of a test's multi-process pre-training run, started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py CONFIG.json [STOP]

CONFIG.json is a PretrainConfig as a dict. With STOP, rank 0 stops after that step (the run is
"killed" past a checkpoint); the other ranks then wait in their next collective until its timeout
and fail with lmlab's DistributedError, whose message is printed on their stderr.
"""

from __future__ import annotations

import json
import sys

from lmlab.errors import LmlabError
from lmlab.pretrain import PretrainConfig, pretrain


class Stopped(Exception):
    pass


def main() -> int:
    pc = PretrainConfig.from_dict(json.loads(open(sys.argv[1]).read()), sys.argv[1])
    stop = int(sys.argv[2]) if len(sys.argv) > 2 else None

    def on_event(kind, info):  # the trainer calls it on rank 0 only
        if stop is not None and kind == "step" and info["step"] == stop:
            raise Stopped

    try:
        pretrain(pc, on_event)
    except Stopped:
        print("stopped", file=sys.stderr)
        return 3
    except LmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
