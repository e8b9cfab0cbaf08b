"""One rank of the expert-parallel MoE layer test, started by torchrun with two processes:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/expert_parallel_worker.py KIND OUT.json

Every rank builds the same MoE layer and the same 4 sequences of 5 tokens, and computes the
one-process reference: the whole layer on all tokens, loss = sum(output * g). Then the layer's
experts are sharded (lmlab.train.expert_parallel). Rank 0 takes one sequence and rank 1 three, and
an expert is made one that no token chooses. Each rank compares its outputs and gradients with the reference and writes the largest
differences to OUT.json (rank 0; the router's gradients are summed over the ranks first).
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from lmlab.config import preset
from lmlab.model.moe.layer import MoE
from lmlab.train.expert_parallel import parallelize_experts

KINDS = {
    # GShard top-2 over 4 experts
    "top2": dict(moe_experts=4, moe_top_k=2),
    # DeepSeekMoE: fine-grained experts (narrow, k=3 of 8) and a shared expert, SwiGLU
    "fine-grained": dict(moe_experts=8, moe_top_k=3, moe_d_ff=16, moe_shared_experts=1, moe_activation="swiglu"),
    # Switch: top-1 with an expert capacity per sequence, tokens over it dropped
    "switch-capacity": dict(moe_experts=4, moe_top_k=1, moe_capacity_factor=1.0),
    # MoE++: zero, copy and constant experts beside the FFN experts (they run where the tokens are)
    "moe++": dict(moe_experts=4, moe_top_k=2, moe_zero_experts=1, moe_copy_experts=1, moe_constant_experts=1),
}


def main() -> int:
    kind, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = preset("gpt2-tiny").replace(d_model=32, n_heads=2, d_ff=64, ffn="moe", moe_aux_weight=0.0, **KINDS[kind])
    torch.manual_seed(0)
    layer = MoE(cfg).double()
    x = torch.randn(4, 5, cfg.d_model, dtype=torch.float64)  # 4 sequences of 5 tokens
    x[..., 0] = 1.0  # a constant feature, so that one gate row can rule an expert out
    unused = cfg.moe_experts - 1  # no token picks it
    with torch.no_grad():
        layer.router.gate.weight[unused] = 0.0
        layer.router.gate.weight[unused, 0] = -100.0
    g = torch.randn(4, 5, cfg.d_model, dtype=torch.float64)

    y_ref, record = layer(x)
    (y_ref * g).sum().backward()
    chosen = torch.bincount(record.experts_TK.reshape(-1), minlength=cfg.moe_total_experts)
    dropped = float(record.dropped)
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}

    ep = copy.deepcopy(layer)
    ep.zero_grad()
    parallelize_experts(ep)
    rows = slice(0, 1) if rank == 0 else slice(1, 4)  # 5 tokens on rank 0, 15 on rank 1
    y, _ = ep(x[rows])
    (y * g[rows]).sum().backward()

    diffs = {"output": (y - y_ref[rows]).abs().max().item()}
    local = ep.experts.local
    mine = slice(rank * local, (rank + 1) * local)
    for name, p in ep.named_parameters():
        if name.startswith("experts."):  # this rank's experts: their whole gradient is here
            diffs[name] = (p.grad - ref_grads[name][mine]).abs().max().item()
        else:  # router and shared expert: each rank has its tokens' part
            total = p.grad.clone()
            dist.all_reduce(total)
            diffs[name] = (total - ref_grads[name]).abs().max().item()
    every = [None, None]
    dist.all_gather_object(every, diffs)
    if rank == 0:
        merged = {f"rank{r}:{k}": v for r, d in enumerate(every) for k, v in d.items()}
        result = {
            "diffs": merged,
            "chosen": chosen.tolist(),
            "unused": unused,
            "local_experts": local,
            "experts": cfg.moe_experts,
            "dropped": dropped,
        }
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
