"""A corpus streamed into training (`lmlab pretrain --stream`): read, shuffled, tokenized and packed on
the fly by a worker process while the model trains, with no pass over the corpus first and no copy of
it on disk.

    files -> documents (read_corpus, file order) -> the held-out ones set aside (every k-th)
          -> a seeded shuffle buffer (per epoch) -> tokenized in groups, a separator after each
          -> packed into windows of the objective's length -> a bounded queue -> the objective's example

The workers are spawned processes (`--stream-workers`, one by default): each reads and shuffles the
corpus alike and tokenizes every N-th group of documents; this process packs the groups, in order,
into windows, so the windows do not depend on the number of workers. Each worker's queue holds at most
`prefetch` groups, so reading stays a bounded distance ahead of training. Where the next window starts (epoch, document of the shuffled order, token
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


def tokenized_groups(
    spec: StreamSpec, start: Position, worker: int = 0, workers: int = 1, progress: Any = None
) -> Iterator[tuple]:
    """What worker `worker` of `workers` hands on: ("group", epoch, g, [(k, tokens), ...]) for the groups
    g of `spec.group_docs` documents (of each epoch's shuffled order) with g % workers == worker, in
    order, then ("end", epoch) when the epoch's documents run out; epochs without end. Every worker
    reads and shuffles the whole corpus alike and tokenizes only its groups; documents before `start`
    are read again, not tokenized. `progress` (a shared integer) counts the documents worker 0 read."""
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(spec.tokenizer)
    epoch = start.epoch
    while True:
        group: list[tuple[int, str]] = []
        g, made_any = -1, False
        for k, text in enumerate(training_documents(spec, epoch)):
            made_any = True
            if progress is not None and worker == 0:
                with progress.get_lock():
                    progress.value += 1
            if k // spec.group_docs != g:
                if group:
                    yield (
                        "group",
                        epoch,
                        g,
                        list(zip([k for k, _ in group], _tokens(tok, [t for _, t in group], spec.separator))),
                    )
                group, g = [], k // spec.group_docs
            if g % workers != worker or (epoch == start.epoch and k < start.doc):
                continue  # another worker's, or before the start: read, not tokenized
            group.append((k, text))
        if group:
            yield (
                "group",
                epoch,
                g,
                list(zip([k for k, _ in group], _tokens(tok, [t for _, t in group], spec.separator))),
            )
        if not made_any:
            raise DataError(f"{', '.join(spec.files)}: no training documents to stream")
        yield ("end", epoch)
        epoch += 1


def in_order(take: Any, workers: int, start: Position, group_docs: int) -> Iterator[tuple[int, list]]:
    """(epoch, [(k, tokens), ...]) for every group in order, taken from the workers in turn (`take(w)`:
    worker w's next item)."""
    epoch, g = start.epoch, start.doc // group_docs
    while True:
        item = take(g % workers)
        while item[0] == "end" and item[1] < epoch:  # a worker's end of an epoch already left
            item = take(g % workers)
        if item[0] == "end":  # no group g in this epoch: the next epoch starts with group 0
            epoch, g = epoch + 1, 0
            continue
        _, item_epoch, item_g, docs = item
        if (item_epoch, item_g) != (epoch, g):
            raise DataError(
                f"the streaming workers are out of step (group {item_epoch}/{item_g}, expected {epoch}/{g})"
            )
        if docs:
            yield epoch, docs
        g += 1


def pack(groups: Iterator[tuple[int, list]], window: int, start: Position) -> Iterator[tuple[np.ndarray, Position]]:
    """Windows of `window` tokens from the groups' documents, each with the position after it; the
    document `start` points into keeps only its tokens from `start.offset` on."""
    pos = dataclasses.replace(start)
    parts: list[np.ndarray] = []
    filled = 0
    for epoch, docs in groups:
        for k, toks in docs:
            o = start.offset if (epoch, k) == (start.epoch, start.doc) else 0
            while o < len(toks):
                take = toks[o : o + window - filled]
                parts.append(take)
                filled += len(take)
                o += len(take)
                if filled == window:
                    pos.window += 1
                    pos.epoch, pos.doc, pos.offset = (epoch, k + 1, 0) if o == len(toks) else (epoch, k, o)
                    yield np.concatenate(parts), dataclasses.replace(pos)
                    parts, filled = [], 0


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


def _produce(spec: StreamSpec, start: dict[str, int], out: Any, progress: Any, worker: int, workers: int) -> None:
    """A worker: its tokenized groups into its bounded queue until the consumer stops it."""
    try:
        for item in tokenized_groups(spec, Position(**start), worker, workers, progress):
            out.put(item)
    except Exception as e:  # noqa: BLE001  (said to the training process, which raises it)
        out.put(("error", f"{type(e).__name__}: {e}" if not isinstance(e, DataError) else str(e)))


class StreamBatches:
    """Batches of a streamed corpus, with the `Batches` interface the trainer uses (next_batch,
    state_dict, load_state_dict, fixed, objective). `workers` processes tokenize groups of documents
    in turn; this process packs them, in order, into windows."""

    def __init__(
        self, objective: Any, spec: StreamSpec, batch_size: int, seed: int, prefetch: int = 4, workers: int = 1
    ) -> None:
        if workers < 1:
            raise DataError(f"--stream-workers must be at least 1, got {workers}")
        self.objective, self.spec, self.batch_size, self.seed = objective, spec, batch_size, seed
        self.prefetch, self.workers = prefetch, workers  # prefetch: groups queued per worker
        self.position = Position()
        self._procs: list[Any] = []
        self._queues: list[Any] = []
        self._windows: Iterator[tuple[np.ndarray, Position]] | None = None
        self.documents_read: Any = None  # a shared count, while the workers run

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # a fork of a process with torch's thread pools can hang
        self.documents_read = ctx.Value("q", 0)
        start = dataclasses.asdict(self.position)
        for w in range(self.workers):
            q = ctx.Queue(maxsize=self.prefetch)
            p = ctx.Process(
                target=_produce,
                args=(self.spec, start, q, self.documents_read, w, self.workers),
                daemon=True,
                name=f"lmlab-stream-{w}",
            )
            p.start()
            self._queues.append(q)
            self._procs.append(p)
        groups = in_order(self._take, self.workers, self.position, self.spec.group_docs)
        self._windows = pack(groups, self.spec.window, self.position)

    def _take(self, w: int) -> tuple:
        while True:
            try:
                item = self._queues[w].get(timeout=5.0)
                break
            except queue_module.Empty:
                if not self._procs[w].is_alive():
                    raise DataError(f"streaming worker {w} stopped (exit code {self._procs[w].exitcode})") from None
        if item[0] == "error":
            self.close()
            raise DataError(item[1])
        return item

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._windows is None:
            self._start()
        examples = []
        for _ in range(self.batch_size):
            ids, after = next(self._windows)  # type: ignore[arg-type]
            rng = np.random.default_rng([self.seed, 0, self.position.window, 7919])
            examples.append(self.objective.example_of(ids, rng))
            self.position = after
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
            rngs = [np.random.default_rng([self.seed, 0, s + i, 7919]) for i in range(len(part))]
            out.append(self.objective.collate([self.objective.example_of(w, r) for w, r in zip(part, rngs)]))
        return out

    def close(self) -> None:
        for p in self._procs:
            p.terminate()
        for p, q in zip(self._procs, self._queues):
            p.join(timeout=5)
            q.close()
        self._procs, self._queues, self._windows = [], [], None

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
