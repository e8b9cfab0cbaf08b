"""Evaluate a model folder on text: perplexity, or pseudo-perplexity for encoders.

decoder           perplexity over consecutive seq_len windows of the text
prefix-lm         perplexity of each window's second half, its first half given as a bidirectional prefix
encoder           pseudo-perplexity (Salazar et al. 2020): every token masked in turn and scored
encoder-decoder   the span-corruption (or infilling) loss with fixed seed 0, and its exponent
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.data.corpus import corpus_files
from lmlab.data.objectives import Batches, ObjectiveConfig, make_objective
from lmlab.data.store import build_store
from lmlab.errors import ConfigError
from lmlab.families import IGNORE_INDEX
from lmlab.io import load
from lmlab.tokenizer import load_tokenizer
from lmlab.train.trainer import evaluate, resolve_device


@torch.no_grad()
def evaluate_text(
    model_dir: str | os.PathLike[str],
    data: list[str],
    seq_len: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = 20_000,
    doc_sep: str = "line",
    field: str = "text",
    cache_dir: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    model = load(model_dir)
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise ConfigError(f"{model_dir}: has no tokenizer.json; evaluation on text needs the model's tokenizer")
    tok = load_tokenizer(model_dir)
    cfg = model.config
    note = None
    if seq_len is None:  # 128, or what the model's positions hold
        seq_len, note = cfg.fit_default(128, "--seq-len")
    cfg.check_length(seq_len, f"seq_len={seq_len}")
    dev = resolve_device(device)
    model.to(dev)
    cache = Path(cache_dir) if cache_dir else Path(os.environ.get("LMLAB_CACHE", Path.home() / ".cache" / "lmlab"))
    store, _ = build_store(corpus_files(data), tok, cache, doc_sep, field)
    docs = np.arange(store.n_docs)
    limit = max_tokens or store.n_tokens
    method = cfg.spec.eval_method
    if method == "pseudo-perplexity":
        result = _pseudo_perplexity(model, store, docs, tok, seq_len, limit, dev)
        return {**result, "family": cfg.family, "seq_len": seq_len, "notes": [note] if note else []}
    name = method
    if method == "span" and tok.id_of("mask") is not None and not tok.sentinel_ids:
        name = "infilling"
    objective = make_objective(ObjectiveConfig(name, seq_len), store, docs, tok, "eval")
    n_batches = max(1, math.ceil(limit / (objective.tokens_per_example * batch_size)))
    batches = Batches(objective, batch_size, seed=0, shuffle=False).fixed(n_batches)
    if name == "prefix-lm":  # a fixed split at the middle instead of a random one
        for b in batches:
            half = b["input_ids"].shape[1] // 2
            b["prefix_lengths"][:] = half
            b["labels"][:, :half] = IGNORE_INDEX
    result = evaluate(model, batches, dev)
    method = {
        "clm": "perplexity",
        "prefix-lm": "perplexity of the second half given the first as prefix",
        "span": "span-corruption loss (seed 0)",
        "infilling": "text-infilling loss (seed 0)",
    }[name]
    return {
        "loss": result["loss"],
        "ppl": result["ppl"],
        "tokens": result["tokens"],
        "method": method,
        "family": cfg.family,
        "seq_len": seq_len,
        "notes": [note] if note else [],
    }


def _pseudo_perplexity(model, store, docs, tok, seq_len: int, limit: int, dev: torch.device) -> dict[str, Any]:
    """Mask each token of each window in turn (one batch per window) and sum the log-probabilities."""
    start, end = tok.id_of("cls"), tok.id_of("sep")
    if tok.mask_id is None:
        raise ConfigError("pseudo-perplexity needs the tokenizer's mask token")
    stream = store.stream(docs, tok.id_of("sep"), "eval")
    body = seq_len - 2
    total, count = 0.0, 0
    for s in range(0, min(len(stream), limit), body):
        window = torch.as_tensor(np.asarray(stream[s : s + body], dtype=np.int64))
        ids = torch.cat([torch.tensor([start]), window, torch.tensor([end])]) if start is not None else window
        positions = torch.arange(1 if start is not None else 0, len(ids) - (1 if start is not None else 0))
        batch = ids.repeat(len(positions), 1)
        batch[torch.arange(len(positions)), positions] = tok.mask_id
        logits = model(batch.to(dev)).logits.float()
        logp = F.log_softmax(logits[torch.arange(len(positions)), positions], dim=-1)
        total -= logp[torch.arange(len(positions)), ids[positions].to(dev)].sum().item()
        count += len(positions)
        if count >= limit:
            break
    loss = total / max(count, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "tokens": count,
        "method": "pseudo-perplexity (each token masked in turn, Salazar et al. 2020)",
    }
