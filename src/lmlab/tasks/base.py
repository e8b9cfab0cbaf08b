"""What every fine-tuning task shares: the Task interface, encoded rows as a data source for the
trainer, the special tokens around a text, and evaluation passes over fixed batches."""

from __future__ import annotations

import csv
import io
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.config import ModelConfig
from lmlab.data.corpus import read_utf8, text_lines
from lmlab.errors import DataError
from lmlab.families import IGNORE_INDEX
from lmlab.model import Model
from lmlab.tokenizer import Tokenizer

Evaluate = Callable[..., dict[str, Any]]  # (model, batches, device, autocast=None) -> metrics


@dataclass
class Setup:
    """A task made ready to train: encoded rows, the head's labels, how to evaluate, and what to save in
    finetune.json for `predict` (text columns, regression, ...)."""

    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    labels: list[str] | None
    evaluate: Evaluate
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # said to the user before training (e.g. what --truncate cut)
    files: Callable[[Path], None] | None = None  # writes the task's own files into the output folder at the end
    metric: str | None = None  # the run's own default metric where it differs from the task's (regression)


class Task(ABC):
    """One fine-tuning task. `setup` reads and encodes the files (read, encode, evaluate), `head` names the
    model head it trains, `data` wraps encoded rows for the trainer (collate), `predict` turns a file into
    prediction records. Register a new task in lmlab.tasks.REGISTRY."""

    name: str = ""
    head: str = ""  # classify | tag | span | lm (generation tasks keep the pre-trained lm head)
    formats: str = ""  # what the files look like, for help texts
    metric: str = "loss"  # the evaluation metric early stopping and the best checkpoint watch by default

    @abstractmethod
    def setup(self, fc: Any, tok: Tokenizer, cfg: ModelConfig) -> Setup:
        """Read the training (and evaluation) files of `fc`, encode them for `cfg`, say how to evaluate."""

    def data(self, rows: list[dict[str, Any]], pad_id: int, segments: bool) -> TaskData:
        return TaskData(rows, pad_id, segments)

    @abstractmethod
    def predict(
        self, model: Model, tok: Tokenizer, info: dict[str, Any], data: str, batch_size: int, max_len: int
    ) -> list[dict[str, Any]]:
        """Prediction records (JSON-ready dicts) for a file of the task's format."""


def pad_id(tok: Tokenizer) -> int:
    return tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)


class TaskData:
    """Encoded examples in the pre-training `Objective` interface, so `Batches` serves them."""

    dynamic = False

    def __init__(self, rows: list[dict[str, np.ndarray]], pad_id: int, segments: bool) -> None:
        self.rows, self.pad_id, self.segments = rows, pad_id, segments
        self.tokens_per_example = int(np.mean([len(r["input_ids"]) for r in rows])) if rows else 1

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, unit: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.rows[unit]

    def collate(self, examples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        T = max(len(e["input_ids"]) for e in examples)
        B = len(examples)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        types = np.zeros((B, T), dtype=np.int64)
        token_labels = "labels" in examples[0] and np.ndim(examples[0]["labels"]) == 1
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64) if token_labels else None
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n], mask[i, :n] = e["input_ids"], 1
            if "token_type_ids" in e:
                types[i, :n] = e["token_type_ids"]
            if token_labels:
                labels[i, :n] = e["labels"]
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        for key in ("start_positions", "end_positions"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        if self.segments:
            batch["token_type_ids"] = torch.from_numpy(types)
        if token_labels:
            batch["labels"] = torch.from_numpy(labels)
        elif "labels" in examples[0]:
            values = [e["labels"] for e in examples]
            dtype = torch.float32 if isinstance(values[0], float) else torch.long
            batch["labels"] = torch.tensor(values, dtype=dtype)
        return batch


def specials(tok: Tokenizer, cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """Ids put before and after a text: [CLS] ... [SEP] for encoders with those tokens, ... </s> for
    encoder-decoders (as T5 and BART end their inputs), none for decoders and prefix-LMs."""
    before, after = ([tok.id_of(role) for role in roles] for roles in cfg.spec.wrap)
    if None in before or None in after:  # the tokenizer lacks a role: the text goes in bare
        return [], []
    return before, after


def outputs(model: Model, batches: list[dict[str, torch.Tensor]], device: torch.device):
    """(batch, model output) for every batch, in eval mode and without gradients; the mode is restored."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                yield batch, model(**batch)
    finally:
        model.train(was)


def batches_of(
    task: Task, rows: list[dict[str, Any]], tok: Tokenizer, cfg: ModelConfig, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Rows collated into batches of `batch_size`, in order (prediction)."""
    data = task.data(rows, pad_id(tok), cfg.type_vocab_size > 0)
    for s in range(0, len(rows), batch_size):
        yield data.collate(rows[s : s + batch_size])


def _csv_records(path: Path, reader: Any) -> Iterator[tuple[int, list[str]]]:
    """(the line it starts on, cells) for each record; malformed quoting is a DataError naming the line."""
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(
                f"{path}:{start}: not valid CSV ({e}); a field holding quotes, commas or line breaks must be "
                'quoted whole, with its quotes doubled ("")'
            ) from None
        yield start, row


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every row of a JSONL file (one object per line) or a TSV / CSV file with
    a header row (by suffix: .csv is comma-separated, anything else tab-separated). Errors name the file
    and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text_lines(read_utf8(path)), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, found {type(record).__name__}")
                rows.append((n, record))
    else:
        delimiter = "," if path.suffix == ".csv" else "\t"
        with io.StringIO(read_utf8(path), newline="") as f:
            # strict: a quote inside a field that is not quoted whole is an error, not silently kept
            quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
            records = _csv_records(path, csv.reader(f, delimiter=delimiter, quoting=quoting, strict=True))
            _, header = next(records, (1, None))
            if header is None:
                raise DataError(f"{path}: the file is empty (expected a header row)")
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise DataError(f"{path}:1: the header names {', '.join(map(repr, twice))} more than once")
            for n, row in records:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}:{n}: {len(row)} columns, but the header has {len(header)} ({', '.join(header)})"
                    )
                rows.append((n, dict(zip(header, row))))
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows
