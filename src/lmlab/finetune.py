"""Fine-tuning a pre-trained folder for sequence classification, token classification (NER) or
extractive question answering.

The pre-trained model keeps its backbone; its pre-training heads are replaced by the task's head
(`classify`: encoders pool [CLS] through the pooler, decoders and prefix-LMs take the last real
token, encoder-decoders the decoder's state at the input's final </s> as BART does; `tag` and `span`:
a linear layer on every token state, the encoder's for encoder-decoders), visible in the saved config
(`heads`, `classifier_pooling`). Every family that `lmlab.load` reads can be fine-tuned.
Training runs on the pre-training Trainer (checkpoints, exact resume, progress, metrics.jsonl).

Data:
- classification: TSV / CSV with a header row, or JSONL; one or two text columns and a label
  column (GLUE's files work as they come: `sentence`, `sentence1`/`sentence2`, `question`/`sentence`
  ... are found by name, or name them). Numeric non-integer labels (STS-B) make a regression task.
- NER: CoNLL-style, one token per line with its tag in the last column, a blank line between
  sentences, `-DOCSTART-` lines skipped; BIO or IOBES. A word's tag goes to its first sub-word (past
  a bare "▁" / "Ġ" word-start piece), the other sub-words are ignored by the loss, and predictions
  are read off those same sub-words.
- QA: SQuAD v1.1 / v2.0 JSON. Question and context share a window, [CLS] question [SEP] context
  [SEP] (decoders: question then context); long contexts are cut into windows that overlap by
  `doc_stride` tokens; an answer outside a window (or none, in v2) points at position 0. Answers are
  searched over start / end pairs inside the context with at most `max_answer_len` tokens, across
  all windows of a question, and mapped back to characters through the tokenizer's offsets; with
  unanswerable questions in training (v2), the empty answer wins when position 0 scores higher.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmlab import metrics
from lmlab.config import ModelConfig
from lmlab.data.objectives import Batches
from lmlab.errors import ConfigError, DataError
from lmlab.families import IGNORE_INDEX
from lmlab.model import Model
from lmlab.tokenizer import Tokenizer

TASKS = ("classify", "ner", "qa")
_TEXT_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
                 ("premise", "hypothesis"), ("#1 String", "#2 String"), ("sentence",), ("text",))
_LABEL_COLUMNS = ("label", "Quality", "gold_label", "score")


# ---- reading ------------------------------------------------------------------------------------
@dataclass
class Example:
    texts: list[str] | None = None  # classification: one or two texts
    words: list[str] | None = None  # NER
    label: Any = None  # class name, float, or a tag per word
    where: str = ""  # file:line, for errors


def read_table(path: str | Path, text_columns: list[str] | None = None, label_column: str | None = None,
               need_labels: bool = True) -> tuple[list[Example], list[str], str | None]:
    """Rows of a TSV / CSV (header row) or JSONL file -> examples, with the columns that were used."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    else:
        delimiter = "," if path.suffix == ".csv" else "\t"
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty (expected a header row)")
            for n, row in enumerate(reader, 2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{n}: {len(row)} columns, but the header has {len(header)} "
                                    f"({', '.join(header)})")
                rows.append((n, dict(zip(header, row))))
    if not rows:
        raise DataError(f"{path}: no data rows")
    columns = list(rows[0][1])
    if text_columns is None:
        text_columns = next((list(c) for c in _TEXT_COLUMNS if all(x in columns for x in c)), None)
        if text_columns is None:
            raise DataError(f"{path}: cannot tell which columns hold the text among {', '.join(columns)}; "
                            "name them with --text-columns")
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
        out.append(Example(texts=[str(row[c]) for c in text_columns], label=label, where=f"{path}:{n}"))
    return out, text_columns, label_column


def read_conll(path: str | Path, need_labels: bool = True) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    sentences, words, tags, start = [], [], [], 1
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines() + [""], 1):
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


def is_regression(labels: list[Any]) -> bool:
    try:
        values = [float(v) for v in labels]
    except (TypeError, ValueError):
        return False
    return any(v != int(v) for v in values)


# ---- encoding -----------------------------------------------------------------------------------
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


def _specials(tok: Tokenizer, cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """Ids put before and after a text: [CLS] ... [SEP] for encoders with those tokens, ... </s> for
    encoder-decoders (as T5 and BART end their inputs), none for decoders and prefix-LMs."""
    before, after = ([tok.id_of(role) for role in roles] for roles in cfg.spec.wrap)
    if None in before or None in after:  # the tokenizer lacks a role: the text goes in bare
        return [], []
    return before, after


def encode_classification(examples: list[Example], tok: Tokenizer, cfg: ModelConfig, max_len: int,
                          label_ids: dict[str, int] | None) -> list[dict[str, Any]]:
    head, tail = _specials(tok, cfg)
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
                    raise DataError(f"{ex.where}: label {ex.label!r} is not one of the training labels "
                                    f"({', '.join(label_ids)})")
                row["labels"] = label_ids[str(ex.label)]
            else:  # regression
                row["labels"] = float(ex.label)
        rows.append(row)
    return rows


def encode_tagging(examples: list[Example], tok: Tokenizer, cfg: ModelConfig, max_len: int,
                   label_ids: dict[str, int] | None) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """Rows, and for each sentence the position of every word's first sub-word (-1 when truncated away)."""
    head, tail = _specials(tok, cfg)
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
                raise DataError(f"{ex.where}: tag {tag!r} of word {i + 1} is not one of the training tags "
                                f"({', '.join(label_ids)})")
            labels += [IGNORE_INDEX] * skip + [label_ids[tag] if tag is not None else IGNORE_INDEX] \
                + [IGNORE_INDEX] * (len(pieces) - 1 - skip)
            ids += pieces
        ids += tail
        labels += [IGNORE_INDEX] * len(tail)
        row: dict[str, Any] = {"input_ids": np.array(ids)}
        if ex.label is not None and label_ids is not None:
            row["labels"] = np.array(labels)
        rows.append(row)
        firsts.append(first)
    return rows, firsts


# ---- question answering -------------------------------------------------------------------------
@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, character offset); empty: unanswerable
    impossible: bool = False


def read_squad(path: str | Path) -> list[QAExample]:
    """SQuAD v1.1 / v2.0 JSON; every answer's text must sit at its offset in the context."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    out = []
    try:
        for article in data["data"]:
            for para in article["paragraphs"]:
                context = para["context"]
                for qa in para["qas"]:
                    answers = []
                    for a in qa.get("answers", []):
                        start, text = int(a["answer_start"]), a["text"]
                        if context[start:start + len(text)] != text:
                            raise DataError(f"{path}: question {qa['id']}: answer {text!r} does not match the "
                                            f"context at offset {start} (found {context[start:start + len(text)]!r})")
                        answers.append((text, start))
                    impossible = bool(qa.get("is_impossible", False)) or not answers
                    out.append(QAExample(str(qa["id"]), qa["question"], context, [] if impossible else answers,
                                         impossible))
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not SQuAD JSON (missing {e})") from None
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def encode_qa(examples: list[QAExample], tok: Tokenizer, cfg: ModelConfig, max_len: int, doc_stride: int,
              with_labels: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Windows (rows for the model) and, per window, its question index and token -> character offsets."""
    head, tail = _specials(tok, cfg)
    rows, meta = [], []
    for qi, ex in enumerate(examples):
        q = tok.encode(ex.question, add_special_tokens=False)[:max_len // 2]
        enc = tok.backend.encode(ex.context, add_special_tokens=False)
        ctx_ids, offsets = enc.ids, enc.offsets
        prefix = head + q + tail
        room = max_len - len(prefix) - len(tail)
        if room <= 0:
            raise ConfigError(f"--max-len {max_len} leaves no room for the context after the question")
        step = max(room - doc_stride, 1)
        start = 0
        while True:
            chunk = ctx_ids[start:start + room]
            ids = prefix + chunk + tail
            first = len(prefix)
            row: dict[str, Any] = {"input_ids": np.array(ids),
                                   "token_type_ids": np.array([0] * len(prefix) + [1] * (len(chunk) + len(tail)))}
            if with_labels:
                s_pos = e_pos = 0  # no answer in this window: position 0
                for text, char_start in ex.answers[:1]:
                    char_end = char_start + len(text)
                    toks = [i for i in range(start, start + len(chunk))
                            if offsets[i][0] < char_end and offsets[i][1] > char_start]
                    inside = toks and offsets[toks[0]][0] <= char_start and offsets[toks[-1]][1] >= char_end
                    if inside:
                        s_pos, e_pos = first + toks[0] - start, first + toks[-1] - start
                row["start_positions"], row["end_positions"] = s_pos, e_pos
            rows.append(row)
            meta.append({"example": qi, "first": first, "offsets": offsets[start:start + len(chunk)]})
            if start + room >= len(ctx_ids):
                break
            start += step
    return rows, meta


def best_answers(examples: list[QAExample], meta: list[dict[str, Any]], start_logits: list[torch.Tensor],
                 end_logits: list[torch.Tensor], max_answer_len: int = 30, allow_empty: bool = False,
                 n_best: int = 20) -> dict[str, str]:
    """The best-scoring span (start + end logit) per question over all its windows."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for m, s, e in zip(meta, start_logits, end_logits):
        qi, first, offsets = m["example"], m["first"], m["offsets"]
        null[qi] = min(null.get(qi, float("inf")), float(s[0] + e[0]))
        n = len(offsets)
        s_ctx, e_ctx = s[first:first + n], e[first:first + n]
        for i in s_ctx.topk(min(n_best, n)).indices.tolist():
            for j in e_ctx.topk(min(n_best, n)).indices.tolist():
                if j < i or j - i + 1 > max_answer_len:
                    continue
                score = float(s_ctx[i] + e_ctx[j])
                if qi not in best or score > best[qi][0]:
                    best[qi] = (score, examples[qi].context[offsets[i][0]:offsets[j][1]])
    out = {}
    for qi, ex in enumerate(examples):
        score, text = best.get(qi, (float("-inf"), ""))
        out[ex.id] = "" if allow_empty and null.get(qi, float("-inf")) > score else text
    return out


def qa_eval(examples: list[QAExample], meta: list[dict[str, Any]], allow_empty: bool, max_answer_len: int
            ) -> Callable[..., dict[str, Any]]:
    def run(model: Model, batches: list[dict[str, torch.Tensor]], device: torch.device, autocast: Any = None
            ) -> dict[str, Any]:
        starts, ends, loss, n = [], [], 0.0, 0
        for _, out in _outputs(model, batches, device):
            if out.loss is not None:
                loss, n = loss + float(out.loss), n + 1
            starts += list(out.start_logits.float().cpu())
            ends += list(out.end_logits.float().cpu())
        preds = best_answers(examples, meta, starts, ends, max_answer_len, allow_empty)
        golds = {ex.id: [a for a, _ in ex.answers] for ex in examples}
        scores = metrics.squad_scores(preds, golds)
        return {"loss": loss / max(n, 1), "exact_match": scores["exact_match"], "f1": scores["f1"]}
    return run


# ---- the model ----------------------------------------------------------------------------------
def task_model(base: Model, task: str, labels: list[str] | None, pooling: str | None = None) -> Model:
    """The pre-trained backbone with the task's head in place of the pre-training heads. Classification
    pools [CLS] through the pooler for encoders and the last real token otherwise (for encoder-decoders,
    the decoder's state at the final </s>, as BART does), unless `pooling` ("cls", "mean", "last")
    says otherwise. Encoder-decoders tag and extract spans from their encoder's states; prefix-LMs
    see their whole input bidirectionally (see `Model.forward`)."""
    cfg = base.config
    num_labels = len(labels) if labels else 1
    head = {"classify": "classify", "ner": "tag", "qa": "span"}[task]
    changes: dict[str, Any] = {"heads": (head,), "num_labels": num_labels, "labels": labels}
    if head == "classify":
        how = pooling or cfg.spec.pooling
        # encoders: [CLS] through the (pre-trained) pooler; encoder-decoders: BART's head, dense + tanh
        # on the last state, then the classifier (so a fine-tuned BART exports as BartForSequenceClassification)
        changes["pooler"] = (not cfg.spec.has_decoder and how == "cls") or cfg.spec.seq2seq
        changes["classifier_pooling"] = how
    else:
        changes["pooler"] = False
    model = Model(cfg.replace(**changes))
    own = model.state_dict()
    kept = {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape}
    missing = set(own) - set(kept)
    new_parts = ("classifier.", "tagger.", "span_head.", "pooler.", "head_drop")
    if any(not k.startswith(new_parts) for k in missing):
        bad = sorted(k for k in missing if not k.startswith(new_parts))
        raise ConfigError(f"the pre-trained model lacks backbone weights {bad[:3]}")
    model.load_state_dict(kept, strict=False)
    return model


# ---- evaluation ---------------------------------------------------------------------------------
def _outputs(model: Model, batches: list[dict[str, torch.Tensor]], device: torch.device):
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


def classification_eval(regression: bool) -> Callable[..., dict[str, Any]]:
    def run(model: Model, batches: list[dict[str, torch.Tensor]], device: torch.device, autocast: Any = None
            ) -> dict[str, Any]:
        gold, pred, loss, n = [], [], 0.0, 0
        for batch, out in _outputs(model, batches, device):
            loss += float(out.loss) * len(batch["labels"])
            n += len(batch["labels"])
            gold += batch["labels"].tolist()
            pred += (out.logits.squeeze(-1) if regression else out.logits.argmax(-1)).tolist()
        if regression:
            return {"loss": loss / n, "pearson": metrics.pearson(gold, pred), "spearman": metrics.spearman(gold, pred)}
        return {"loss": loss / n, "accuracy": metrics.accuracy(gold, pred), "macro_f1": metrics.macro_f1(gold, pred),
                "mcc": metrics.matthews_corrcoef(gold, pred)}
    return run


def tagging_eval(tags: list[str]) -> Callable[..., dict[str, Any]]:
    def run(model: Model, batches: list[dict[str, torch.Tensor]], device: torch.device, autocast: Any = None
            ) -> dict[str, Any]:
        gold, pred, loss, n = [], [], 0.0, 0
        for batch, out in _outputs(model, batches, device):
            loss += float(out.loss)
            n += 1
            guess = out.logits.argmax(-1)
            for g_row, p_row in zip(batch["labels"], guess):
                keep = g_row != IGNORE_INDEX  # first sub-words: one per word
                gold.append([tags[i] for i in g_row[keep].tolist()])
                pred.append([tags[i] for i in p_row[keep].tolist()])
        flat_gold, flat_pred = sum(gold, []), sum(pred, [])
        return {"loss": loss / max(n, 1), **metrics.entity_scores(gold, pred),
                "token_accuracy": metrics.accuracy(flat_gold, flat_pred)}
    return run


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    task: str
    model: str
    train: str
    out: str
    eval: str | None = None
    epochs: float = 3.0
    lr: float = 5e-5
    batch_size: int = 16
    max_len: int = 128
    text_columns: list[str] | None = None
    pooling: str | None = None  # classification: cls | mean | last (default: cls for encoders, last for decoders)
    label_column: str | None = None
    doc_stride: int = 32  # QA: tokens shared by neighbouring windows of a long context
    max_answer_len: int = 30  # QA: longest answer, in tokens
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    resume: bool = False
    device: str = "auto"


def finetune(fc: FinetuneConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Fine-tune `fc.model` on `fc.train`; evaluate on `fc.eval`; save model, tokenizer and metrics to `fc.out`."""
    from lmlab.io import load
    from lmlab.tokenizer import load_tokenizer
    from lmlab.train.trainer import TrainConfig, Trainer

    if fc.task not in TASKS:
        raise ConfigError(f"unknown task {fc.task!r}; tasks: {', '.join(TASKS)}")
    base = load(fc.model)
    tok = load_tokenizer(fc.model)
    cfg = base.config
    cfg.check_length(fc.max_len, f"--max-len {fc.max_len}")
    info: dict[str, Any] = {"task": fc.task}
    if fc.task == "classify":
        train_ex, text_cols, label_col = read_table(fc.train, fc.text_columns, fc.label_column)
        raw_labels = [e.label for e in train_ex]
        regression = is_regression(raw_labels)
        labels = None if regression else sorted({str(v) for v in raw_labels})
        label_ids = {} if regression else {v: i for i, v in enumerate(labels)}
        info.update(text_columns=text_cols, label_column=label_col, regression=regression)
        eval_ex = read_table(fc.eval, text_cols, label_col)[0] if fc.eval else []
        train_rows = encode_classification(train_ex, tok, cfg, fc.max_len, label_ids)
        eval_rows = encode_classification(eval_ex, tok, cfg, fc.max_len, label_ids)
        evaluate_fn = classification_eval(regression)
    elif fc.task == "qa":
        train_qa = read_squad(fc.train)
        eval_qa = read_squad(fc.eval) if fc.eval else []
        labels = None
        allow_empty = any(ex.impossible for ex in train_qa)  # SQuAD v2: learn to abstain
        info.update(allow_empty=allow_empty)
        train_rows = encode_qa(train_qa, tok, cfg, fc.max_len, fc.doc_stride)[0]
        eval_rows, eval_meta = encode_qa(eval_qa, tok, cfg, fc.max_len, fc.doc_stride)
        evaluate_fn = qa_eval(eval_qa, eval_meta, allow_empty, fc.max_answer_len)
    else:
        train_ex = read_conll(fc.train)
        labels = sorted({t for e in train_ex for t in e.label})
        label_ids = {v: i for i, v in enumerate(labels)}
        eval_ex = read_conll(fc.eval) if fc.eval else []
        train_rows = encode_tagging(train_ex, tok, cfg, fc.max_len, label_ids)[0]
        eval_rows = encode_tagging(eval_ex, tok, cfg, fc.max_len, label_ids)[0]
        evaluate_fn = tagging_eval(labels)
    torch.manual_seed(fc.seed)  # the new head's initialisation, reproducible from --seed
    model = task_model(base, fc.task, labels, fc.pooling)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    segments = model.config.type_vocab_size > 0
    train = Batches(TaskData(train_rows, pad, segments), fc.batch_size, fc.seed)
    val = Batches(TaskData(eval_rows, pad, segments), fc.batch_size, fc.seed, shuffle=False).fixed(
        math.ceil(len(eval_rows) / fc.batch_size)) if eval_rows else None
    steps = math.ceil(fc.epochs * len(train_rows) / fc.batch_size)
    tc = TrainConfig(max_steps=steps, batch_size=fc.batch_size, lr=fc.lr, warmup_steps=int(fc.warmup_ratio * steps),
                     schedule="linear", min_lr_ratio=0.0, weight_decay=fc.weight_decay, eval_every=max(steps, 1),
                     save_every=max(steps // 2, 1), log_every=max(1, min(50, steps // 20)), seed=fc.seed,
                     device=fc.device)
    out = Path(fc.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(fc.seed)
    trainer = Trainer(model, train, val, tc, out, on_event, evaluate_fn=evaluate_fn)
    resumed = trainer.resume() if fc.resume else False
    summary = trainer.fit()
    model.save_pretrained(out)
    tok.save(out)
    result = {"task": fc.task, "train_examples": len(train_rows), "eval_examples": len(eval_rows),
              "steps": summary["steps"], "minutes": summary["minutes"], "resumed": resumed, "eval": summary["val"],
              "labels": labels}
    (out / "finetune.json").write_text(json.dumps({**info, "config": dataclasses.asdict(fc)}, indent=2) + "\n")
    (out / "eval_results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---- prediction ---------------------------------------------------------------------------------
@torch.no_grad()
def predict(model_dir: str, data: str, batch_size: int = 32, max_len: int | None = None) -> list[dict[str, Any]]:
    """Predictions of a fine-tuned folder on a file of the task's format (labels, if present, are ignored)."""
    from lmlab.io import load
    from lmlab.tokenizer import load_tokenizer

    info_path = Path(model_dir) / "finetune.json"
    if not info_path.is_file():
        raise ConfigError(f"{model_dir}: not a fine-tuned folder (no finetune.json); fine-tune with `lmlab finetune`")
    info = json.loads(info_path.read_text())
    model, tok = load(model_dir), load_tokenizer(model_dir)
    cfg = model.config
    max_len = max_len or info["config"]["max_len"]
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    out: list[dict[str, Any]] = []
    if info["task"] == "qa":
        qa = read_squad(data)
        rows, meta = encode_qa(qa, tok, cfg, max_len, info["config"]["doc_stride"], with_labels=False)
        task = TaskData(rows, pad, cfg.type_vocab_size > 0)
        starts, ends = [], []
        for s in range(0, len(rows), batch_size):
            o = model(**task.collate(rows[s:s + batch_size]))
            starts += list(o.start_logits.float())
            ends += list(o.end_logits.float())
        answers = best_answers(qa, meta, starts, ends, info["config"]["max_answer_len"], info.get("allow_empty", False))
        return [{"id": ex.id, "question": ex.question, "answer": answers[ex.id]} for ex in qa]
    if info["task"] == "classify":
        examples = read_table(data, info["text_columns"], None, need_labels=False)[0]
        rows = encode_classification(examples, tok, cfg, max_len, None)
    else:
        examples = read_conll(data, need_labels=False)
        rows, firsts = encode_tagging(examples, tok, cfg, max_len, None)
    task = TaskData(rows, pad, cfg.type_vocab_size > 0)
    for s in range(0, len(rows), batch_size):
        batch = task.collate(rows[s:s + batch_size])
        logits = model(**batch).logits.float()
        for j in range(len(logits)):
            k = s + j
            if info["task"] == "classify":
                if info.get("regression"):
                    out.append({"text": examples[k].texts, "score": float(logits[j, 0])})
                else:
                    probs = F.softmax(logits[j], -1)
                    out.append({"text": examples[k].texts, "label": cfg.labels[int(probs.argmax())],
                                "probabilities": {lab: round(float(p), 6) for lab, p in zip(cfg.labels, probs)}})
            else:
                guess = logits[j].argmax(-1).tolist()
                tags = [cfg.labels[guess[p]] if p >= 0 else "O" for p in firsts[k]]
                out.append({"tokens": examples[k].words, "tags": tags})
    return out
