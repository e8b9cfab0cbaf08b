"""Sequence to sequence (translation, summarization, any text -> text): JSONL with `source` / `target`
fields (or `--source-field` / `--target-field`), or TSV / CSV with a header naming those columns.

Every generative family learns the same mapping its own way:
  encoder-decoder  the source (after `--source-prefix`, ending in </s>) goes into the encoder; the
                   target + </s> are the decoder's labels (the decoder reads them shifted right);
  decoder          source + separator + target + end token in one sequence; only the target and the
                   end token carry labels;
  prefix-LM        the same sequence, with source + separator as the bidirectional prefix and the
                   target causal after it.
Evaluation reports the teacher-forced loss of the targets, then generates for every source (greedy,
or `--beams N`; batched, left-padded, with the KV cache) and scores the predictions with sacreBLEU
(BLEU and chrF, with signatures), ROUGE-1/2/L/Lsum and exact match (lmlab.metrics), and how fast the
batched generation ran. The predictions go to predictions.jsonl in the output folder.

A source longer than its room (the encoder's `--max-len`; for decoders `--max-len` less the separator
and `--max-target-len`, so that generation always fits) or a target longer than `--max-target-len`
is an error naming the file, line and limit; with `--truncate` it is cut and the count is reported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from lmlab import metrics
from lmlab.config import ModelConfig
from lmlab.errors import ConfigError, DataError
from lmlab.families import IGNORE_INDEX
from lmlab.model import Model
from lmlab.tasks.base import Setup, Task, TaskData, pad_id, read_rows, specials
from lmlab.tokenizer import Tokenizer


@dataclass
class Pair:
    source: str
    target: str | None
    where: str  # file:line, for errors


def read_pairs(path: str | Path, source_field: str = "source", target_field: str = "target", need_target: bool = True):
    """Source / target pairs of a JSONL, TSV or CSV file; a missing field or an empty target is an error
    naming the file and line."""
    out = []
    for n, row in read_rows(path):
        where = f"{path}:{n}"
        fields = [source_field] + ([target_field] if need_target else [])
        for name in fields:
            if name not in row:
                raise DataError(
                    f"{where}: no {name!r} field (found {', '.join(map(repr, row)) or 'none'}); "
                    f"name the fields with --source-field / --target-field"
                )
            if not isinstance(row[name], str):
                raise DataError(f"{where}: the {name!r} field must be a string, found {type(row[name]).__name__}")
        if not row[source_field].strip():
            raise DataError(f"{where}: the source ({source_field!r}) is empty")
        target = row.get(target_field)
        if need_target and not target.strip():
            raise DataError(f"{where}: the target ({target_field!r}) is empty")
        out.append(Pair(row[source_field], target if isinstance(target, str) else None, where))
    return out


@dataclass
class Layout:
    """How a model of one family reads a pair: the ids around the source, the separator between source and
    target (decoders), the end token, and the length limits."""

    seq2seq: bool
    prefix: bool  # prefix-LM: the source side is the bidirectional prefix
    before: list[int]
    after: list[int]
    separator: list[int]
    end: int
    source_room: int
    target_room: int
    source_prefix: str

    @classmethod
    def of(cls, tok: Tokenizer, cfg: ModelConfig, fc: Any) -> Layout:
        spec = cfg.spec
        if not spec.generative:
            raise ConfigError(
                f"seq2seq needs a generative model (decoder, prefix-lm or encoder-decoder); this is a "
                f"{cfg.family} model"
            )
        end = tok.eos_id if tok.eos_id is not None else cfg.eos_token_id
        if end is None:
            raise ConfigError("seq2seq needs an end-of-sequence token: the tokenizer and the model have none")
        if fc.max_target_len < 2:
            raise ConfigError(
                f"--max-target-len must be at least 2 (a token and the end token), got {fc.max_target_len}"
            )
        if spec.seq2seq:
            before, after = specials(tok, cfg)
            room = fc.max_len - len(before) - len(after)
            cfg.check_length(fc.max_target_len, f"--max-target-len {fc.max_target_len}")
            return cls(True, False, before, after, [], end, room, fc.max_target_len, fc.source_prefix)
        separator = tok.encode(fc.separator, add_special_tokens=False) if fc.separator else []
        room = fc.max_len - len(separator) - fc.max_target_len
        if room < 1:
            raise ConfigError(
                f"--max-len {fc.max_len} leaves no room for a source after the separator ({len(separator)} tokens) "
                f"and --max-target-len {fc.max_target_len}"
            )
        prefix = spec.self_attention == "prefix"
        return cls(False, prefix, [], [], separator, end, room, fc.max_target_len, fc.source_prefix)

    def limits(self) -> str:
        if self.seq2seq:
            return f"{self.source_room} source tokens (--max-len less the special tokens)"
        return f"{self.source_room} source tokens (--max-len less the separator and --max-target-len)"

    def source_ids(self, tok: Tokenizer, pair: Pair, truncate: bool, counts: dict[str, int]) -> list[int]:
        ids = tok.encode(self.source_prefix + pair.source, add_special_tokens=False)
        if len(ids) > self.source_room:
            if not truncate:
                raise DataError(
                    f"{pair.where}: the source has {len(ids)} tokens; the limit is {self.limits()}; "
                    "raise --max-len or give --truncate to cut long sources"
                )
            ids, counts["sources"] = ids[: self.source_room], counts["sources"] + 1
        return self.before + ids + self.after + self.separator  # the prompt generation continues

    def target_ids(self, tok: Tokenizer, pair: Pair, truncate: bool, counts: dict[str, int]) -> list[int]:
        ids = tok.encode(pair.target or "", add_special_tokens=False)
        if not ids:
            raise DataError(f"{pair.where}: the target is empty after tokenization")
        if len(ids) + 1 > self.target_room:
            if not truncate:
                raise DataError(
                    f"{pair.where}: the target has {len(ids)} tokens + the end token; the limit is "
                    f"--max-target-len {self.target_room}; raise it or give --truncate"
                )
            ids, counts["targets"] = ids[: self.target_room - 1], counts["targets"] + 1
        return ids + [self.end]

    def row(self, prompt: list[int], target: list[int]) -> dict[str, Any]:
        """One training example: encoder input + decoder labels, or one sequence labelled on the target."""
        if self.seq2seq:
            return {"input_ids": np.array(prompt), "labels": np.array(target)}
        row = {
            "input_ids": np.array(prompt + target),
            "labels": np.array([IGNORE_INDEX] * len(prompt) + target),
        }
        if self.prefix:
            row["prefix_lengths"] = len(prompt)
        return row


def encode_pairs(
    pairs: list[Pair], tok: Tokenizer, layout: Layout, truncate: bool, with_targets: bool = True
) -> tuple[list[dict[str, Any]], list[list[int]], dict[str, int]]:
    """Training rows (with targets), the generation prompts, and how many sources / targets were cut."""
    counts = {"sources": 0, "targets": 0}
    rows, prompts = [], []
    for pair in pairs:
        prompt = layout.source_ids(tok, pair, truncate, counts)
        prompts.append(prompt)
        if with_targets:
            rows.append(layout.row(prompt, layout.target_ids(tok, pair, truncate, counts)))
    return rows, prompts, counts


class Seq2SeqData(TaskData):
    """Right-padded batches; encoder-decoder labels are padded to the longest target, not the input."""

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        B, T = len(examples), max(len(e["input_ids"]) for e in examples)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        L = max(len(e["labels"]) for e in examples)
        labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n], mask[i, :n] = e["input_ids"], 1
            labels[i, : len(e["labels"])] = e["labels"]
        batch = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels),
        }
        if "prefix_lengths" in examples[0]:
            batch["prefix_lengths"] = torch.tensor([e["prefix_lengths"] for e in examples])
        return batch


def generate_all(
    model: Model,
    tok: Tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos: int | list[int],
    batch_size: int,
    beams: int = 1,
    device: torch.device | None = None,
) -> tuple[list[str], dict[str, float]]:
    """Predictions for every prompt, generated in left-padded batches (sorted by length so a batch pads
    little), and the generation's speed: new tokens per second over the whole pass."""
    from lmlab.generate import generate

    device = device or next(model.parameters()).device
    pad = pad_id(tok)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    new_tokens, started = 0, time.perf_counter()
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        T = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[pad] * (T - len(prompts[i])) + prompts[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (T - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk], device=device)
        result = generate(
            model,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            num_beams=beams,
            eos_token_id=eos,
            pad_token_id=pad,
            return_dict_in_generate=True,
        )
        for i, tokens in zip(chunk, result.tokens):
            new_tokens += len(tokens)
            texts[i] = tok.decode(tokens).strip()
    seconds = time.perf_counter() - started
    return texts, {
        "gen_seconds": seconds,
        "gen_tokens": new_tokens,
        "gen_tokens_per_s": new_tokens / max(seconds, 1e-9),
    }


def seq2seq_eval(
    pairs: list[Pair], prompts: list[list[int]], tok: Tokenizer, layout: Layout, batch_size: int, beams: int
) -> tuple[Callable[..., dict[str, Any]], list[dict[str, Any]]]:
    """The evaluation function, and the list it fills with the last evaluation's predictions."""
    from lmlab.train.trainer import evaluate as teacher_forced

    records: list[dict[str, Any]] = []

    def run(
        model: Model, batches: list[dict[str, torch.Tensor]], device: torch.device, autocast: Any = None
    ) -> dict[str, Any]:
        result = teacher_forced(model, batches, device, autocast)
        texts, speed = generate_all(model, tok, prompts, layout.target_room, layout.end, batch_size, beams, device)
        scores = metrics.generation_scores(texts, [p.target for p in pairs])
        records[:] = [
            {"source": p.source, "target": p.target, "prediction": t, "where": p.where} for p, t in zip(pairs, texts)
        ]
        return {
            "loss": result["loss"],
            "ppl": result["ppl"],
            "token_accuracy": result["accuracy"],
            **scores,
            **speed,
            "beams": beams,
            # per pair, by file:line: sentence chrF (a paired bootstrap resamples these; corpus chrF is above)
            "evidence": metrics.evidence(
                "chrf",
                [p.where.rsplit(":", 1)[-1] for p in pairs],
                metrics.sentence_chrf(texts, [p.target for p in pairs]),
            ),
        }

    return run, records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


class Seq2Seq(Task):
    name, head = "seq2seq", "lm"
    metric = "bleu"
    formats = "JSONL (source / target) or TSV / CSV with those columns"

    def setup(self, fc: Any, tok: Tokenizer, cfg: ModelConfig) -> Setup:
        layout = Layout.of(tok, cfg, fc)
        if fc.beams < 1:
            raise ConfigError(f"--beams must be >= 1, got {fc.beams}")
        train = read_pairs(fc.train, fc.source_field, fc.target_field)
        train_rows, _, cut = encode_pairs(train, tok, layout, fc.truncate)
        eval_pairs = read_pairs(fc.eval, fc.source_field, fc.target_field) if fc.eval else []
        eval_rows, prompts, eval_cut = encode_pairs(eval_pairs, tok, layout, fc.truncate)
        evaluate, records = seq2seq_eval(eval_pairs, prompts, tok, layout, fc.batch_size, fc.beams)
        notes = [
            f"--truncate cut {n} {what} of {name}"
            for name, counts in (("the training file", cut), ("the evaluation file", eval_cut))
            for what, n in counts.items()
            if n
        ]

        def files(out: Path) -> None:
            if records:
                write_jsonl(out / "predictions.jsonl", records)

        info = {"layout": "encoder-decoder" if layout.seq2seq else ("prefix-lm" if layout.prefix else "decoder")}
        return Setup(train_rows, eval_rows, None, evaluate, info, notes=notes, files=files)

    def data(self, rows: list[dict[str, Any]], pad_id: int, segments: bool) -> TaskData:
        return Seq2SeqData(rows, pad_id, False)

    def predict(
        self, model: Model, tok: Tokenizer, info: dict[str, Any], data: str, batch_size: int, max_len: int
    ) -> list[dict[str, Any]]:
        fc = SimpleNamespace(**dict(info["config"], max_len=max_len))
        layout = Layout.of(tok, model.config, fc)
        pairs = read_pairs(data, fc.source_field, fc.target_field, need_target=False)
        _, prompts, _ = encode_pairs(pairs, tok, layout, fc.truncate, with_targets=False)
        texts, _ = generate_all(model, tok, prompts, layout.target_room, layout.end, batch_size, fc.beams)
        out = []
        for p, t in zip(pairs, texts):
            record = {"source": p.source, "prediction": t}
            if p.target is not None:
                record["target"] = p.target
            out.append(record)
        return out
