"""Expert parallelism: the FFN experts of an MoE layer sharded across ranks, tokens exchanged with
all-to-all (GShard; Switch Transformer's scaling rests on it).

`GroupedExperts.forward(x_sorted, counts_E, w_A)` is the seam (lmlab.model.moe.experts). This module
wraps it from outside, and the router, the dispatch, the capacity and the combine stay as they are.
`ExpertParallelExperts` holds experts [rank·L, (rank+1)·L) of the E, where L = E / P, and makes four
moves:
1. It tells every rank how many of its rows go to each of that rank's experts (an all-to-all of the
   counts).
2. It sends the rows (an autograd-aware all-to-all with uneven splits; an expert may get none).
3. It runs its local experts on what it received, regrouped by expert.
4. It sends the outputs back the same way and applies the routing weights where the tokens live.
The gradients flow back through both all-to-alls.

Gradient scale: each expert's parameters live on one rank and collect the gradient of every rank's
tokens. When the ranks also average their other gradients (data parallelism over the same ranks),
`grad_scale = 1 / P` scales the experts' gradients to match. With summed losses and no averaging, it
stays 1.

Fewer ranks than the run has: with N ranks and expert parallelism E (E divides N), `expert_mesh`
lays the ranks out as an (N/E, E) DeviceMesh. Each row of E ranks shares out the experts and
exchanges tokens among itself; each column holds the same experts. A column's expert gradients are
summed (`sync_replicas`) with `grad_scale = 1 / N`, which is DDP's average over all N ranks. Under
FSDP2 (`parallelize_experts(fsdp=True)`, lmlab.train.distributed.build_sharded) each expert layer is
sharded over its column instead; FSDP2 averages the column, and `sync_replicas` scales by 1 / E.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lmlab.errors import ConfigError
from lmlab.model.moe.experts import GroupedExperts


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-to-all of rows: send[s] rows to rank s, recv[s] rows from rank s; differentiable."""
    from torch.distributed import _functional_collectives as fc

    out = fc.all_to_all_single_autograd(x.contiguous(), recv, send, group if group is not None else dist.group.WORLD)
    return fc.wait_tensor(out)


def experts_per_rank(experts: int, ranks: int) -> int:
    """L = E / P, or a ConfigError saying why the experts cannot be split that way."""
    if ranks < 1 or experts % ranks:
        raise ConfigError(
            f"expert parallelism over {ranks} ranks needs a number of experts it divides; the layer has {experts}"
        )
    return experts // ranks


class ExpertParallelExperts(GroupedExperts):
    """This rank's share of a GroupedExperts (same parameter names, L of the E experts), run on the
    rows every rank routes to them."""

    def __init__(
        self,
        experts: GroupedExperts,
        group: dist.ProcessGroup | None = None,
        grad_scale: float = 1.0,
        replicas: dist.ProcessGroup | None = None,
        mesh: object = None,
    ) -> None:
        nn.Module.__init__(self)
        # group: the ranks that share out the experts; replicas: the ranks holding the same ones (when
        # the experts are sharded over fewer ranks than the run has); mesh: both, as an (replicate,
        # expert) DeviceMesh, for sharded checkpoints
        self.group, self.grad_scale, self.replicas, self.mesh = group, grad_scale, replicas, mesh
        self.fsdp_scale: float | None = None  # under FSDP2 (parallelize_experts(fsdp=True))
        self.dcp_mesh = None
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.total = experts.n_experts
        self.local = experts_per_rank(self.total, self.size)
        self.act_name, self.gated, self.act, self.init_std = (
            experts.act_name,
            experts.gated,
            experts.act,
            experts.init_std,
        )
        mine = slice(self.rank * self.local, (self.rank + 1) * self.local)
        self.w_up = nn.Parameter(experts.w_up.detach()[mine].clone())
        self.w_down = nn.Parameter(experts.w_down.detach()[mine].clone())
        if grad_scale != 1.0:  # scaled as it reaches the parameter, before accumulation
            for p in (self.w_up, self.w_down):
                p.register_hook(lambda g: g * grad_scale)

    def forward(self, x_AD: torch.Tensor, counts_E: torch.Tensor, w_A: torch.Tensor | None = None) -> torch.Tensor:
        """Rows grouped by global expert (counts_E over all E experts) -> their outputs, in that order."""
        P, L = self.size, self.local
        counts_PL = counts_E.reshape(P, L).to(torch.long)
        recv_PL = torch.empty_like(counts_PL)
        dist.all_to_all_single(recv_PL, counts_PL.contiguous(), group=self.group)  # recv_PL[s, l]: rows from s
        send, recv = counts_PL.sum(1).tolist(), recv_PL.sum(1).tolist()
        x_RD = _exchange(x_AD, send, recv, self.group)  # ordered by source rank, then by local expert
        expert_R = torch.arange(L, device=x_AD.device).repeat(P).repeat_interleave(recv_PL.reshape(-1))
        order_R = torch.argsort(expert_R, stable=True)  # regrouped by local expert
        y_sorted = super().forward(x_RD.index_select(0, order_R), recv_PL.sum(0))  # this rank's experts
        y_RD = torch.empty_like(y_sorted).index_copy(0, order_R, y_sorted)
        y_AD = _exchange(y_RD, recv, send, self.group)
        return y_AD * w_A[:, None] if w_A is not None else y_AD

    def extra_repr(self) -> str:
        return (
            f"experts {self.rank * self.local}-{(self.rank + 1) * self.local - 1} of {self.total} on rank {self.rank}"
        )


def expert_mesh(world_size: int, degree: int, device_type: str = "cpu"):
    """The (replicate, expert) DeviceMesh of expert parallelism of `degree` over `world_size` ranks:
    ranks [g·E, (g+1)·E) share out the experts (E = degree), and ranks r, r + E, r + 2E, ... hold the
    same ones. A collective: every rank calls it."""
    from torch.distributed.device_mesh import init_device_mesh

    experts_per_rank(world_size, degree)  # degree must divide the ranks too
    return init_device_mesh(device_type, (world_size // degree, degree), mesh_dim_names=("replicate", "expert"))


def parallelize_experts(
    model: nn.Module,
    group: dist.ProcessGroup | None = None,
    grad_scale: float = 1.0,
    mesh: object = None,
    fsdp: bool = False,
) -> int:
    """Replace every MoE layer's GroupedExperts with this rank's ExpertParallelExperts, in place: over
    `group` (default: every rank), or over the expert dimension of `mesh` (expert_mesh), its
    replicate dimension then holding copies whose gradients `sync_replicas` sums. With `fsdp`, each
    layer will be under FSDP2 over the replicate dimension, which averages the copies' gradients
    instead (see `sync_replicas`). Returns how many layers were changed."""
    replicas = None
    if mesh is not None:
        group = mesh.get_group("expert")
        replicas = mesh.get_group("replicate") if mesh.size(0) > 1 else None
    dcp_mesh = None
    if fsdp:
        from torch.distributed.device_mesh import DeviceMesh

        # for checkpoints: the same ranks as an (expert, replicate) mesh, so that the rows a rank
        # holds are block `expert`, part `replicate` of the whole tensor (lmlab.train.sharded)
        dcp_mesh = DeviceMesh(mesh.device_type, mesh.mesh.T, mesh_dim_names=("expert", "replicate"))
    changed = 0
    for module in list(model.modules()):
        experts = getattr(module, "experts", None)
        if isinstance(experts, GroupedExperts) and not isinstance(experts, ExpertParallelExperts):
            layer = ExpertParallelExperts(experts, group, grad_scale, None if fsdp else replicas, mesh)
            if fsdp:
                copies = mesh.size(0)
                if layer.local % copies:
                    raise ConfigError(
                        f"with fsdp, the {layer.local} experts of each rank must divide among the {copies} "
                        "ranks that hold copies of them"
                    )
                # FSDP2 averages over the copies; the data-parallel average over every rank is 1/E of that
                layer.fsdp_scale, layer.dcp_mesh = 1.0 / mesh.size(1), dcp_mesh
            module.experts = layer
            changed += 1
    return changed


def expert_layers(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def sync_replicas(model: nn.Module) -> None:
    """Sum the expert gradients over the ranks that hold the same experts (with experts sharded over
    fewer ranks than the run has; nothing to do otherwise). With grad_scale = 1 / world size, the sum
    is the data-parallel average DDP gives the other parameters. Once per step, after the backward
    of its last micro-batch."""
    for layer in expert_layers(model):
        if layer.fsdp_scale is not None:  # FSDP2 has averaged the copies (gloo offers no pre-scaled sum)
            for p in (layer.w_up, layer.w_down):
                if p.grad is not None:
                    p.grad.mul_(layer.fsdp_scale)
            continue
        if layer.replicas is None:
            continue
        for p in (layer.w_up, layer.w_down):
            if p.grad is None:  # the same collectives on every rank, whatever the routing did
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=layer.replicas)


def expert_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The ranks that share out the experts (None: every rank)."""
    layers = expert_layers(model)
    return layers[0].group if layers else None


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The sharded expert parameters of a model, by name (empty without expert parallelism)."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            for name, p in module.named_parameters(recurse=False):
                out[f"{prefix}.{name}" if prefix else name] = p
    return out


def _gather_rows(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def gather_full_state(
    model: nn.Module, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, object]
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The whole model and optimizer state of an expert-parallel model: every rank's experts joined in
    expert order (a collective: every rank calls it). Non-expert entries are the same on every rank."""
    names = sorted(expert_parameters(model))
    group = expert_group(model)
    model_state = dict(model_state)
    states = dict(optimizer_state.get("state", {}))
    for name in names:
        model_state[name] = _gather_rows(model_state[name], group)
        if name in states:
            states[name] = {
                k: _gather_rows(v, group) if torch.is_tensor(v) and v.dim() else v for k, v in states[name].items()
            }
    return model_state, {**optimizer_state, "state": states}


def shard_full_state(
    model: nn.Module, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, object]
) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """This rank's share of a whole model and optimizer state (the inverse of gather_full_state)."""
    experts = expert_parameters(model)
    group = expert_group(model)
    model_state = dict(model_state)
    states = dict(optimizer_state.get("state", {}))
    for name, p in experts.items():
        rank, local, size = dist.get_rank(group), p.shape[0], dist.get_world_size(group)
        if model_state[name].shape[0] != local * size:
            raise ConfigError(
                f"{name}: the checkpoint has {model_state[name].shape[0]} experts, the model {local * size}"
            )
        rows = slice(rank * local, (rank + 1) * local)
        model_state[name] = model_state[name][rows]
        if name in states:
            states[name] = {k: v[rows] if torch.is_tensor(v) and v.dim() else v for k, v in states[name].items()}
    return model_state, {**optimizer_state, "state": states}


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over the whole model when its experts are spread over the ranks: the experts'
    squared norms are summed over the ranks, the rest is the same on every rank. Under FSDP2 every
    gradient element lives on one rank: all squared norms are summed over every rank."""
    from lmlab.train.dtensor import is_sharded

    if is_sharded(model):
        grads = [p.grad.to_local() for p in model.parameters() if p.grad is not None]
        sq = sum((g.float().pow(2).sum() for g in grads), grads[0].new_zeros((), dtype=torch.float32))
        dist.all_reduce(sq)
        total = sq.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total
    experts = {id(p) for p in expert_parameters(model).values()}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    shared = [g for p, g in zip((p for p in model.parameters() if p.grad is not None), grads) if id(p) not in experts]
    mine = [g for p, g in zip((p for p in model.parameters() if p.grad is not None), grads) if id(p) in experts]
    zero = grads[0].new_zeros((), dtype=torch.float32)
    sq_shared = sum((g.float().pow(2).sum() for g in shared), zero)
    sq_experts = sum((g.float().pow(2).sum() for g in mine), zero.clone())
    dist.all_reduce(sq_experts, group=expert_group(model))  # each expert once: over the ranks that share them out
    total = (sq_shared + sq_experts).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
