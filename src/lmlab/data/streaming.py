"""A corpus streamed into training (`lmlab pretrain --stream`): read, shuffled, tokenized and packed on
the fly by a worker process while the model trains, with no pass over the corpus first and no copy of
it on disk.

    files -> documents (read_corpus, file order) -> the held-out ones set aside (every k-th)
          -> a seeded shuffle buffer (per epoch) -> tokenized in groups, a separator after each
          -> packed into windows of the objective's length -> a bounded queue -> the objective's example

The worker is a spawned process; the queue holds at most `prefetch` windows, so reading stays a bounded
distance ahead of training. Where the next window starts (epoch, document of the shuffled order, token
offset inside it, windows made so far) is the data position the checkpoint keeps: a resumed run
re-reads, without tokenizing, the documents before it and goes on with the very next window, so its
batches are the uninterrupted run's. Every process of a multi-process run streams the same global
batches and trains on its rows of each, as with the token store.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue as queue_module
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.data.corpus import read_corpus
from lmlab.errors import DataError

SHUFFLE_SEED = 104729


@dataclass
class Position:
    """Where the next window starts."""

    epoch: int = 0
    doc: int = 0  # documents of the epoch's shuffled order before it
    offset: int = 0  # tokens of that document (its separator included) in earlier windows
    window: int = 0  # windows made so far: seeds each example's randomness


@dataclass
class StreamSpec:
    """What the worker needs: plain values, since it is a spawned process."""

    files: list[str]
    doc_sep: str
    field: str
    skip_bad_lines: bool
    tokenizer: str  # a folder or tokenizer.json
    separator: int | None
    window: int
    seed: int
    val_every: int  # every val_every-th document (file order) is held out for validation
    buffer_docs: int = 1000  # the shuffle buffer
    group_docs: int = 64  # documents tokenized together


def held_out(index: int, val_every: int) -> bool:
    return val_every > 0 and index % val_every == 0


def shuffled(docs: Iterator[str], seed: int, epoch: int, buffer: int) -> Iterator[str]:
    """A shuffle buffer: each document leaves at a random slot of `buffer` held ones (seeded by epoch)."""
    rng = np.random.default_rng([seed, epoch, SHUFFLE_SEED])
    held: list[str] = []
    for doc in docs:
        if len(held) < buffer:
            held.append(doc)
            continue
        i = int(rng.integers(len(held)))
        yield held[i]
        held[i] = doc
    for i in rng.permutation(len(held)):
        yield held[int(i)]


def training_documents(spec: StreamSpec, epoch: int) -> Iterator[str]:
    docs = read_corpus(spec.files, spec.doc_sep, spec.field, spec.skip_bad_lines)
    kept = (d for i, d in enumerate(docs) if not held_out(i, spec.val_every))
    return shuffled(kept, spec.seed, epoch, spec.buffer_docs)


def _tokens(tok: Any, texts: list[str], separator: int | None) -> list[np.ndarray]:
    tail = [separator] if separator is not None else []
    return [np.asarray(ids + tail, dtype=np.int64) for ids in tok.encode_many(texts)]


def windows(spec: StreamSpec, start: Position, progress: Any = None) -> Iterator[tuple[np.ndarray, Position]]:
    """Windows of `spec.window` tokens from `start` on, each with the position after it; epochs follow
    one another without end. `progress` (a shared integer) counts the documents read."""
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(spec.tokenizer)
    pos = dataclasses.replace(start)
    parts: list[np.ndarray] = []
    filled = 0
    epoch, skip_docs, skip_tokens = start.epoch, start.doc, start.offset
    while True:
        group: list[tuple[int, str]] = []
        made_any = False

        def flush(group: list[tuple[int, str]], epoch: int) -> Iterator[tuple[np.ndarray, Position]]:
            nonlocal parts, filled
            for (k, _), toks in zip(group, _tokens(tok, [t for _, t in group], spec.separator)):
                o = skip_tokens if (epoch, k) == (start.epoch, start.doc) else 0
                while o < len(toks):
                    take = toks[o : o + spec.window - filled]
                    parts.append(take)
                    filled += len(take)
                    o += len(take)
                    if filled == spec.window:
                        pos.window += 1
                        pos.epoch, pos.doc, pos.offset = (epoch, k + 1, 0) if o == len(toks) else (epoch, k, o)
                        yield np.concatenate(parts), dataclasses.replace(pos)
                        parts, filled = [], 0

        for k, text in enumerate(training_documents(spec, epoch)):
            if progress is not None:
                with progress.get_lock():
                    progress.value += 1
            made_any = True
            if epoch == start.epoch and k < skip_docs:
                continue  # before the start: read again, not tokenized
            group.append((k, text))
            if len(group) == spec.group_docs:
                yield from flush(group, epoch)
                group = []
        if group:
            yield from flush(group, epoch)
        if not made_any:
            raise DataError(f"{', '.join(spec.files)}: no training documents to stream")
        epoch += 1


def validation_windows(spec: StreamSpec, n: int) -> list[np.ndarray]:
    """The first `n` windows packed from the held-out documents (file order): read only as far as needed."""
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(spec.tokenizer)
    docs = (
        d
        for i, d in enumerate(read_corpus(spec.files, spec.doc_sep, spec.field, spec.skip_bad_lines))
        if held_out(i, spec.val_every)
    )
    out: list[np.ndarray] = []
    pending = np.zeros(0, dtype=np.int64)
    for doc in docs:
        pending = np.concatenate([pending, *_tokens(tok, [doc], spec.separator)])
        while len(pending) >= spec.window and len(out) < n:
            out.append(pending[: spec.window])
            pending = pending[spec.window :]
        if len(out) == n:
            break
    return out


def _produce(spec: StreamSpec, start: dict[str, int], out: Any, progress: Any) -> None:
    """The worker: windows into the bounded queue until the consumer stops it."""
    try:
        for ids, pos in windows(spec, Position(**start), progress):
            out.put((ids, dataclasses.asdict(pos)))
    except Exception as e:  # noqa: BLE001  (said to the training process, which raises it)
        out.put(("error", f"{type(e).__name__}: {e}" if not isinstance(e, DataError) else str(e)))


class StreamBatches:
    """Batches of a streamed corpus, with the `Batches` interface the trainer uses (next_batch,
    state_dict, load_state_dict, objective)."""

    def __init__(self, objective: Any, spec: StreamSpec, batch_size: int, seed: int, prefetch: int = 256) -> None:
        self.objective, self.spec, self.batch_size, self.seed, self.prefetch = (
            objective,
            spec,
            batch_size,
            seed,
            prefetch,
        )
        self.position = Position()
        self._worker: Any = None
        self._queue: Any = None
        self.documents_read: Any = None  # a shared count, while a worker runs

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # a fork of a process with torch's thread pools can hang
        self._queue = ctx.Queue(maxsize=self.prefetch)
        self.documents_read = ctx.Value("q", 0)
        self._worker = ctx.Process(
            target=_produce,
            args=(self.spec, dataclasses.asdict(self.position), self._queue, self.documents_read),
            daemon=True,
            name="lmlab-stream",
        )
        self._worker.start()

    def _next_window(self) -> tuple[np.ndarray, dict[str, int]]:
        while True:
            try:
                item = self._queue.get(timeout=5.0)
                break
            except queue_module.Empty:
                if not self._worker.is_alive():
                    raise DataError(f"the streaming worker stopped (exit code {self._worker.exitcode})") from None
        if isinstance(item[0], str):
            self.close()
            raise DataError(item[1])
        return item

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._worker is None:
            self._start()
        examples = []
        for _ in range(self.batch_size):
            ids, after = self._next_window()
            rng = np.random.default_rng([self.seed, 0, self.position.window, 7919])
            examples.append(self.objective.example_of(ids, rng))
            self.position = Position(**after)
        return self.objective.collate(examples)

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.position = Position(**{k: int(v) for k, v in state.items()})

    def fixed(self, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """Validation: the first n_batches of windows from the held-out documents."""
        wins = validation_windows(self.spec, n_batches * self.batch_size)
        if not wins:
            raise DataError("the held-out documents make no validation window; use more data or a shorter --seq-len")
        out = []
        for s in range(0, len(wins), self.batch_size):
            part = wins[s : s + self.batch_size]
            examples = [
                self.objective.example_of(w, np.random.default_rng([self.seed, 0, s + i, 7919]))
                for i, w in enumerate(part)
            ]
            out.append(self.objective.collate(examples))
        return out

    def close(self) -> None:
        if self._worker is not None:
            self._worker.terminate()
            self._worker.join(timeout=5)
            self._queue.close()
            self._worker = self._queue = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


def tokenizer_sample(files: list[Path], doc_sep: str, field: str, skip_bad_lines: bool, limit: int) -> Iterator[str]:
    """The first `limit` documents: what a streamed run trains its tokenizer on (no full pass)."""
    for i, doc in enumerate(read_corpus(files, doc_sep, field, skip_bad_lines)):
        if i >= limit:
            return
        yield doc
