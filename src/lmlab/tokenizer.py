"""Tokenizers: load an existing one (tokenizer.json or a Hugging Face tokenizer folder) and encode batches."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from lmlab.errors import CheckpointError


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizers.Tokenizer from tokenizer.json, or from a folder holding tokenizer.json or vocab.txt."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.name == "tokenizer.json" and file.is_file():
        try:
            return Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{file}: not a readable tokenizer.json ({e})") from None
    vocab = path / "vocab.txt" if path.is_dir() else path
    if vocab.name == "vocab.txt" and vocab.is_file():  # a BERT WordPiece vocabulary
        return BertWordPieceTokenizer(str(vocab), lowercase=True)._tokenizer
    raise CheckpointError(f"{path}: no tokenizer.json or vocab.txt found")


def encode_batch(tokenizer: Tokenizer, texts: list[str], max_length: int,
                 pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask, (B, T), with special tokens, cut at max_length."""
    encodings = tokenizer.encode_batch(texts)
    # a tokenizer.json may carry its own padding setting; keep only the real tokens and pad here
    rows = [[i for i, keep in zip(e.ids, e.attention_mask) if keep][:max_length] for e in encodings]
    if pad_id is None:
        pad_id = tokenizer.token_to_id("[PAD]") or tokenizer.token_to_id("<pad>") or 0
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask
