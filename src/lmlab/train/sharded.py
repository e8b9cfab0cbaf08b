"""Sharded checkpoints through torch.distributed.checkpoint (DCP): every rank writes its own shard.

    run/checkpoints/step-00000100/dcp/.metadata      what is where: every tensor's global shape and shards
    run/checkpoints/step-00000100/dcp/__0_0.distcp   rank 0's shard (one file per rank)
    run/checkpoints/step-00000100/config.json        the model (lmlab format), as in a model folder
    run/checkpoints/step-00000100/state.pt           scheduler, RNG states, data position, counters

DCP stores each tensor by its global name and shape. An FSDP2 model's parameters and optimizer states
are DTensors already; an expert-parallel model's experts are presented as DTensors sharded on the
expert dimension (`_dcp_view`), so the files describe the whole model whatever wrote them. Loading
reads, for each rank, the slices it holds: a checkpoint written by N processes resumes on M, with or
without FSDP or expert parallelism, and in one plain process (`lmlab.checkpoint.dcp.read_model_weights`, which
`lmlab.load` and `lmlab convert` use).

Atomic as the full format: the ranks write into `.tmp-step-*`, and rank 0 renames it and points
`latest` at it only after DCP has gathered every rank's write result. With `background`, the state is
copied first (training goes on at once) and written by a thread over a process group of its own;
rank 0 publishes it when the write has finished (`PendingSave`).

Objects that are not tensors (the optimizer's hyper-parameters) are read with
`torch.load(weights_only=True)`; DCP's default planner would unpickle them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lmlab.checkpoint.dcp import (  # noqa: F401  (re-exported)
    DCP_DIR,
    WeightsOnlyLoadPlanner,
    is_sharded_checkpoint,
    read_model_weights,
    why,
)
from lmlab.errors import CheckpointError


def _alone() -> bool:
    """One process without a process group: DCP then neither plans nor reduces over ranks."""
    return not dist.is_initialized()


def _expert_names(model: nn.Module) -> list[str]:
    from lmlab.train.expert_parallel import expert_parameters

    return sorted(expert_parameters(model))


def _as_global(t: torch.Tensor, mesh: Any) -> torch.Tensor:
    """This rank's rows of an expert tensor, as a DTensor of all of them: sharded on the expert
    dimension of the mesh (Shard(0)), the same on its replicate dimension, if it has one. Under
    FSDP2 (an (expert, replicate) mesh) the copies hold parts of the block: sharded on both."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if hasattr(t, "to_local"):  # FSDP2's shard of this rank's experts
        return DTensor.from_local(t.to_local(), mesh, [Shard(0), Shard(0)], run_check=False)
    placements = [Replicate(), Shard(0)] if mesh.ndim == 2 else [Shard(0)]
    return DTensor.from_local(t, mesh, placements, run_check=False)


def _expert_mesh(model: nn.Module) -> Any:
    """The mesh the experts are sharded over: the expert-parallel layers' own (an (replicate, expert)
    mesh), or every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    from lmlab.train.expert_parallel import expert_layers

    layer = expert_layers(model)[0]
    mesh = layer.dcp_mesh if layer.dcp_mesh is not None else layer.mesh
    if mesh is None:
        mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    return mesh


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def _states(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter name: the model's and optimizer's own tensors."""
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def dcp_view(model: nn.Module, optimizer: torch.optim.Optimizer, spread: bool) -> dict[str, Any]:
    """Model and optimizer state as DCP stores it: keyed by parameter name, with global shapes. The
    tensors are the model's and the optimizer's own, so a load writes into them. With `spread` (the
    experts are split over the ranks: lmlab.train.parallel says so) each rank's rows of an expert tensor
    become a global DTensor."""
    view = _states(model, optimizer)
    experts = _expert_names(model) if spread else []
    if experts:
        mesh = _expert_mesh(model)
        states = view["optim"].get("state", {})
        for name in experts:
            view["model"][name] = _as_global(view["model"][name], mesh)
            if name in states:
                states[name] = {
                    k: _as_global(v, mesh) if torch.is_tensor(v) and v.dim() else v for k, v in states[name].items()
                }
    return view


def write(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    background: bool,
    group: Any = None,
    spread: bool = False,
) -> Any:
    """Every rank writes its shard of model and optimizer to `folder` (a collective). Returns None once
    written, or with `background` a future that completes when the write has."""
    view = dcp_view(model, optimizer, spread)
    writer = FileSystemWriter(str(folder))
    if background:
        response = dcp.async_save(view, storage_writer=writer, process_group=group, no_dist=_alone())
        return getattr(response, "upload_completion", response)
    try:
        dcp.save(view, storage_writer=writer, process_group=group, no_dist=_alone())
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{folder}: the checkpoint could not be written ({why(e)})") from e
    return None


def restore(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, spread: bool = False, fsdp: bool = False
) -> None:
    """Load a sharded checkpoint's model and optimizer into this rank's (sharded, expert-parallel or
    plain) model and optimizer: each rank reads the slices it holds, at any world size. `spread` and
    `fsdp`: how the model is placed (lmlab.train.parallel says)."""
    view = dcp_view(model, optimizer, spread)
    reader = FileSystemReader(str(folder / DCP_DIR))
    dcp.load(view, storage_reader=reader, planner=WeightsOnlyLoadPlanner(), no_dist=_alone())
    experts = set(_expert_names(model)) if spread else set()
    if experts and fsdp:  # loaded in place into FSDP2's own shards: hand those back
        fresh = _states(model, optimizer)
        states, fresh_states = view["optim"].get("state", {}), fresh["optim"].get("state", {})
        for name in experts:
            view["model"][name] = fresh["model"][name]
            if name in states:
                states[name] = fresh_states[name]
    elif experts:  # back to this rank's rows, as the module holds them
        view["model"] = {k: _local(v) if k in experts else v for k, v in view["model"].items()}
        states = view["optim"].get("state", {})
        for name in experts & set(states):
            states[name] = {k: _local(v) for k, v in states[name].items()}
    set_model_state_dict(model, view["model"])
    set_optimizer_state_dict(model, optimizer, view["optim"])


class PendingSave:
    """A sharded checkpoint being written: `publish` (rank 0) runs once every rank's write is done."""

    def __init__(self, step: int, future: Any, publish: Any) -> None:
        self.step, self.future, self.publish = step, future, publish

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def finish(self) -> Path | None:
        """Wait for the write (re-raising its error), then publish; the published path on rank 0."""
        if self.future is not None:
            try:
                self.future.result()
            except (Exception, CheckpointException) as e:
                raise CheckpointError(f"the checkpoint of step {self.step} could not be written ({why(e)})") from e
        return self.publish()
