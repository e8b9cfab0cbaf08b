"""The parallel modes behind one seam (lmlab.train.parallel): no code above it tests the mode itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmlab.errors import ConfigError
from lmlab.train.parallel import ParallelDims

SRC = Path(__file__).resolve().parents[1] / "src" / "lmlab"
# a parallel-mode branch: the mode compared, or the placement (FSDP2 shards, experts spread) detected
BRANCH = re.compile(
    r'parallel\s*[!=]=\s*"|is_sharded\(|expert_parameters\(|(?<!train)\.sharded\b|expert_parallel\s*>\s*1'
)
ALLOWED = {
    "train/parallel.py": "the seam itself",
    "train/distributed.py": "process groups, DDP and FSDP2 construction: what parallelize composes",
    "train/expert_parallel.py": "the expert-parallel layers: what parallelize composes",
    "train/dtensor.py": "the FSDP2 detection the seam uses",
    "train/sharded.py": "the DCP format, told by the seam whether the experts are spread",
    "settings.py": "validation of the settings before anything is built",
}


def test_no_parallel_mode_branch_outside_the_seam():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in ALLOWED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if BRANCH.search(code) and not code.lstrip().startswith(('"', "'")):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert found == [], "parallel-mode branches outside lmlab.train.parallel:\n" + "\n".join(found)


def test_parallel_dims_say_how_the_processes_hold_the_model():
    assert ParallelDims.of("fsdp", 4, ep=2) == ParallelDims(dp_replicate=1, dp_shard=4, ep=2)
    assert ParallelDims.of("ddp", 2).ddp and not ParallelDims.of("ddp", 2).fsdp
    assert ParallelDims.of("none", 1).world_size == 1
    with pytest.raises(ConfigError, match="parallel 'tp' is unknown"):
        ParallelDims.of("tp", 2)
