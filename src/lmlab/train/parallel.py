"""How a model is spread over the processes of a run, behind one seam.

`ParallelDims` says how the processes are used (torchtitan's shape): data-parallel replicas (DDP),
data-parallel shards (FSDP2) and the expert-parallel degree. `parallelize(model or config, dims, ...)`
builds or places the model accordingly and returns a `Parallel` handle, which alone knows what the
placement implies:

    step_module()        what the training step calls (the model, or DDP around it)
    together             whether every rank must take part in each forward (evaluations too)
    full_state()         the whole model's and optimizer's state, gathered (a collective)
    load_full_state()    a whole state put back, each rank keeping its part
    load_weights()       whole weights only (the best evaluation's, restored)
    clip_grad_norm()     the global gradient norm, clipped
    dcp_view()           model and optimizer state as torch.distributed.checkpoint stores it
    dcp_write/restore()  a sharded checkpoint written and read back, each rank its part

The trainer, the checkpoint code, `lmlab pretrain`, `lmlab finetune` and the comparison unit call these
and never test the mode themselves (tests/test_parallel_seam.py greps for that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmlab.errors import CheckpointError, ConfigError
from lmlab.train import distributed, expert_parallel
from lmlab.train.dtensor import is_sharded

MODES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class ParallelDims:
    """How the `world` processes of a run hold the model: `dp_replicate` whole copies (DDP) of
    `dp_shard` shards each (FSDP2), with each MoE layer's experts split over groups of `ep` ranks."""

    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1

    @classmethod
    def of(cls, mode: str, world_size: int, ep: int = 1) -> ParallelDims:
        if mode not in MODES:
            raise ConfigError(f"parallel {mode!r} is unknown; expected one of {', '.join(MODES)}")
        if mode == "fsdp":
            return cls(dp_shard=world_size, ep=ep)
        return cls(dp_replicate=world_size, ep=ep)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        return self.dp_shard > 1

    @property
    def ddp(self) -> bool:
        return self.dp_replicate > 1


class Parallel:
    """A model placed on the run's processes (see the module docstring)."""

    def __init__(self, model: nn.Module, dims: ParallelDims | None = None) -> None:
        self.model = model
        self.sharded = is_sharded(model)  # FSDP2's DTensor parameters, as built
        self.experts = bool(expert_parallel.expert_parameters(model))  # this rank holds some experts only
        self.dims = dims or ParallelDims(dp_shard=2 if self.sharded else 1)

    @property
    def casts(self) -> bool:
        """The placement casts for mixed precision itself (FSDP2's policy): no autocast around the step."""
        return self.sharded

    @property
    def together(self) -> bool:
        """Every rank takes part in each forward: sharded weights, or experts spread over the ranks."""
        return self.sharded or self.experts

    def step_module(self, world: distributed.World) -> nn.Module:
        """What the training step calls: the model itself (one process, or an FSDP2 model), or DDP."""
        if self.sharded or not self.dims.ddp or world.size == 1:
            return self.model
        return distributed.ddp(self.model, world)

    # ---- whole state -------------------------------------------------------------------------------
    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(model, optimizer) state gathered whole, a collective every rank calls; (None, None) when every
        rank already holds everything."""
        if self.sharded and self.experts:  # FSDP2's copies gathered, then every group's experts
            model_state, optimizer_state = distributed.full_state(self.model, optimizer, on_every_rank=True)
            return expert_parallel.gather_full_state(self.model, model_state, optimizer_state)
        if self.sharded:
            return distributed.full_state(self.model, optimizer)
        if self.experts:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            local = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            return expert_parallel.gather_full_state(self.model, local, get_optimizer_state_dict(self.model, optimizer))
        return None, None

    def load_full_state(
        self, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any], optimizer: torch.optim.Optimizer
    ) -> None:
        """Whole weights and a name-keyed optimizer state (a full checkpoint's) put back; every rank keeps
        its part."""
        if self.experts:  # this rank's experts of the whole state
            weights, optimizer_state = expert_parallel.shard_full_state(self.model, weights, optimizer_state)
            if self.sharded:  # every rank holds its experts' whole rows; FSDP2 keeps its part of them
                distributed.load_full_state(self.model, optimizer, weights, optimizer_state)
            else:
                self.model.load_state_dict(weights)
                distributed.load_full_state(self.model, optimizer, None, optimizer_state)
        elif self.sharded:
            distributed.load_full_state(self.model, optimizer, weights, optimizer_state)
        else:
            self._fits(weights)
            self.model.load_state_dict(weights)
            distributed.load_full_state(self.model, optimizer, None, optimizer_state)

    def _fits(self, weights: dict[str, torch.Tensor]) -> None:
        expected = self.model.state_dict()
        for k, v in weights.items():
            if k not in expected or expected[k].shape != v.shape:
                raise CheckpointError(f"tensor {k!r} does not fit the model")

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Whole weights (every rank holds them) put back, each rank keeping its part."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True))
        elif self.experts:
            self.model.load_state_dict(expert_parallel.shard_full_state(self.model, weights, {})[0])
        else:
            self.model.load_state_dict(weights)

    # ---- the step -------------------------------------------------------------------------------------
    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradients to a global norm of `max_norm`; the norm before clipping."""
        if self.experts:
            expert_parallel.sync_replicas(self.model)
            norm = expert_parallel.clip_grad_norm(self.model, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return float((norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item())

    def dcp_view(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Model and optimizer state as torch.distributed.checkpoint stores it (global names and shapes)."""
        from lmlab.train import sharded

        return sharded.dcp_view(self.model, optimizer, self.experts)

    def dcp_write(self, folder: Any, optimizer: torch.optim.Optimizer, background: bool, group: Any = None) -> Any:
        """Every rank writes its part of a sharded checkpoint (lmlab.train.sharded.write)."""
        from lmlab.train import sharded

        return sharded.write(folder, self.model, optimizer, background, group, self.experts)

    def dcp_restore(self, folder: Any, optimizer: torch.optim.Optimizer) -> None:
        """Every rank reads the slices of a sharded checkpoint it holds (lmlab.train.sharded.restore)."""
        from lmlab.train import sharded

        sharded.restore(folder, self.model, optimizer, self.experts, self.sharded)


def parallelize(
    model: nn.Module | Any,
    dims: ParallelDims,
    world: distributed.World,
    device: torch.device,
    seed: int = 0,
    param_dtype: torch.dtype | None = None,
) -> Parallel:
    """Place a model on the run's processes as `dims` says. `model` is a built model (fine-tuning: every
    rank loaded the same weights) or a ModelConfig (pre-training: built on the meta device under FSDP2,
    every rank starting from the weights one process draws with `seed`)."""
    from lmlab.model import Model

    built = isinstance(model, nn.Module)
    if not built:
        distributed.check_expert_parallel(dims.ep, world, model)
    if dims.fsdp:
        if built:
            if dims.ep > 1:
                raise ConfigError(
                    "expert parallelism of an already built model is not supported; build from the config"
                )
            model = distributed.shard_model(model, device, param_dtype)
        else:
            model = distributed.build_sharded(model, seed, world, device, param_dtype, dims.ep)
        return Parallel(model, dims)
    if not built:
        torch.manual_seed(seed)
        model = Model(model)
    if dims.ep > 1:  # every rank keeps its experts; DDP averages the rest
        mesh = expert_parallel.expert_mesh(world.size, dims.ep, device.type)
        expert_parallel.parallelize_experts(model, grad_scale=1.0 / world.size, mesh=mesh)
    return Parallel(model, dims)
