"""Mixtral: MixtralModel, MixtralForCausalLM. The LLaMA layout with a sparse top-k MoE in every
layer; the k chosen weights are renormalised."""

from __future__ import annotations

from typing import Any

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.hf.common import Adapter, Entry, experts
from lmlab.hf.llama import is_llama_layout, llama_config, llama_config_out, llama_weights


def _config_in(raw: dict[str, Any], source: str, common: dict[str, Any]) -> ModelConfig:
    if raw.get("sliding_window"):
        raise CheckpointError(
            f"{source}: sliding-window attention (sliding_window={raw['sliding_window']}) is not supported"
        )
    return llama_config(
        raw,
        source,
        common,
        ffn="moe",
        moe_experts=raw["num_local_experts"],
        moe_top_k=raw.get("num_experts_per_tok", 2),
        moe_renormalize=True,
        moe_jitter=raw.get("router_jitter_noise", 0.0),
        qkv_bias=False,
        moe_aux_weight=raw.get("router_aux_loss_coef", 0.001),
    )


def _config_out(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **llama_config_out(cfg),
        "router_aux_loss_coef": cfg.moe_aux_weight,
        "num_experts_per_tok": cfg.moe_top_k,
        "num_local_experts": cfg.moe_experts,
        "router_jitter_noise": cfg.moe_jitter,
        "sliding_window": None,
    }


def _weights(cfg: ModelConfig, p: str) -> list[Entry]:
    def ffn(ours: str, a: str, i: int) -> list[Entry]:
        e, n = f"{a}block_sparse_moe.", range(cfg.moe_experts)
        return [
            Entry(f"{ours}.router.gate.weight", (f"{e}gate.weight",)),
            experts(f"{ours}.experts.w_up", [(f"{e}experts.{j}.w1.weight", f"{e}experts.{j}.w3.weight") for j in n]),
            experts(f"{ours}.experts.w_down", [(f"{e}experts.{j}.w2.weight",) for j in n]),
        ]

    return llama_weights(cfg, p, ffn)


ADAPTER = Adapter(
    model_type="mixtral",
    architectures={"MixtralModel": ((), False), "MixtralForCausalLM": (("lm",), False)},
    default_architecture="MixtralForCausalLM",
    config_in=_config_in,
    config_out=_config_out,
    weights=_weights,
    holds=lambda cfg: is_llama_layout(cfg) and cfg.ffn == "moe" and not cfg.moe_shared_experts,
    prefix="model.",
)
