"""The heads a Model can carry. Pre-training: lm (next token), mlm (masked token, BERT's transform),
nsp (BERT's next-sentence pair), read through the pooler. Fine-tuning (one at a time, never beside a
vocabulary head): classify (one vector per sequence: [CLS], mean or last real token), tag (every
token) and span (start / end logits for extractive QA). Each task head returns its logits and, given
labels, its loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig
from lmlab.families import IGNORE_INDEX
from lmlab.model.ffn import activation_fn
from lmlab.model.linear import linear


class Pooler(nn.Module):
    """BERT's pooler: tanh(W h_[CLS] + b), the input of the NSP and classification heads (BART's
    classification head has the same dense + tanh, on the final </s> state: `transform`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def transform(self, v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(v))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.transform(h[:, 0])


class MLMHead(nn.Module):
    """BERT / RoBERTa masked-LM head: dense -> activation -> LayerNorm -> vocabulary (tied) + bias."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = activation_fn(cfg.activation if cfg.activation in ("relu", "gelu", "gelu_tanh") else "gelu")
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.weight = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.act(self.dense(h)))
        return linear(h, embedding if self.weight is None else self.weight, self.bias)


class LMHead(nn.Module):
    """Next-token head: hidden -> vocabulary, tied to the token embedding unless configured not to."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.scale = cfg.head_input_scale
        self.weight = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.lm_head_bias else None
        self.packed: nn.Module | None = None  # lmlab.quantize.quantize_linear puts an Int8Linear / Fp16Linear here

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            h = h * self.scale
        if self.packed is not None:
            return self.packed(h)
        return linear(h, embedding if self.weight is None else self.weight, self.bias)


def pool(h: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """One vector per sequence (B, T, C) -> (B, C): [CLS] (position 0), the mean over real tokens, or the
    last real token (works for left and right padding)."""
    if how == "cls":
        return h[:, 0]
    if attention_mask is None:
        return h[:, -1] if how == "last" else h.mean(dim=1)
    if how == "mean":
        m = attention_mask.to(h.dtype)
        return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    last = (torch.arange(h.shape[1], device=h.device) * attention_mask.long()).argmax(dim=1)
    return h[torch.arange(h.shape[0], device=h.device), last]


class SequenceClassifier(nn.Linear):
    """Pooled vector -> num_labels logits (a Linear); `loss`: cross-entropy, or mean squared error for
    one label (regression)."""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.out_features == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels.reshape(-1))


class TokenTagger(nn.Linear):
    """Every token state -> tag logits (a Linear); positions labelled IGNORE_INDEX carry no loss."""

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.reshape(-1, self.out_features).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )


class SpanHead(nn.Linear):
    """Every token state -> (start, end) logits. The loss averages both cross-entropies; positions outside
    the window are ignored, as in transformers."""

    def __init__(self, d_model: int) -> None:
        super().__init__(d_model, 2)

    @staticmethod
    def split(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = (t.squeeze(-1) for t in logits.split(1, dim=-1))
        return start, end

    @staticmethod
    def loss(
        start: torch.Tensor, end: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor
    ) -> torch.Tensor:
        T = start.shape[1]
        s, e = start_positions.clamp(0, T), end_positions.clamp(0, T)
        return (F.cross_entropy(start.float(), s, ignore_index=T) + F.cross_entropy(end.float(), e, ignore_index=T)) / 2
