"""Switch Transformers: SwitchTransformersForConditionalGeneration. The T5 v1.0 layout whose every
`sparse_step`-th FFN is a top-1 MoE with a fixed per-sequence expert capacity."""

from __future__ import annotations

from typing import Any

from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError
from lmlab.hf.common import ACTS_OUT, Adapter, Entry, act, experts, linear
from lmlab.hf.t5 import t5_layout, t5_layout_out, t5_weights


def _config_in(raw: dict[str, Any], source: str, common: dict[str, Any]) -> ModelConfig:
    steps = {raw.get("encoder_sparse_step", 2), raw.get("decoder_sparse_step", 2)}
    if len(steps) != 1 or steps - {1, 2}:
        raise CheckpointError(
            f"{source}: encoder_sparse_step / decoder_sparse_step {sorted(steps)} are not supported "
            "(lmlab places MoE layers the same way in both stacks, every 1st or 2nd layer)"
        )
    if raw.get("router_bias"):
        raise CheckpointError(f"{source}: router_bias=true is not supported")
    tied = raw.get("tie_word_embeddings", True) is not False
    return t5_layout(
        raw,
        act(raw.get("dense_act_fn", "relu"), source),
        tied,
        common,
        tie_embeddings=tied,
        ffn="moe",
        moe_experts=raw["num_experts"],
        moe_top_k=1,
        moe_every=steps.pop(),
        moe_capacity=raw.get("expert_capacity", 64),
        moe_jitter=raw.get("router_jitter_noise", 0.0),
        moe_z_weight=raw.get("router_z_loss_coef", 0.001),
        moe_aux_weight=raw.get("router_aux_loss_coef", 0.001),
    )


def _config_out(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **t5_layout_out(cfg),
        "num_sparse_encoder_layers": sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers)),
        "num_sparse_decoder_layers": sum(cfg.is_moe_layer(i) for i in range(cfg.decoder_layers)),
        "encoder_sparse_step": cfg.moe_every,
        "decoder_sparse_step": cfg.moe_every,
        "dense_act_fn": ACTS_OUT.get(cfg.activation, cfg.activation),
        "num_experts": cfg.moe_experts,
        "expert_capacity": cfg.moe_capacity,
        "router_bias": False,
        "router_jitter_noise": cfg.moe_jitter,
        "router_z_loss_coef": cfg.moe_z_weight,
        "router_aux_loss_coef": cfg.moe_aux_weight,
        "router_dtype": "float32",
    }


def _weights(cfg: ModelConfig, p: str) -> list[Entry]:
    def ffn(ours: str, theirs: str, i: int) -> list[Entry]:
        m = f"{theirs}.mlp."
        if not cfg.is_moe_layer(i):
            return linear(f"{ours}.up", f"{m}wi", False) + linear(f"{ours}.down", f"{m}wo", False)
        n = range(cfg.moe_experts)
        return [
            Entry(f"{ours}.router.gate.weight", (f"{m}router.classifier.weight",)),
            experts(f"{ours}.experts.w_up", [(f"{m}experts.expert_{j}.wi.weight",) for j in n]),
            experts(f"{ours}.experts.w_down", [(f"{m}experts.expert_{j}.wo.weight",) for j in n]),
        ]

    return t5_weights(cfg, p, ffn)


ADAPTER = Adapter(
    model_type="switch_transformers",
    architectures={"SwitchTransformersForConditionalGeneration": (("lm",), False)},
    default_architecture="SwitchTransformersForConditionalGeneration",
    config_in=_config_in,
    config_out=_config_out,
    weights=_weights,
    holds=lambda cfg: cfg.spec.seq2seq and cfg.position == "relative" and cfg.ffn == "moe",
)
