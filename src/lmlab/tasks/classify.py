"""Sequence classification and regression: TSV / CSV with a header row, or JSONL; one or two text
columns and a label column (GLUE's files work as they come: `sentence`, `sentence1`/`sentence2`,
`question`/`sentence` ... are found by name, or name them). Numeric non-integer labels (STS-B) make a
regression. Metrics: accuracy, macro-F1 and MCC (Pearson and Spearman for regression)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmlab import metrics
from lmlab.config import ModelConfig
from lmlab.errors import DataError
from lmlab.model import Model
from lmlab.tasks.base import Setup, Task, batches_of, outputs, read_rows, specials
from lmlab.tokenizer import Tokenizer

_TEXT_COLUMNS = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
    ("#1 String", "#2 String"),
    ("sentence",),
    ("text",),
)
_LABEL_COLUMNS = ("label", "Quality", "gold_label", "score")


@dataclass
class Example:
    texts: list[str] | None = None  # classification: one or two texts
    words: list[str] | None = None  # NER
    label: Any = None  # class name, float, or a tag per word
    where: str = ""  # file:line, for errors


def read_table(
    path: str | Path, text_columns: list[str] | None = None, label_column: str | None = None, need_labels: bool = True
) -> tuple[list[Example], list[str], str | None]:
    """Rows of a TSV / CSV (header row) or JSONL file -> examples, with the columns that were used."""
    path = Path(path)
    rows = read_rows(path)
    columns = list(rows[0][1])
    if text_columns is None:
        text_columns = next((list(c) for c in _TEXT_COLUMNS if all(x in columns for x in c)), None)
        if text_columns is None:
            raise DataError(
                f"{path}: cannot tell which columns hold the text among {', '.join(columns)}; "
                "name them with --text-columns"
            )
    if label_column is None:
        label_column = next((c for c in _LABEL_COLUMNS if c in columns), None)
        if label_column is None and need_labels:
            raise DataError(f"{path}: no label column among {', '.join(columns)}; name it with --label-column")
    out = []
    for n, row in rows:
        missing = [c for c in text_columns + ([label_column] if need_labels else []) if c not in row]
        if missing:
            raise DataError(f"{path}:{n}: no column {missing[0]!r}")
        label = row.get(label_column) if label_column else None
        bad = next((c for c in text_columns if not isinstance(row[c], str)), None)
        if bad is not None:
            raise DataError(f"{path}:{n}: the {bad!r} column holds {type(row[bad]).__name__}, expected text")
        if label is not None and not isinstance(label, (str, int, float)):  # (bool is an int)
            raise DataError(
                f"{path}:{n}: the label ({label_column!r}) is {type(label).__name__}, expected text or a number"
            )
        out.append(Example(texts=list(map(row.get, text_columns)), label=label, where=f"{path}:{n}"))
    return out, text_columns, label_column


def is_regression(labels: list[Any]) -> bool:
    try:
        values = [float(v) for v in labels]
    except (TypeError, ValueError):
        return False
    return any(v != int(v) for v in values)


def encode_classification(
    examples: list[Example], tok: Tokenizer, cfg: ModelConfig, max_len: int, label_ids: dict[str, int] | None
) -> list[dict[str, Any]]:
    head, tail = specials(tok, cfg)
    rows = []
    for ex in examples:
        parts = [tok.encode(t, add_special_tokens=False) for t in ex.texts]
        budget = max_len - len(head) - len(tail) * len(parts)
        while sum(len(p) for p in parts) > budget:  # longest first, as transformers truncates pairs
            longest = max(range(len(parts)), key=lambda i: len(parts[i]))
            parts[longest] = parts[longest][:-1]
        ids, types = list(head), [0] * len(head)
        for k, p in enumerate(parts):
            ids += p + tail
            types += [k] * (len(p) + len(tail))
        if not ids:
            raise DataError(f"{ex.where}: the text is empty after tokenization")
        row: dict[str, Any] = {"input_ids": np.array(ids), "token_type_ids": np.array(types)}
        if ex.label is not None and label_ids is not None:
            if label_ids:  # classification
                if str(ex.label) not in label_ids:
                    raise DataError(
                        f"{ex.where}: label {ex.label!r} is not one of the training labels ({', '.join(label_ids)})"
                    )
                row["labels"] = label_ids[str(ex.label)]
            else:  # regression
                row["labels"] = float(ex.label)
        rows.append(row)
    return rows


def classification_eval(regression: bool) -> Callable[..., dict[str, Any]]:
    def run(
        model: Model, batches: list[dict[str, torch.Tensor]], device: torch.device, autocast: Any = None
    ) -> dict[str, Any]:
        gold, pred, loss, n = [], [], 0.0, 0
        for batch, out in outputs(model, batches, device):
            loss += float(out.loss) * len(batch["labels"])
            n += len(batch["labels"])
            gold += batch["labels"].tolist()
            pred += (out.logits.squeeze(-1) if regression else out.logits.argmax(-1)).tolist()
        if regression:
            return {"loss": loss / n, "pearson": metrics.pearson(gold, pred), "spearman": metrics.spearman(gold, pred)}
        return {
            "loss": loss / n,
            "accuracy": metrics.accuracy(gold, pred),
            "macro_f1": metrics.macro_f1(gold, pred),
            "mcc": metrics.matthews_corrcoef(gold, pred),
            # per example, in file order: what lmlab compare's intervals resample (never logged as a metric)
            "evidence": metrics.evidence("accuracy", range(n), [float(g == p) for g, p in zip(gold, pred)]),
        }

    return run


class Classify(Task):
    name, head = "classify", "classify"
    metric = "accuracy"
    formats = "TSV/CSV with a header, or JSONL"

    def setup(self, fc: Any, tok: Tokenizer, cfg: ModelConfig) -> Setup:
        train_ex, text_cols, label_col = read_table(fc.train, fc.text_columns, fc.label_column)
        raw_labels = [e.label for e in train_ex]
        regression = is_regression(raw_labels)
        labels = None if regression else sorted({str(v) for v in raw_labels})
        label_ids = {} if regression else {v: i for i, v in enumerate(labels)}
        eval_ex = read_table(fc.eval, text_cols, label_col)[0] if fc.eval else []
        return Setup(
            encode_classification(train_ex, tok, cfg, fc.max_len, label_ids),
            encode_classification(eval_ex, tok, cfg, fc.max_len, label_ids),
            labels,
            classification_eval(regression),
            {"text_columns": text_cols, "label_column": label_col, "regression": regression},
            metric="pearson" if regression else None,
        )

    def predict(
        self, model: Model, tok: Tokenizer, info: dict[str, Any], data: str, batch_size: int, max_len: int
    ) -> list[dict[str, Any]]:
        examples = read_table(data, info["text_columns"], None, need_labels=False)[0]
        return self.predict_examples(model, tok, info, examples, batch_size, max_len)

    def predict_examples(
        self, model: Model, tok: Tokenizer, info: dict[str, Any], examples: list[Example], batch_size: int, max_len: int
    ) -> list[dict[str, Any]]:
        """Prediction records for examples already read (what `lmlab serve` answers with)."""
        cfg = model.config
        rows = encode_classification(examples, tok, cfg, max_len, None)
        out: list[dict[str, Any]] = []
        for batch in batches_of(self, rows, tok, cfg, batch_size):
            for logits in model(**batch).logits.float():
                ex = examples[len(out)]
                if info.get("regression"):
                    out.append({"text": ex.texts, "score": float(logits[0])})
                else:
                    probs = F.softmax(logits, -1)
                    out.append(
                        {
                            "text": ex.texts,
                            "label": cfg.labels[int(probs.argmax())],
                            "probabilities": {lab: round(float(p), 6) for lab, p in zip(cfg.labels, probs)},
                        }
                    )
        return out
