"""Qwen2-MoE: Qwen2MoeModel, Qwen2MoeForCausalLM. The LLaMA layout with q/k/v biases, fine-grained
experts, a sigmoid-gated shared expert, and dense FFNs in its first `mlp_only_layers`."""

from __future__ import annotations

from typing import Any

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.hf.common import Adapter, Entry, experts, linear
from lmlab.hf.llama import dense_swiglu, is_llama_layout, llama_config, llama_config_out, llama_weights


def _config_in(raw: dict[str, Any], source: str, common: dict[str, Any]) -> ModelConfig:
    if raw.get("sliding_window") and raw.get("use_sliding_window"):
        raise CheckpointError(
            f"{source}: sliding-window attention (sliding_window={raw['sliding_window']}) is not supported"
        )
    dense_layers = sorted(raw.get("mlp_only_layers") or [])
    if dense_layers != list(range(len(dense_layers))):
        raise CheckpointError(
            f"{source}: mlp_only_layers={dense_layers} is not supported (lmlab keeps dense "
            "FFNs in the first N layers only)"
        )
    return llama_config(
        raw,
        source,
        common,
        ffn="moe",
        moe_experts=raw["num_experts"],
        moe_top_k=raw.get("num_experts_per_tok", 4),
        moe_d_ff=raw["moe_intermediate_size"],
        moe_every=raw.get("decoder_sparse_step", 1),
        moe_first_dense=len(dense_layers),
        moe_renormalize=bool(raw.get("norm_topk_prob", False)),
        moe_shared_experts=1,
        moe_shared_d_ff=raw["shared_expert_intermediate_size"],
        moe_shared_gate=True,
        qkv_bias=bool(raw.get("qkv_bias", True)),
        moe_aux_weight=raw.get("router_aux_loss_coef", 0.001),
    )


def _config_out(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **llama_config_out(cfg),
        "router_aux_loss_coef": cfg.moe_aux_weight,
        "num_experts_per_tok": cfg.moe_top_k,
        "num_experts": cfg.moe_experts,
        "moe_intermediate_size": cfg.expert_d_ff,
        "decoder_sparse_step": cfg.moe_every,
        "mlp_only_layers": list(range(cfg.moe_first_dense)),
        "norm_topk_prob": cfg.moe_renormalizes,
        "shared_expert_intermediate_size": cfg.shared_d_ff,
        "qkv_bias": cfg.use_qkv_bias,
        "use_sliding_window": False,
    }


def _weights(cfg: ModelConfig, p: str) -> list[Entry]:
    def ffn(ours: str, a: str, i: int) -> list[Entry]:
        e = f"{a}mlp."
        if not cfg.is_moe_layer(i):
            return dense_swiglu(ours, f"{e}gate_proj", f"{e}up_proj", f"{e}down_proj", cfg.d_ff)
        n = range(cfg.moe_experts)
        t = [
            Entry(f"{ours}.router.gate.weight", (f"{e}gate.weight",)),
            experts(
                f"{ours}.experts.w_up",
                [(f"{e}experts.{j}.gate_proj.weight", f"{e}experts.{j}.up_proj.weight") for j in n],
            ),
            experts(f"{ours}.experts.w_down", [(f"{e}experts.{j}.down_proj.weight",) for j in n]),
        ]
        s = f"{e}shared_expert."
        t += dense_swiglu(f"{ours}.shared", f"{s}gate_proj", f"{s}up_proj", f"{s}down_proj", cfg.shared_d_ff)
        t += linear(f"{ours}.shared_gate", f"{e}shared_expert_gate", False)
        return t

    return llama_weights(cfg, p, ffn)


ADAPTER = Adapter(
    model_type="qwen2_moe",
    architectures={"Qwen2MoeModel": ((), False), "Qwen2MoeForCausalLM": (("lm",), False)},
    default_architecture="Qwen2MoeForCausalLM",
    config_in=_config_in,
    config_out=_config_out,
    weights=_weights,
    holds=lambda cfg: is_llama_layout(cfg) and cfg.ffn == "moe" and cfg.moe_shared_experts > 0,
    prefix="model.",
)
