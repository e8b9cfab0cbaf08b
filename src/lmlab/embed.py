"""Sentence embeddings from an encoder: mean (or [CLS]) pooling of the last hidden states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lmlab.model import Model
from lmlab.tokenizer import encode_batch


@torch.no_grad()
def sentence_embeddings(
    model: Model,
    tokenizer: Tokenizer,
    texts: list[str],
    pooling: str = "mean",
    normalize: bool = True,
    batch_size: int = 32,
) -> torch.Tensor:
    """(N, d_model) embeddings, as sentence-transformers computes them for mean-pooling models."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        ids, mask = encode_batch(
            tokenizer, texts[start : start + batch_size], model.config.max_seq_len, model.config.pad_token_id
        )
        h = model(ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        if pooling == "cls":
            pooled = h[:, 0]
        else:
            m = mask.to(device, h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out.append(F.normalize(pooled, dim=-1) if normalize else pooled)
    return torch.cat(out)
