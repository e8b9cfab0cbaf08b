"""One rank of a test's multi-process pre-training run, started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py CONFIG.json [STOP]

CONFIG.json is a PretrainConfig as a dict. With STOP, rank 0 stops after that step (the run is
"killed" past a checkpoint) and waits WAIT_S seconds; the other ranks fail in their next collective
(at once, or at its timeout) with lmlab's DistributedError, whose message is printed on their stderr.
"""

from __future__ import annotations

import json
import sys
import time

from lmlab.errors import LmlabError
from lmlab.pretrain import PretrainConfig, pretrain

WAIT_S = 15.0  # longer than the collective timeout the tests give a stopped run


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
        # pretrain has left the process group; stay alive past the others' collective timeout, or
        # torchrun would stop them (SIGTERM) before they notice and say why
        print("stopped", file=sys.stderr)
        time.sleep(WAIT_S)
        return 3
    except LmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
