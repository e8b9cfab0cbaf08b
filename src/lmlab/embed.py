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
    for start in range(0, len(texts), batch_size):
        ids, mask = encode_batch(
            tokenizer, texts[start : start + batch_size], model.config.max_seq_len, model.config.pad_token_id
        )
        out.append(pooled_states(model, ids, mask, pooling, normalize))
    return torch.cat(out)


@torch.no_grad()
def pooled_states(
    model: Model, ids: torch.Tensor, mask: torch.Tensor | None = None, pooling: str = "mean", normalize: bool = True
) -> torch.Tensor:
    """(B, d_model) pooled final hidden states of token ids (B, T) with their padding mask: the
    encoder's for an encoder-decoder, the last layer's otherwise; mean over real tokens or [CLS]."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    cfg = model.config
    if cfg.spec.seq2seq:
        start = torch.full((ids.shape[0], 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
        h = model(ids, attention_mask=mask, decoder_input_ids=start).encoder_last_hidden_state
    else:
        h = model(ids, attention_mask=mask).last_hidden_state
    h = h.float()
    if pooling == "cls":
        pooled = h[:, 0]
    else:
        m = mask.to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1) if normalize else pooled
