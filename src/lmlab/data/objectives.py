"""Pre-training objectives: each turns a unit of data into one training example.

An objective is indexed by *unit* (a window of a packed stream, or a window of a document), and
every random choice it makes comes from the generator it is handed, which `Batches` seeds from
(seed, epoch, unit). So an example is a pure function of where the run is: resuming reproduces
the data order and the masks exactly, and dynamic masking (RoBERTa) re-draws each epoch while
static masking (BERT) keeps epoch 0's masks.

objective    family            what the model learns
clm          decoder           next token: L = -sum_t log P(x_t | x_<t)
mlm-nsp      encoder (BERT)    15% of tokens masked (80% [MASK] / 10% random / 10% kept) + next-sentence prediction
mlm          encoder (RoBERTa) the same masking, re-drawn every epoch, full-sentence packing, no NSP
span         encoder-decoder   T5 span corruption: noise spans -> sentinels, targets = sentinel + span
infilling    encoder-decoder   BART text infilling: Poisson(3) spans -> one <mask> each, target = original
prefix-lm    prefix-lm         random split: bidirectional prefix, loss on the suffix only
prefix-seq2seq encoder-decoder the same split (T5's "prefix LM" objective): the encoder reads the prefix,
                               the decoder predicts the rest, every token of it
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from lmlab.data.store import TokenStore
from lmlab.errors import ConfigError
from lmlab.families import FAMILIES, IGNORE_INDEX, OBJECTIVES, families_for_objective
from lmlab.tokenizer import Tokenizer


@dataclass
class ObjectiveConfig:
    name: str
    seq_len: int
    mask_prob: float = 0.15  # MLM
    whole_word: bool = False  # MLM: mask whole words
    noise_density: float = 0.15  # T5 span corruption
    mean_span: float = 3.0
    infill_ratio: float = 0.3  # BART text infilling
    poisson_lambda: float = 3.0
    doc_mask: bool = False  # packed documents attend only within themselves (every objective but mlm-nsp)


DOC_MASK_OBJECTIVES = ("clm", "prefix-lm", "mlm", "span", "infilling", "prefix-seq2seq")


def check_objective(name: str, family: str) -> None:
    if name not in OBJECTIVES:
        raise ConfigError(f"objective {name!r} is unknown; expected one of {', '.join(OBJECTIVES)}")
    if name not in FAMILIES[family].objectives:
        raise ConfigError(
            f"objective {name!r} trains {' or '.join(families_for_objective(name))} models, not {family!r}"
        )


def _need(tok: Tokenizer, role: str, objective: str) -> int:
    i = tok.id_of(role)
    if i is None:
        raise ConfigError(f"objective {objective!r} needs a {role} token, and the tokenizer has none")
    return i


def _separator(tok: Tokenizer) -> int | None:
    for role in ("eos", "sep"):
        if tok.id_of(role) is not None:
            return tok.id_of(role)
    return None


# ---- masking ---------------------------------------------------------------------------------------
def mask_tokens(
    ids: np.ndarray,
    candidates: np.ndarray,
    rng: np.random.Generator,
    mask_prob: float,
    mask_id: int,
    random_pool: np.ndarray,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking. candidates: positions that may be masked (never special tokens).

    round(mask_prob * len(candidates)) positions are chosen (at least 1); of them 80% become
    mask_id, 10% a random token from random_pool, 10% stay. With word_start (bool per position),
    whole words are chosen until the budget is met (a word that would overshoot is skipped).
    Returns (inputs, labels) with labels = IGNORE_INDEX except at chosen positions.
    """
    ids = ids.copy()
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    if len(candidates) == 0:
        return ids, labels
    budget = max(1, int(round(mask_prob * len(candidates))))
    if word_start is None:
        chosen = rng.choice(candidates, size=budget, replace=False)
    else:
        starts = [i for i, pos in enumerate(candidates) if word_start[pos] or i == 0]
        words = [candidates[s:e] for s, e in zip(starts, starts[1:] + [len(candidates)])]
        picked: list[np.ndarray] = []
        count = 0
        for w in rng.permutation(len(words)):
            if count >= budget:
                break
            if count + len(words[w]) > budget:
                continue
            picked.append(words[w])
            count += len(words[w])
        chosen = np.concatenate(picked) if picked else candidates[:1]
    labels[chosen] = ids[chosen]
    r = rng.random(len(chosen))
    to_mask, to_random = chosen[r < 0.8], chosen[(r >= 0.8) & (r < 0.9)]
    ids[to_mask] = mask_id
    ids[to_random] = rng.choice(random_pool, size=len(to_random))
    return ids, labels


def random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """n_items split into n_segments positive lengths, uniformly over all such splits."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_segments - 1, replace=False)) if n_segments > 1 else []
    return np.diff(np.concatenate([[0], cuts, [n_items]])).astype(np.int64)


def span_noise_mask(length: int, density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """T5's random_spans_noise_mask: bool (length,), about density*length noise tokens in spans of mean_span."""
    n_noise = min(max(int(round(length * density)), 1), length - 1)
    n_spans = max(int(round(n_noise / mean_span)), 1)
    noise = random_segmentation(n_noise, n_spans, rng)
    keep = random_segmentation(length - n_noise, n_spans, rng)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for k, z in zip(keep, noise):  # alternate kept and noise spans, starting with kept tokens
        pos += k
        mask[pos : pos + z] = True
        pos += z
    return mask


def t5_lengths(inputs_length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(raw tokens per example, target length) so that corrupted inputs fit inputs_length (T5's helper)."""

    def lengths(raw: int) -> tuple[int, int]:
        n_noise = int(round(raw * density))
        n_spans = int(round(n_noise / mean_span))
        return raw - n_noise + n_spans + 1, n_noise + n_spans + 1

    raw = inputs_length - 1
    while lengths(raw + 1)[0] <= inputs_length:
        raw += 1
    return raw, lengths(raw)[1]


# ---- objectives ---------------------------------------------------------------------------------------
class Objective(ABC):
    """Units of one split, and how to turn a unit into an example (a dict of 1-D numpy arrays)."""

    name = ""
    dynamic = True  # re-draw randomness every epoch
    # most positions carry a label: a compiled step (dense vocabulary projection) beats the eager sparse
    # one. Masked LMs label 15-30%: eager projects only those and is faster (docs/benchmarks.md)
    dense_labels = True

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def example(self, unit: int, rng: np.random.Generator) -> dict[str, np.ndarray]: ...

    @property
    @abstractmethod
    def tokens_per_example(self) -> int:
        """Tokens the model processes per example (inputs plus decoder targets), for tokens/s and budgets."""

    def collate(self, examples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}


class _Stream(Objective):
    """Objectives over fixed windows of a packed stream (documents joined with a separator). With
    `separator` given (document masking), an example also carries `document_ids`: the document of every
    token, a separator belonging to the document it ends."""

    def __init__(self, stream: np.ndarray, window: int, separator: int | None = None) -> None:
        if len(stream) < window:
            raise ConfigError(
                f"the split has {len(stream)} tokens, fewer than one example needs ({window}); "
                "use more data or a shorter --seq-len"
            )
        self.stream, self.window, self.separator = stream, window, separator

    def documents(self, ids: np.ndarray) -> np.ndarray:
        """0, 1, ...: each token's document within the window (a new one after every separator)."""
        ends = ids == self.separator
        return np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.stream) // self.window

    def chunk(self, unit: int) -> np.ndarray:
        return np.asarray(self.stream[unit * self.window : (unit + 1) * self.window], dtype=np.int64)

    def example(self, unit: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.example_of(self.chunk(unit), rng)

    @abstractmethod
    def example_of(self, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The example made of one window of `self.window` stream tokens (a streamed corpus calls this too)."""


class CausalLM(_Stream):
    """Windows of the packed stream; with document masking, the first token of a document is not
    predicted from the one before it (the previous document's separator): it has no context."""

    name, dynamic = "clm", False

    def __init__(self, stream: np.ndarray, seq_len: int, separator: int | None = None) -> None:
        super().__init__(stream, seq_len, separator)

    @property
    def tokens_per_example(self) -> int:
        return self.window

    def example_of(self, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.separator is None:
            return {"input_ids": ids, "labels": ids}  # the model shifts: position t predicts token t + 1
        docs = self.documents(ids)
        labels = ids.copy()
        labels[1:][docs[1:] != docs[:-1]] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels, "document_ids": docs}


class PrefixLM(CausalLM):
    """A causal window with a split point drawn uniformly in [1, seq_len - 1]; loss only after it."""

    name, dynamic = "prefix-lm", True

    def example_of(self, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.separator is not None:
            return self._packed(ids, rng)
        split = int(rng.integers(1, len(ids)))
        labels = ids.copy()
        labels[:split] = IGNORE_INDEX  # the prefix is context, not target
        return {"input_ids": ids, "labels": labels, "prefix_lengths": np.array(split, dtype=np.int64)}

    def _packed(self, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Document masking: every document of the window has its own split point and prefix."""
        docs = self.documents(ids)
        labels, prefix = ids.copy(), np.zeros(len(ids), dtype=bool)
        starts = np.flatnonzero(np.concatenate([[True], docs[1:] != docs[:-1]]))
        for start, end in zip(starts, np.append(starts[1:], len(ids))):
            split = start + (int(rng.integers(1, end - start)) if end - start > 1 else 1)
            prefix[start:split] = True
            labels[start:split] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels, "document_ids": docs, "prefix_mask": prefix}


class PrefixSeq2Seq(_Stream):
    """T5's prefix language modelling for an encoder-decoder (Raffel et al., Table 4): a window split at a
    point drawn uniformly in [1, seq_len - 1]; the encoder reads the prefix and </s>, the decoder
    predicts every token after the split. The same task as PrefixLM's, so the two architectures compare
    on one objective (the paper's Table 2)."""

    name, dynamic = "prefix-seq2seq", True

    def __init__(self, stream: np.ndarray, tok: Tokenizer, cfg: ObjectiveConfig) -> None:
        super().__init__(stream, cfg.seq_len, _separator(tok) if cfg.doc_mask else None)
        self.eos, self.pad = _need(tok, "eos", cfg.name), _need(tok, "pad", cfg.name)

    @property
    def tokens_per_example(self) -> int:
        return self.window + 1

    def example_of(self, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.separator is not None:
            return self._packed(ids, rng)
        split = int(rng.integers(1, len(ids)))
        inputs = np.concatenate([ids[:split], [self.eos]])
        return _seq2seq_example(inputs, ids[split:], self.window, self.window, self.pad)

    def _packed(self, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Document masking: each document of the window split on its own; the encoder reads every
        document's prefix (and one </s>), the decoder predicts every document's rest."""
        d = self.documents(ids)
        starts = np.flatnonzero(np.concatenate([[True], d[1:] != d[:-1]]))
        prefix = np.zeros(len(ids), dtype=bool)
        for start, end in zip(starts, np.append(starts[1:], len(ids))):
            prefix[start : start + (int(rng.integers(1, end - start)) if end - start > 1 else 1)] = True
        if prefix.all():  # one-token documents only: the last becomes a target
            prefix[-1] = False
        inputs = np.append(ids[prefix], self.eos)
        docs = (np.append(d[prefix], d[prefix][-1]), d[~prefix])
        return _seq2seq_example(inputs, ids[~prefix], self.window, self.window, self.pad, docs)


class _Masking:
    def _setup_masking(self, tok: Tokenizer, cfg: ObjectiveConfig) -> None:
        self.mask_id = _need(tok, "mask", cfg.name)
        self.mask_prob, self.whole_word = cfg.mask_prob, cfg.whole_word
        specials = np.array(sorted(tok.special_ids))
        self.random_pool = np.setdiff1d(np.arange(tok.vocab_size), specials)
        self.is_special = np.zeros(tok.vocab_size, dtype=bool)
        self.is_special[specials] = True
        self.continuation = tok.continuation_mask().numpy() if cfg.whole_word else None

    def _mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        candidates = np.flatnonzero(~self.is_special[ids])
        word_start = ~self.continuation[ids] if self.continuation is not None else None
        return mask_tokens(ids, candidates, rng, self.mask_prob, self.mask_id, self.random_pool, word_start)


class RobertaMLM(_Stream, _Masking):
    """Full-sentence packing: seq_len - 2 stream tokens between <s> and </s>; masks re-drawn each epoch."""

    name, dense_labels = "mlm", False

    def __init__(self, stream: np.ndarray, tok: Tokenizer, cfg: ObjectiveConfig) -> None:
        super().__init__(stream, cfg.seq_len - 2, _separator(tok) if cfg.doc_mask else None)
        self._setup_masking(tok, cfg)
        self.start = tok.id_of("cls") if tok.id_of("cls") is not None else _need(tok, "bos", cfg.name)
        self.end = tok.id_of("sep") if tok.id_of("sep") is not None else _need(tok, "eos", cfg.name)

    @property
    def tokens_per_example(self) -> int:
        return self.window + 2

    def example_of(self, chunk: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        ids = np.concatenate([[self.start], chunk, [self.end]])
        inputs, labels = self._mask(ids, rng)
        if self.separator is None:
            return {"input_ids": inputs, "labels": labels}
        docs = self.documents(chunk)  # <s> opens the first document, </s> closes the last
        return {"input_ids": inputs, "labels": labels, "document_ids": np.concatenate([docs[:1], docs, docs[-1:]])}


class BertMLMNSP(Objective, _Masking):
    """[CLS] A [SEP] B [SEP] from windows of documents; B is A's continuation half the time (label 0),
    else a span of another document (label 1), as transformers' BertForPreTraining expects. Static masks."""

    name, dynamic, dense_labels = "mlm-nsp", False, False

    def __init__(self, store: TokenStore, docs: np.ndarray, tok: Tokenizer, cfg: ObjectiveConfig) -> None:
        self._setup_masking(tok, cfg)
        self.store, self.docs, self.seq_len = store, docs, cfg.seq_len
        self.cls, self.sep, self.pad = (_need(tok, r, cfg.name) for r in ("cls", "sep", "pad"))
        body = cfg.seq_len - 3
        if body < 2:
            raise ConfigError(f"seq_len={cfg.seq_len} leaves no room for two segments")
        lengths = store.doc_lengths()[docs]
        units_doc, units_start = [], []
        for d, n in zip(docs, lengths):
            for start in range(0, max(int(n), 1), body):
                if n - start >= 1:
                    units_doc.append(d)
                    units_start.append(start)
        if len(docs) < 2 or not units_doc:
            raise ConfigError("next-sentence prediction needs at least 2 non-empty documents in the split")
        self.unit_doc, self.unit_start = np.array(units_doc), np.array(units_start)
        self.body = body

    def __len__(self) -> int:
        return len(self.unit_doc)

    @property
    def tokens_per_example(self) -> int:
        return self.seq_len

    def _random_segment(self, exclude: int, length: int, rng: np.random.Generator) -> np.ndarray:
        d = exclude
        while d == exclude:
            d = int(self.docs[rng.integers(len(self.docs))])
        doc = self.store.doc(d)
        start = int(rng.integers(0, max(len(doc) - length, 0) + 1))
        return np.asarray(doc[start : start + length], dtype=np.int64)

    def example(self, unit: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d, start = int(self.unit_doc[unit]), int(self.unit_start[unit])
        window = np.asarray(self.store.doc(d)[start : start + self.body], dtype=np.int64)
        if len(window) >= 2:
            cut = int(rng.integers(1, len(window)))
            a = window[:cut]
            is_random = bool(rng.random() < 0.5)
            b = self._random_segment(d, len(window) - cut, rng) if is_random else window[cut:]
        else:  # a one-token window has no continuation to offer
            a, is_random = window, True
            b = self._random_segment(d, 1, rng)
        ids = np.concatenate([[self.cls], a, [self.sep], b, [self.sep]])
        types = np.concatenate([np.zeros(len(a) + 2, dtype=np.int64), np.ones(len(b) + 1, dtype=np.int64)])
        inputs, labels = self._mask(ids, rng)
        pad = self.seq_len - len(ids)
        return {
            "input_ids": np.pad(inputs, (0, pad), constant_values=self.pad),
            "attention_mask": np.pad(np.ones(len(ids), dtype=np.int64), (0, pad)),
            "token_type_ids": np.pad(types, (0, pad)),
            "labels": np.pad(labels, (0, pad), constant_values=IGNORE_INDEX),
            "next_sentence_label": np.array(int(is_random), dtype=np.int64),
        }


def _seq2seq_example(
    inputs: np.ndarray,
    targets: np.ndarray,
    seq_len: int,
    target_len: int,
    pad: int,
    docs: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Encoder inputs padded to seq_len (with their mask); decoder labels padded to target_len with
    IGNORE_INDEX. With `docs` (document masking: each input token's and each target token's document),
    also document_ids and decoder_document_ids, the padding in the last document."""
    labels = np.full(target_len, IGNORE_INDEX, dtype=np.int64)
    labels[: len(targets)] = targets[:target_len]
    out = {
        "input_ids": np.pad(inputs, (0, seq_len - len(inputs)), constant_values=pad),
        "attention_mask": np.pad(np.ones(len(inputs), dtype=np.int64), (0, seq_len - len(inputs))),
        "labels": labels,
    }
    if docs is not None:
        source, target = docs[0][:seq_len], docs[1][:target_len]
        out["document_ids"] = np.pad(source, (0, seq_len - len(source)), mode="edge")
        out["decoder_document_ids"] = np.pad(target, (0, target_len - len(target)), mode="edge")
    return out


class SpanCorruption(_Stream):
    """T5: raw windows sized so the corrupted input is exactly seq_len; targets padded to a fixed length."""

    name = "span"

    def __init__(self, stream: np.ndarray, tok: Tokenizer, cfg: ObjectiveConfig) -> None:
        raw, self.target_len = t5_lengths(cfg.seq_len, cfg.noise_density, cfg.mean_span)
        super().__init__(stream, raw, _separator(tok) if cfg.doc_mask else None)
        self.seq_len, self.density, self.mean_span = cfg.seq_len, cfg.noise_density, cfg.mean_span
        self.sentinels = tok.sentinel_ids
        self.eos, self.pad = _need(tok, "eos", cfg.name), _need(tok, "pad", cfg.name)
        n_spans = int(round(int(round(raw * cfg.noise_density)) / cfg.mean_span))
        if len(self.sentinels) < max(n_spans, 1):
            raise ConfigError(
                f"span corruption of {raw} tokens makes {n_spans} spans, but the tokenizer has "
                f"{len(self.sentinels)} sentinel tokens (<extra_id_N>)"
            )

    @property
    def tokens_per_example(self) -> int:
        return self.seq_len + self.target_len

    def example_of(self, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        noise = span_noise_mask(len(ids), self.density, self.mean_span, rng)
        starts = noise & ~np.concatenate([[False], noise[:-1]])
        span_index = np.cumsum(starts) - 1  # which span each noise token belongs to
        sentinels = np.asarray(self.sentinels, dtype=np.int64)
        inputs = np.where(starts, sentinels[np.maximum(span_index, 0)], ids)[~noise | starts]
        # in the targets the roles swap: each kept run becomes the sentinel of the span after it
        nonnoise_starts = ~noise & np.concatenate([[True], noise[:-1]])
        targets = np.where(nonnoise_starts, sentinels[np.maximum(np.cumsum(nonnoise_starts) - 1, 0)], ids)
        targets = targets[noise | nonnoise_starts]
        inputs = np.concatenate([inputs, [self.eos]])
        targets = np.concatenate([targets, [self.eos]])
        docs = None
        if self.separator is not None:  # a token keeps its document; a sentinel is its span's first token's
            d = self.documents(ids)
            source, target = d[~noise | starts], d[noise | nonnoise_starts]
            docs = (np.append(source, d[-1]), np.append(target, d[-1]))
        return _seq2seq_example(inputs, targets, self.seq_len, self.target_len, self.pad, docs)


class TextInfilling(_Stream):
    """BART: spans with Poisson(3) lengths cover infill_ratio of the tokens, each replaced by one <mask>
    (zero-length spans insert one); the decoder reconstructs the original."""

    name = "infilling"

    def __init__(self, stream: np.ndarray, tok: Tokenizer, cfg: ObjectiveConfig) -> None:
        super().__init__(stream, cfg.seq_len - 2, _separator(tok) if cfg.doc_mask else None)
        self.seq_len, self.ratio, self.lam = cfg.seq_len, cfg.infill_ratio, cfg.poisson_lambda
        self.mask_id, self.pad = _need(tok, "mask", cfg.name), _need(tok, "pad", cfg.name)
        self.eos = _need(tok, "eos", cfg.name)
        self.bos = tok.id_of("bos") if tok.id_of("bos") not in (None, self.eos) else tok.id_of("cls")

    @property
    def tokens_per_example(self) -> int:
        return 2 * self.seq_len

    def example_of(self, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n = len(ids)
        budget = int(round(n * self.ratio))
        lengths: list[int] = []
        while sum(lengths) < budget:
            lengths.append(int(rng.poisson(self.lam)))
        if lengths:
            lengths[-1] -= sum(lengths) - budget
        starts = rng.choice(n, size=min(len(lengths), n), replace=False)
        masked = np.zeros(n, dtype=bool)
        insert = np.zeros(n, dtype=bool)
        for s, ln in zip(starts, lengths):
            if ln == 0:
                insert[s] = True
            else:
                masked[s : s + ln] = True
        out: list[int] = []
        where: list[int] = []  # the window position each input token stands for (its document's)
        for i in range(n):
            if insert[i]:
                out.append(self.mask_id)
                where.append(i)
            if masked[i]:
                if i == 0 or not masked[i - 1]:
                    out.append(self.mask_id)
                    where.append(i)
            else:
                out.append(int(ids[i]))
                where.append(i)
        head = [self.bos] if self.bos is not None else []
        inputs = np.array(head + out + [self.eos], dtype=np.int64)[: self.seq_len]
        target = np.array(head + ids.tolist() + [self.eos], dtype=np.int64)
        docs = None
        if self.separator is not None:
            d = self.documents(ids)
            edge = [d[0]] * len(head), [d[-1]]
            docs = (np.array(edge[0] + d[where].tolist() + edge[1]), np.array(edge[0] + d.tolist() + edge[1]))
        return _seq2seq_example(inputs, target, self.seq_len, self.seq_len, self.pad, docs)


def make_objective(
    cfg: ObjectiveConfig, store: TokenStore, docs: np.ndarray, tok: Tokenizer, split_name: str
) -> Objective:
    """The objective `cfg.name` over the documents `docs` of `store`."""
    _check_doc_mask(cfg)
    if cfg.name == "mlm-nsp":
        return BertMLMNSP(store, docs, tok, cfg)
    return _over_stream(cfg, store.stream(docs, separator_of(tok, cfg), split_name), tok)


def stream_objective(cfg: ObjectiveConfig, tok: Tokenizer) -> _Stream:
    """The objective `cfg.name` for a streamed corpus (lmlab.data.streaming), which hands it windows of
    `.window` tokens through `example_of`; its own stream is a placeholder."""
    _check_doc_mask(cfg)
    if cfg.name == "mlm-nsp":
        raise ConfigError(
            "--stream packs a token stream; mlm-nsp pairs segments of whole documents: use the token store "
            "(without --stream), or the mlm objective"
        )
    separator_of(tok, cfg)
    return _over_stream(cfg, np.zeros(8 * cfg.seq_len + 8, dtype=np.int64), tok)  # type: ignore[return-value]


def separator_of(tok: Tokenizer, cfg: ObjectiveConfig) -> int | None:
    """The token between packed documents (eos, else sep)."""
    separator = _separator(tok)
    if cfg.doc_mask and separator is None:
        raise ConfigError("--doc-mask finds documents by their separator: the tokenizer needs an eos or sep token")
    return separator


def _check_doc_mask(cfg: ObjectiveConfig) -> None:
    if cfg.doc_mask and cfg.name not in DOC_MASK_OBJECTIVES:
        raise ConfigError(
            f"--doc-mask: the {cfg.name} objective does not keep documents apart yet (objectives that do: "
            f"{', '.join(DOC_MASK_OBJECTIVES)}); the model itself takes document_ids for every family"
        )


def _over_stream(cfg: ObjectiveConfig, stream: np.ndarray, tok: Tokenizer) -> Objective:
    keep_apart = _separator(tok) if cfg.doc_mask else None
    if cfg.name == "clm":
        return CausalLM(stream, cfg.seq_len, keep_apart)
    if cfg.name == "prefix-lm":
        return PrefixLM(stream, cfg.seq_len, keep_apart)
    if cfg.name == "mlm":
        return RobertaMLM(stream, tok, cfg)
    if cfg.name == "span":
        return SpanCorruption(stream, tok, cfg)
    if cfg.name == "infilling":
        return TextInfilling(stream, tok, cfg)
    if cfg.name == "prefix-seq2seq":
        return PrefixSeq2Seq(stream, tok, cfg)
    raise ConfigError(f"objective {cfg.name!r} is unknown; expected one of {', '.join(OBJECTIVES)}")


class Batches:
    """A resumable, deterministic stream of batches over an objective.

    Epoch e visits every unit once, in the order permutation(seed, e). The randomness of an example
    comes from a generator seeded with (seed, epoch or 0, unit). state_dict() is two integers.
    """

    def __init__(self, objective: Objective, batch_size: int, seed: int, shuffle: bool = True) -> None:
        if len(objective) == 0:
            raise ConfigError("the data yields no examples; use more data or a shorter --seq-len")
        self.objective, self.batch_size, self.seed, self.shuffle = objective, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            n = len(self.objective)
            self._order = (
                np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            )
        return self._order

    def example(self, unit: int, epoch: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch if self.objective.dynamic else 0, unit, 7919])
        return self.objective.example(unit, rng)

    def next_batch(self) -> dict[str, torch.Tensor]:
        examples = []
        while len(examples) < self.batch_size:
            order = self._epoch_order()
            if self.index >= len(order):
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
                continue
            examples.append(self.example(int(order[self.index]), self.epoch))
            self.index += 1
        return self.objective.collate(examples)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None

    def fixed(self, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """The first n_batches of epoch 0 in unit order: the same validation batches every time."""
        units = np.arange(min(len(self.objective), n_batches * self.batch_size))
        out = []
        for s in range(0, len(units), self.batch_size):
            out.append(self.objective.collate([self.example(int(u), 0) for u in units[s : s + self.batch_size]]))
        return out
