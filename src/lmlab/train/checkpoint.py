"""What a training checkpoint holds, and putting it back: weights, optimizer, trainer state.

    run/checkpoints/step-00000100/model.safetensors   weights (lmlab format, with config.json)
    run/checkpoints/step-00000100/optimizer.pt        optimizer state keyed by parameter name
    run/checkpoints/step-00000100/state.pt            scheduler, RNG states, data position, counters

That is the full format. The sharded one (lmlab.train.sharded) has dcp/ in place of the weights and
optimizer files; `load_checkpoint` reads either, into a model sharded or not. The folder layout (atomic
publishing, `latest`, manifests, falling back to the newest good checkpoint) is lmlab.checkpoint's.
Everything is read back with safetensors or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from lmlab.checkpoint import (  # noqa: F401  (re-exported: the trainer's names for the layout)
    good_checkpoint,
    latest_checkpoint,
    lmlab_config,
    publish,
    read_config,
    read_lmlab_weights,
    remove_partial,
    save_folder,
    step_name,
    verify_checkpoint,
    write_config,
    write_manifest,
    writing,
)
from lmlab.errors import CheckpointError
from lmlab.io import load_weights_into
from lmlab.train import sharded


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep: int = 2,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically. The optimizer state is stored keyed by parameter name (torch's
    distributed state-dict format), which any world size and any parallel mode can load;
    `model_state` / `optimizer_state` give whole states gathered beforehand (from an FSDP2 model)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = step_name(step)
    tmp = root / f".tmp-{name}"
    if optimizer_state is None:
        optimizer_state = optimizer_state_by_name(model, optimizer)

    def write() -> Path:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_folder(model, tmp, state=model_state)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(state, tmp / "state.pt")
        return publish(root, tmp, name, keep)

    final = writing(root, tmp, step, write)
    remove_partial(run_dir)
    return final


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
    main: bool = True,
    background: bool = False,
    group: Any = None,
) -> sharded.PendingSave:
    """Every rank writes its shard (lmlab.train.sharded; a collective); rank 0 (`main`) then adds the
    model's config.json and `state` and publishes the folder as `save_checkpoint` does. With
    `background` the write goes on in a thread: call the result's `finish()` before the next save."""
    root = Path(run_dir) / "checkpoints"
    name = step_name(step)
    tmp = root / f".tmp-{name}"
    from lmlab.train.parallel import Parallel

    future = Parallel(model).dcp_write(tmp / sharded.DCP_DIR, optimizer, background, group)
    config = lmlab_config(model.config)

    def when_written() -> Path | None:
        if not main:
            return None

        def write() -> Path:
            write_config(tmp, config)
            torch.save(state, tmp / "state.pt")
            return publish(root, tmp, name, keep)

        return writing(root, tmp, step, write)

    return sharded.PendingSave(step, future, when_written)


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place (an FSDP2 model keeps its shards); return the rest of the state."""
    from lmlab.train.parallel import Parallel

    if sharded.is_sharded_checkpoint(path):
        return _load_sharded(path, model, optimizer)
    placed = Parallel(model)
    try:
        osd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        by_index = all(isinstance(k, int) for k in osd.get("state", {}))  # before 2026-12: optimizer.state_dict()
        if by_index and placed.together:
            raise CheckpointError(
                "its optimizer state predates name-keyed checkpoints; resume it on one process or under ddp"
            )
        if by_index and osd.get("state"):  # an optimizer.state_dict() of one whole model
            load_weights_into(model, path)
            optimizer.load_state_dict(osd)
        else:
            placed.load_full_state(read_lmlab_weights(path, model.config), osd, optimizer)
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot restore the optimizer or trainer state ({e})") from None


def _load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    try:
        if read_config(path).get("model") != model.config.to_dict():
            raise CheckpointError("it describes a different model than the one being restored")
        from lmlab.train.parallel import Parallel

        Parallel(model).dcp_restore(path, optimizer)
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (Exception, sharded.CheckpointException) as e:
        raise CheckpointError(f"{path}: cannot restore the sharded checkpoint ({sharded.why(e)})") from None
