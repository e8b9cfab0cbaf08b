"""Named-entity recognition (token classification): CoNLL-style files, one token per line with its tag
in the last column, a blank line between sentences, `-DOCSTART-` lines skipped; BIO or IOBES. A word's
tag goes to its first sub-word (past a bare "\u2581" / "\u0120" word-start piece), the other sub-words are
ignored by the loss, and predictions are read off those same sub-words. Entity precision / recall / F1
equal seqeval's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab import metrics
from lmlab.config import ModelConfig
from lmlab.data.corpus import read_utf8, text_lines
from lmlab.errors import DataError
from lmlab.families import IGNORE_INDEX
from lmlab.model import Model
from lmlab.tasks.base import Setup, Task, batches_of, outputs, specials
from lmlab.tasks.classify import Example
from lmlab.tokenizer import Tokenizer


def read_conll(path: str | Path, need_labels: bool = True) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    sentences, words, tags, start = [], [], [], 1
    for n, line in enumerate(text_lines(read_utf8(path)) + [""], 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                sentences.append(Example(words=words, label=tags if need_labels else None, where=f"{path}:{start}"))
            words, tags, start = [], [], n + 1
            continue
        if need_labels and len(parts) < 2:
            raise DataError(f"{path}:{n}: expected a token and its tag, got {line!r}")
        words.append(parts[0])
        tags.append(parts[-1] if len(parts) > 1 else None)
    if not sentences:
        raise DataError(f"{path}: no sentences")
    return sentences


def encode_tagging(
    examples: list[Example], tok: Tokenizer, cfg: ModelConfig, max_len: int, label_ids: dict[str, int] | None
) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """Rows, and for each sentence the position of every word's first sub-word (-1 when truncated away)."""
    head, tail = specials(tok, cfg)
    byte_level = tok.kind == "bpe"
    # a word-start marker on its own ("▁" of SentencePiece-style vocabularies, "Ġ" of byte-level BPE) says
    # nothing about the word: its label goes to the next piece, the first that carries the word's text
    bare = {i for i in (tok.backend.token_to_id("\u2581"), tok.backend.token_to_id("\u0120")) if i is not None}
    rows, firsts = [], []
    for ex in examples:
        ids, labels, first = list(head), [IGNORE_INDEX] * len(head), []
        for i, word in enumerate(ex.words):
            pieces = tok.encode((" " if byte_level and i else "") + word, add_special_tokens=False) or [tok.unk_id or 0]
            if len(ids) + len(pieces) + len(tail) > max_len:
                first += [-1] * (len(ex.words) - i)  # truncated: these words get no prediction
                break
            skip = 1 if len(pieces) > 1 and pieces[0] in bare else 0
            first.append(len(ids) + skip)
            tag = ex.label[i] if ex.label is not None and label_ids is not None else None
            if tag is not None and tag not in label_ids:
                raise DataError(
                    f"{ex.where}: tag {tag!r} of word {i + 1} is not one of the training tags ({', '.join(label_ids)})"
                )
            labels += (
                [IGNORE_INDEX] * skip
                + [label_ids[tag] if tag is not None else IGNORE_INDEX]
                + [IGNORE_INDEX] * (len(pieces) - 1 - skip)
            )
            ids += pieces
        ids += tail
        labels += [IGNORE_INDEX] * len(tail)
        row: dict[str, Any] = {"input_ids": np.array(ids)}
        if ex.label is not None and label_ids is not None:
            row["labels"] = np.array(labels)
        rows.append(row)
        firsts.append(first)
    return rows, firsts


def tagging_eval(tags: list[str]) -> Callable[..., dict[str, Any]]:
    def run(
        model: Model, batches: list[dict[str, torch.Tensor]], device: torch.device, autocast: Any = None
    ) -> dict[str, Any]:
        gold, pred, loss, n = [], [], 0.0, 0
        for batch, out in outputs(model, batches, device):
            loss += float(out.loss)
            n += 1
            guess = out.logits.argmax(-1)
            for g_row, p_row in zip(batch["labels"], guess):
                keep = g_row != IGNORE_INDEX  # first sub-words: one per word
                gold.append([tags[i] for i in g_row[keep].tolist()])
                pred.append([tags[i] for i in p_row[keep].tolist()])
        flat_gold, flat_pred = [t for s in gold for t in s], [t for s in pred for t in s]
        return {
            "loss": loss / max(n, 1),
            **metrics.entity_scores(gold, pred),
            "token_accuracy": metrics.accuracy(flat_gold, flat_pred),
            "evidence": metrics.entity_evidence(gold, pred),
        }

    return run


class NER(Task):
    name, head = "ner", "tag"
    metric = "f1"
    formats = "CoNLL (token per line, tag last)"

    def setup(self, fc: Any, tok: Tokenizer, cfg: ModelConfig) -> Setup:
        train_ex = read_conll(fc.train)
        labels = sorted({t for e in train_ex for t in e.label})
        label_ids = {v: i for i, v in enumerate(labels)}
        eval_ex = read_conll(fc.eval) if fc.eval else []
        return Setup(
            encode_tagging(train_ex, tok, cfg, fc.max_len, label_ids)[0],
            encode_tagging(eval_ex, tok, cfg, fc.max_len, label_ids)[0],
            labels,
            tagging_eval(labels),
        )

    def predict(
        self, model: Model, tok: Tokenizer, info: dict[str, Any], data: str, batch_size: int, max_len: int
    ) -> list[dict[str, Any]]:
        return self.predict_examples(model, tok, info, read_conll(data, need_labels=False), batch_size, max_len)

    def predict_examples(
        self, model: Model, tok: Tokenizer, info: dict[str, Any], examples: list[Example], batch_size: int, max_len: int
    ) -> list[dict[str, Any]]:
        """Prediction records for sentences already split into words (what `lmlab serve` answers with)."""
        cfg = model.config
        rows, firsts = encode_tagging(examples, tok, cfg, max_len, None)
        out: list[dict[str, Any]] = []
        for batch in batches_of(self, rows, tok, cfg, batch_size):
            for logits in model(**batch).logits.float():
                k = len(out)
                guess = logits.argmax(-1).tolist()
                out.append(
                    {"tokens": examples[k].words, "tags": [cfg.labels[guess[p]] if p >= 0 else "O" for p in firsts[k]]}
                )
        return out
