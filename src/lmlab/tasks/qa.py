"""Extractive question answering: SQuAD v1.1 / v2.0 JSON. Question and context share a window,
[CLS] question [SEP] context [SEP] (decoders: question then context); long contexts are cut into
windows that overlap by `doc_stride` tokens; an answer outside a window (or none, in v2) points at
position 0. Answers are searched over start / end pairs inside the context with at most
`max_answer_len` tokens, across all windows of a question, and mapped back to characters through the
tokenizer's offsets; with unanswerable questions in training (v2), the empty answer wins when
position 0 scores higher. Metrics: the official exact match and F1."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab import metrics
from lmlab.config import ModelConfig
from lmlab.data.corpus import read_utf8
from lmlab.errors import ConfigError, DataError
from lmlab.model import Model
from lmlab.tasks.base import Setup, Task, batches_of, outputs, specials
from lmlab.tokenizer import Tokenizer


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
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    out = []
    try:
        for article in data["data"]:
            for para in article["paragraphs"]:
                context = para["context"]
                if not isinstance(context, str):
                    raise DataError(f"{path}: a context is {type(context).__name__}, expected text")
                for qa in para["qas"]:
                    if not isinstance(qa["id"], (str, int)) or isinstance(qa["id"], bool):
                        raise DataError(f"{path}: a question id is {type(qa['id']).__name__}, expected text")
                    if not isinstance(qa["question"], str):
                        raise DataError(f"{path}: question {qa['id']}: the question is not text")
                    answers = []
                    for a in qa.get("answers", []):
                        start, text = a["answer_start"], a["text"]
                        if (
                            isinstance(start, bool)
                            or not isinstance(start, int)
                            or start < 0
                            or not isinstance(text, str)
                        ):
                            raise DataError(
                                f"{path}: question {qa['id']}: an answer needs a text and a character offset of 0 "
                                f"or more (answer_start), found {text!r} at {start!r}"
                            )
                        if context[start : start + len(text)] != text:
                            raise DataError(
                                f"{path}: question {qa['id']}: answer {text!r} does not match the "
                                f"context at offset {start} (found {context[start : start + len(text)]!r})"
                            )
                        answers.append((text, start))
                    impossible = bool(qa.get("is_impossible", False)) or not answers
                    out.append(
                        QAExample(str(qa["id"]), qa["question"], context, [] if impossible else answers, impossible)
                    )
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not SQuAD JSON (missing {e})") from None
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def encode_qa(
    examples: list[QAExample], tok: Tokenizer, cfg: ModelConfig, max_len: int, doc_stride: int, with_labels: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Windows (rows for the model) and, per window, its question index and token -> character offsets."""
    head, tail = specials(tok, cfg)
    rows, meta = [], []
    for qi, ex in enumerate(examples):
        q = tok.encode(ex.question, add_special_tokens=False)[: max_len // 2]
        enc = tok.backend.encode(ex.context, add_special_tokens=False)
        ctx_ids, offsets = enc.ids, enc.offsets
        prefix = head + q + tail
        room = max_len - len(prefix) - len(tail)
        if room <= 0:
            raise ConfigError(f"--max-len {max_len} leaves no room for the context after the question")
        step = max(room - doc_stride, 1)
        start = 0
        while True:
            chunk = ctx_ids[start : start + room]
            ids = prefix + chunk + tail
            first = len(prefix)
            row: dict[str, Any] = {
                "input_ids": np.array(ids),
                "token_type_ids": np.array([0] * len(prefix) + [1] * (len(chunk) + len(tail))),
            }
            if with_labels:
                s_pos = e_pos = 0  # no answer in this window: position 0
                for text, char_start in ex.answers[:1]:
                    char_end = char_start + len(text)
                    toks = [
                        i
                        for i in range(start, start + len(chunk))
                        if offsets[i][0] < char_end and offsets[i][1] > char_start
                    ]
                    inside = toks and offsets[toks[0]][0] <= char_start and offsets[toks[-1]][1] >= char_end
                    if inside:
                        s_pos, e_pos = first + toks[0] - start, first + toks[-1] - start
                row["start_positions"], row["end_positions"] = s_pos, e_pos
            rows.append(row)
            meta.append({"example": qi, "first": first, "offsets": offsets[start : start + len(chunk)]})
            if start + room >= len(ctx_ids):
                break
            start += step
    return rows, meta


def best_answers(
    examples: list[QAExample],
    meta: list[dict[str, Any]],
    start_logits: list[torch.Tensor],
    end_logits: list[torch.Tensor],
    max_answer_len: int = 30,
    allow_empty: bool = False,
    n_best: int = 20,
) -> dict[str, str]:
    """The best-scoring span (start + end logit) per question over all its windows."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for m, s, e in zip(meta, start_logits, end_logits):
        qi, first, offsets = m["example"], m["first"], m["offsets"]
        null[qi] = min(null.get(qi, float("inf")), float(s[0] + e[0]))
        n = len(offsets)
        s_ctx, e_ctx = s[first : first + n], e[first : first + n]
        for i in s_ctx.topk(min(n_best, n)).indices.tolist():
            for j in e_ctx.topk(min(n_best, n)).indices.tolist():
                if j < i or j - i + 1 > max_answer_len:
                    continue
                score = float(s_ctx[i] + e_ctx[j])
                if qi not in best or score > best[qi][0]:
                    best[qi] = (score, examples[qi].context[offsets[i][0] : offsets[j][1]])
    out = {}
    for qi, ex in enumerate(examples):
        score, text = best.get(qi, (float("-inf"), ""))
        out[ex.id] = "" if allow_empty and null.get(qi, float("-inf")) > score else text
    return out


def qa_eval(
    examples: list[QAExample], meta: list[dict[str, Any]], allow_empty: bool, max_answer_len: int
) -> Callable[..., dict[str, Any]]:
    def run(
        model: Model, batches: list[dict[str, torch.Tensor]], device: torch.device, autocast: Any = None
    ) -> dict[str, Any]:
        starts, ends, loss, n = [], [], 0.0, 0
        for _, out in outputs(model, batches, device):
            if out.loss is not None:
                loss, n = loss + float(out.loss), n + 1
            starts += list(out.start_logits.float().cpu())
            ends += list(out.end_logits.float().cpu())
        preds = best_answers(examples, meta, starts, ends, max_answer_len, allow_empty)
        golds = {ex.id: [a for a, _ in ex.answers] for ex in examples}
        scores = metrics.squad_scores(preds, golds)
        f1 = [100 * metrics.token_f1(preds.get(q, ""), g) for q, g in golds.items()]
        return {
            "loss": loss / max(n, 1),
            "exact_match": scores["exact_match"],
            "f1": scores["f1"],
            "evidence": metrics.evidence("f1", list(golds), f1),
        }

    return run


class QA(Task):
    name, head = "qa", "span"
    metric = "f1"
    formats = "SQuAD v1.1 / v2.0 JSON"

    def setup(self, fc: Any, tok: Tokenizer, cfg: ModelConfig) -> Setup:
        train_qa = read_squad(fc.train)
        eval_qa = read_squad(fc.eval) if fc.eval else []
        allow_empty = any(ex.impossible for ex in train_qa)  # SQuAD v2: learn to abstain
        eval_rows, eval_meta = encode_qa(eval_qa, tok, cfg, fc.max_len, fc.doc_stride)
        return Setup(
            encode_qa(train_qa, tok, cfg, fc.max_len, fc.doc_stride)[0],
            eval_rows,
            None,
            qa_eval(eval_qa, eval_meta, allow_empty, fc.max_answer_len),
            {"allow_empty": allow_empty},
        )

    def predict(
        self, model: Model, tok: Tokenizer, info: dict[str, Any], data: str, batch_size: int, max_len: int
    ) -> list[dict[str, Any]]:
        return self.predict_examples(model, tok, info, read_squad(data), batch_size, max_len)

    def predict_examples(
        self, model: Model, tok: Tokenizer, info: dict[str, Any], qa: list[QAExample], batch_size: int, max_len: int
    ) -> list[dict[str, Any]]:
        """Answers for question / context pairs already read (what `lmlab serve` answers with)."""
        rows, meta = encode_qa(qa, tok, model.config, max_len, info["config"]["doc_stride"], with_labels=False)
        starts, ends = [], []
        for batch in batches_of(self, rows, tok, model.config, batch_size):
            o = model(**batch)
            starts += list(o.start_logits.float())
            ends += list(o.end_logits.float())
        answers = best_answers(qa, meta, starts, ends, info["config"]["max_answer_len"], info.get("allow_empty", False))
        return [{"id": ex.id, "question": ex.question, "answer": answers[ex.id]} for ex in qa]
