"""Training on several processes with torch.distributed, applied from outside to an unchanged model.

    torchrun --nproc-per-node 2 -m lmlab pretrain ... --parallel ddp
    lmlab pretrain ... --nproc 2            # the same: launches torchrun on this machine

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
address. `setup` joins the process group (gloo on CPUs, NCCL on GPUs) with a timeout on every
collective; `ddp` puts the model under DistributedDataParallel.

The data does not depend on the world size. `batch_size` is the global micro-batch: every rank
draws the same global micro-batch from the same seeded stream and keeps its own rows (`shard`), so
N processes see, step by step, exactly the examples one process sees. Each rank's loss is weighted
by its share of the micro-batch's labelled tokens (`loss_weight`): DDP averages gradients over
ranks, and with the weights that average is the gradient of the one-process loss, also for masked
LMs whose ranks hold different numbers of masked tokens. Gradient accumulation skips the
all-reduce on all but the last micro-batch (`no_sync`). Only rank 0 logs, evaluates, writes
checkpoints and draws plots; the weights are the same on every rank, so a checkpoint is an
ordinary one and resumes at any world size.

With `--parallel fsdp` the model is FSDP2's instead (`build_sharded`): every Block and then the
whole model under `fully_shard`, built on the meta device and initialised after sharding, with a
bf16 mixed-precision policy when the run is bf16. Its checkpoints are sharded by default: every rank
writes its shard through torch.distributed.checkpoint (lmlab.train.sharded). With
`--checkpoint-format full` they gather the whole state to rank 0 (`full_state`) instead. Either
kind resumes on any number of processes, with or without FSDP.

What differs from one process: dropout draws its masks per rank (as in any data-parallel run). MoE
routers' training noise does not: every rank draws it for the global batch and keeps its rows
(`share_router_noise`). MoE auxiliary losses count every rank's tokens (`use_global_routing_stats`)
unless `--moe-stats local`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmlab.errors import ConfigError
from lmlab.families import IGNORE_INDEX
from lmlab.settings import PARALLEL
from lmlab.train.dtensor import is_sharded  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, evaluates and saves."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1 or dist.is_initialized()


def env_world() -> World:
    """The world torchrun describes in the environment (rank 0 of 1 without torchrun)."""
    try:
        return World(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )
    except ValueError as e:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from None


def setup(parallel: str, device: torch.device, timeout_s: float) -> World:
    """Join the process group when `parallel` asks for it; the World this process is in."""
    if parallel not in PARALLEL:
        raise ConfigError(f"parallel {parallel!r} is unknown; expected one of {', '.join(PARALLEL)}")
    world = env_world()
    if parallel == "none":
        if world.size > 1:
            raise ConfigError(
                f"this process is one of {world.size} (WORLD_SIZE={world.size}) but parallel is none: "
                "add --parallel ddp"
            )
        return world
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError(
            f"--parallel {parallel} runs under torchrun (torchrun --nproc-per-node N -m lmlab pretrain|finetune ...) "
            "or with lmlab pretrain|finetune --nproc N"
        )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return world


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: torch.device, world: World) -> torch.device:
    """A GPU per local rank; the CPU is shared."""
    if device.type == "cuda" and world.size > 1:
        return torch.device("cuda", world.local_rank)
    return device


def build_sharded(
    cfg: Any,
    seed: int,
    world: World,
    device: torch.device,
    param_dtype: torch.dtype | None = None,
    expert_parallel: int = 1,
) -> nn.Module:
    """An FSDP2 model: built on the meta device (nothing allocated), `fully_shard` applied to every
    Block and then to the whole model, materialised on `device`, and initialised after sharding.

    The initial weights are the ones one process draws with `seed`: rank 0 builds them once on the
    CPU and every rank keeps its shard of the broadcast, so the run starts from the same weights at
    every world size. (Drawing each shard with its own generator would tie the init to the world
    size.) With `param_dtype` (bf16), the mixed-precision policy computes in it and reduces
    gradients in float32.

    With `expert_parallel` E > 1 the experts are first sharded over groups of E ranks
    (lmlab.train.expert_parallel), and each expert layer is put under its own `fully_shard` over
    the ranks that hold the same experts; the rest is sharded over every rank. Every rank then
    draws the one-process init and keeps its experts' rows of it (a broadcast of rank 0's state
    would hand every rank rank 0's experts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lmlab.model import Model

    full: dict[str, torch.Tensor] = {}
    if world.main or expert_parallel > 1:
        torch.manual_seed(seed)
        full = Model(cfg).state_dict()
    with torch.device("meta"):
        model = Model(cfg)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = {"mp_policy": policy} if policy is not None else {}
    if expert_parallel > 1:
        from lmlab.train import expert_parallel as ep

        mesh = ep.expert_mesh(world.size, expert_parallel, device.type)
        ep.parallelize_experts(model, mesh=mesh, fsdp=True)
        full, _ = ep.shard_full_state(model, full, {})  # this rank's experts
        for layer in ep.expert_layers(model):
            fully_shard(layer, mesh=mesh["replicate"], **kw)
    for stack in (model.encoder, model.decoder):
        for block in stack.layers if stack is not None else ():
            fully_shard(block, **kw)
    fully_shard(model, **kw)
    # FSDP2 warns that the root returns views (ModelOutput's logits); lmlab never modifies them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=expert_parallel == 1)
    set_model_state_dict(model, full, options=options)
    model.init_buffers()
    torch.manual_seed(seed)  # as after a one-process build: the data and dropout streams start the same
    return model


def shard_model(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 over a model every rank already holds whole and alike (a loaded pre-trained model with its
    new head drawn from the same seed): `fully_shard` on every Block, then on the whole model; each rank
    keeps its shard of the weights it has. With `param_dtype` (bf16) the policy computes in it and
    reduces gradients in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = {"mp_policy": policy} if policy is not None else {}
    for stack in (model.encoder, model.decoder):
        for block in stack.layers if stack is not None else ():
            fully_shard(block, **kw)
    fully_shard(model, **kw)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model


def check_expert_parallel(degree: int, world: World, model_cfg: Any) -> None:
    """Expert parallelism over every process of the run, on a model with MoE layers."""
    if degree == 1:
        return
    if degree > world.size or world.size % degree:
        raise ConfigError(
            f"expert_parallel {degree} must divide the number of processes ({world.size}): the experts are "
            f"sharded over groups of {degree} processes"
        )
    if model_cfg.ffn != "moe":
        raise ConfigError(f"expert_parallel {degree} needs a model with MoE layers (this one's ffn is {model_cfg.ffn})")
    from lmlab.train.expert_parallel import experts_per_rank

    experts_per_rank(model_cfg.moe_experts, degree)


def share_router_noise(model: nn.Module, world: World) -> int:
    """Make every token-choice router draw its training noise (Switch's jitter, Shazeer's noisy
    logits) for the whole global micro-batch and keep this rank's rows of it (`shard` gives each rank
    an equal, contiguous share), so that the noise of N processes is the one process's and the run
    does not depend on the world size. Returns how many routers were set."""
    routers = [m for m in model.modules() if hasattr(m, "noise_shard")]
    for m in routers:
        m.noise_shard = (world.rank, world.size) if world.size > 1 else None
    return len(routers)


def use_global_routing_stats(model: nn.Module, world: World) -> int:
    """Make every MoE layer's load-balancing loss and routing statistics use the counts of all ranks'
    tokens, as one process with the global batch computes them (Megatron's global option). The
    value is the global one on every rank. The gradient of each rank's own router probabilities is
    scaled by N, because DDP then divides by N. Training forwards only: evaluation keeps local
    counts, so rank 0 can evaluate alone. Returns how many layers were set."""
    size = world.size

    def reduce(
        routed_E: torch.Tensor, tokens: int, probs_sum_E: torch.Tensor
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        routed = routed_E.clone()
        dist.all_reduce(routed)
        count = torch.tensor([tokens], dtype=torch.long, device=routed_E.device)
        dist.all_reduce(count)
        mine = probs_sum_E.detach()
        every = mine.clone()
        dist.all_reduce(every)
        return routed, int(count.item()), size * probs_sum_E - (size - 1) * mine + (every - mine)

    layers = [m for m in model.modules() if hasattr(m, "reduce_stats")]
    for m in layers:
        m.reduce_stats = reduce if size > 1 else None
    return len(layers)


def ddp(model: nn.Module, world: World) -> nn.Module:
    """The model under DDP (lmlab.train.parallel decides when): experts each rank holds alone are left
    out of the averaging, and routed experts a micro-batch did not choose are looked for."""
    from torch.nn.parallel import DistributedDataParallel

    from lmlab.train.expert_parallel import expert_parameters

    experts = expert_parameters(model)
    if experts:  # each rank holds other experts: their gradients are not averaged (expert_parallel.py)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(experts))
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    # routed experts a micro-batch does not choose get no gradient: DDP must look for them
    unused = getattr(getattr(model, "config", None), "ffn", "dense") == "moe"
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_batch(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise ConfigError(
            f"batch_size {batch_size} (the global micro-batch) does not divide among {world.size} processes: "
            f"use a multiple of {world.size}"
        )


def shard(batch: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """This rank's rows of a global micro-batch: rows [rank * B/N, (rank + 1) * B/N)."""
    if world.size == 1:
        return batch
    rows = next(iter(batch.values())).shape[0]
    check_batch(rows, world)
    per = rows // world.size
    return {k: v[world.rank * per : (world.rank + 1) * per] for k, v in batch.items()}


def labelled(labels: torch.Tensor, shifts: bool) -> int:
    """Labelled positions of a batch (for causal LMs: positions whose next token is labelled)."""
    if shifts:
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def loss_weight(full: dict[str, torch.Tensor], part: dict[str, torch.Tensor], world: World, shifts: bool) -> float:
    """What this rank's token-averaged loss (lm, mlm or tagger head) is multiplied by so that DDP's gradient average equals the
    one-process gradient: N x (its labelled tokens / the micro-batch's)."""
    if world.size == 1 or "labels" not in full or full["labels"].ndim < 2:  # a label per row: rows split evenly
        return 1.0
    total = labelled(full["labels"], shifts)
    return world.size * labelled(part["labels"], shifts) / total if total else 1.0


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def no_sync(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on every micro-batch but the last
    of a step."""
    if last:
        return contextlib.nullcontext()
    if hasattr(module, "set_requires_gradient_sync"):
        return _fsdp_no_sync(module)
    if hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, on_every_rank: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole model's and optimizer's state on the CPU, keyed by parameter name, gathered from the
    shards of an FSDP2 model (a collective: every rank calls it). Any world size can load the result.
    Rank 0 alone receives it, unless `on_every_rank`."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=not on_every_rank)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if on_every_rank:
        model_state = {k: v.cpu() for k, v in model_state.items()}
    return model_state, optimizer_state


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any] | None,
    optimizer_state: dict[str, Any],
) -> None:
    """Put a whole-model state (from `full_state` or an ordinary checkpoint) into a model, sharded or
    not; every rank holds the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    if model_state is not None:
        set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def mean_over_ranks(value: float, world: World, device: torch.device) -> float:
    """The mean of a number over all ranks (the number itself in one process)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world.size


def barrier(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.barrier()


def describe(world: World, parallel: str) -> dict[str, Any]:
    return {
        "parallel": parallel,
        "world_size": world.size,
        "backend": dist.get_backend() if dist.is_initialized() else None,
    }
