"""RoBERTa: RobertaModel, RobertaForMaskedLM. BERT's encoder with positions counted over non-pad
tokens from pad + 1, and its own MLM head names."""

from __future__ import annotations

from lmlab.config import ModelConfig
from lmlab.hf.bert import encoder_config_in, encoder_config_out, encoder_weights
from lmlab.hf.common import Adapter, Entry, linear, norm


def _weights(cfg: ModelConfig, p: str) -> list[Entry]:
    t = encoder_weights(cfg, p)
    if "mlm" in cfg.heads:
        t += linear("mlm_head.dense", "lm_head.dense", True)
        t += norm("mlm_head.norm", "lm_head.layer_norm", True)
        t += [Entry("mlm_head.bias", ("lm_head.bias",))]
        if not cfg.tie_embeddings:
            t += [Entry("mlm_head.weight", ("lm_head.decoder.weight",))]
    return t


ADAPTER = Adapter(
    model_type="roberta",
    architectures={"RobertaModel": ((), True), "RobertaForMaskedLM": (("mlm",), False)},
    default_architecture="RobertaModel",
    config_in=lambda raw, source, common: encoder_config_in(raw, source, common, roberta=True),
    config_out=encoder_config_out,
    weights=_weights,
    holds=lambda cfg: not cfg.spec.has_decoder and cfg.position_from_padding,
    prefix="roberta.",
)
