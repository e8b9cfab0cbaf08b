"""Reading sharded checkpoints (torch.distributed.checkpoint, DCP) without a process group.

    run/checkpoints/step-00000100/dcp/.metadata      what is where: every tensor's global shape and shards
    run/checkpoints/step-00000100/dcp/__0_0.distcp   rank 0's shard (one file per rank)

DCP stores each tensor by its global name and shape, so one process reads the whole model from any
number of shards (`read_model_weights`: `lmlab.load` and `lmlab convert` use it). Writing, and
restoring into ranks, is the trainer's (lmlab.train.sharded). Objects that are not tensors are read
with `torch.load(weights_only=True)`; DCP's default planner would unpickle them.
"""

from __future__ import annotations

import io as _io
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from lmlab.errors import CheckpointError

DCP_DIR = "dcp"
# one process without a process group is a case lmlab means (resuming on one process, convert)
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")


def is_sharded_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / DCP_DIR / ".metadata").is_file()


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, except that non-tensor entries are read with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: _io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def why(e: BaseException) -> str:
    """What went wrong, also inside DCP's CheckpointException (which wraps every rank's error)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = failures[min(failures)]
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            inner = inner[0]  # (exception, its traceback frames)
        return f"rank {min(failures)}: {type(inner).__name__}: {inner}"
    return f"{type(e).__name__}: {e}"


def read_model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's whole model weights, in one process and without a process group."""
    reader = FileSystemReader(str(folder / DCP_DIR))
    try:
        metadata = reader.read_metadata()
        prefix = "model."
        state = {
            key[len(prefix) :]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
            for key, m in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(m, TensorStorageMetadata)
        }
        if not state:
            raise CheckpointError("it holds no model tensors")
        dcp.load({"model": state}, storage_reader=reader, planner=WeightsOnlyLoadPlanner(), no_dist=True)
    except CheckpointError as e:
        raise CheckpointError(f"{folder / DCP_DIR}: {e}") from None
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{folder / DCP_DIR}: not a readable sharded checkpoint ({why(e)})") from None
    return state
