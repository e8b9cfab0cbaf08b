"""Chat (supervised instruction tuning) for decoders and prefix-LMs: JSONL, one conversation per line,
in OpenAI's format `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`, or
`{"prompt": ..., "completion": ...}` (a user turn and an assistant turn).

Each conversation is rendered by the tokenizer's chat template (lmlab.chat; `--chat-template FILE`
to bring one; a tokenizer without one gets ChatML, its two special tokens and the embeddings to
match) and tokenized as transformers' `apply_chat_template` does. Only the assistant turns carry
labels: their text and the token that ends them, not the role headers and not the system or user
turns. A prefix-LM sees everything before the first assistant turn bidirectionally.

Evaluation: the teacher-forced loss and token accuracy on the assistant tokens, then, for every
evaluation conversation, the model's reply to the context of its last assistant turn (greedy, up to
`--max-target-len` tokens, stopping at the end-of-turn token), scored against that turn with BLEU,
chrF and ROUGE (lmlab.metrics) and written to predictions.jsonl. The saved folder carries the
template in tokenizer_config.json and the stop tokens in generation_config.json, for `lmlab chat`.

A conversation longer than `--max-len` tokens is an error naming its line; with `--truncate` it is
cut at `--max-len` (a conversation left without an assistant token is dropped) and the counts reported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab import chat, metrics
from lmlab.config import ModelConfig
from lmlab.errors import ConfigError, DataError
from lmlab.families import IGNORE_INDEX
from lmlab.model import Model
from lmlab.tasks.base import Setup, Task, TaskData, read_rows
from lmlab.tasks.seq2seq import Seq2SeqData, generate_all, write_jsonl
from lmlab.tokenizer import Tokenizer


def read_conversations(path: str | Path) -> list[tuple[str, list[chat.Message]]]:
    """(file:line, messages) for every line of a chat JSONL file."""
    if Path(path).suffix != ".jsonl":
        raise DataError(
            f"{path}: chat data is JSONL (one conversation per line), not {Path(path).suffix or 'no suffix'}"
        )
    return [(f"{path}:{n}", chat.conversation(record, f"{path}:{n}")) for n, record in read_rows(path)]


def prepare_tokenizer(tok: Tokenizer, template_file: str | None) -> int:
    """Give `tok` the chat template to train with: the file's, else its own, else ChatML with its tokens
    added. Returns how many tokens were added."""
    if template_file:
        path = Path(template_file)
        if not path.is_file():
            raise ConfigError(f"{path}: no such chat template file")
        tok.chat_template = path.read_text(encoding="utf-8")
        return 0
    if tok.chat_template:
        return 0
    tok.chat_template = chat.DEFAULT_TEMPLATE
    return tok.add_special_tokens(list(chat.DEFAULT_TOKENS))


def encode_conversation(tok: Tokenizer, messages: list[chat.Message]) -> dict[str, Any]:
    """input_ids of the rendered conversation; labels: the id where a token starts inside an assistant
    turn, IGNORE_INDEX elsewhere."""
    text, spans = chat.assistant_spans(tok.chat_template, messages, **tok.template_variables())
    enc = tok.backend.encode(text, add_special_tokens=False)
    ids = enc.ids
    labels = [i if any(s <= a < e for s, e in spans) else IGNORE_INDEX for i, (a, _) in zip(ids, enc.offsets)]
    return {"input_ids": ids, "labels": labels}


def encode_all(
    conversations: list[tuple[str, list[chat.Message]]], tok: Tokenizer, max_len: int, prefix: bool, truncate: bool
) -> tuple[list[dict[str, Any]], list[int], dict[str, int]]:
    """Training rows, the indices of the conversations kept, and what --truncate cut or dropped."""
    counts = {"conversations cut": 0, "conversations dropped": 0}
    rows, kept = [], []
    for k, (where, messages) in enumerate(conversations):
        row = encode_conversation(tok, messages)
        n = len(row["input_ids"])
        if n > max_len:
            if not truncate:
                raise DataError(
                    f"{where}: the conversation has {n} tokens; the limit is --max-len {max_len}; "
                    "raise it or give --truncate to cut long conversations"
                )
            row = {key: v[:max_len] for key, v in row.items()}
            counts["conversations cut"] += 1
        labelled = [j for j, y in enumerate(row["labels"]) if y != IGNORE_INDEX]
        if not labelled:
            if not truncate:
                raise DataError(f"{where}: no assistant token survives tokenization")
            counts["conversations dropped"] += 1
            continue
        out = {"input_ids": np.array(row["input_ids"]), "labels": np.array(row["labels"])}
        if prefix:
            out["prefix_lengths"] = labelled[0]
        rows.append(out)
        kept.append(k)
    return rows, kept, counts


def last_assistant(messages: list[chat.Message]) -> int:
    """The index of a conversation's last assistant turn (read_conversations guarantees one)."""
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def reply_prompts(
    conversations: list[tuple[str, list[chat.Message]]], tok: Tokenizer, max_len: int, max_new: int
) -> tuple[list[list[int]], list[int]]:
    """For each conversation, the ids of its context up to its last assistant turn with the generation
    prompt (those that fit with `max_new` new tokens), and their indices."""
    prompts, kept = [], []
    for k, (_, messages) in enumerate(conversations):
        last = last_assistant(messages)
        text = chat.render(tok.chat_template, messages[:last], add_generation_prompt=True, **tok.template_variables())
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) + max_new <= max_len:
            prompts.append(ids)
            kept.append(k)
    return prompts, kept


class Chat(Task):
    name, head = "chat", "lm"
    metric = "loss"
    formats = 'JSONL: {"messages": [...]} (OpenAI) or {"prompt", "completion"}'

    def setup(self, fc: Any, tok: Tokenizer, cfg: ModelConfig) -> Setup:
        added = prepare_tokenizer(tok, fc.chat_template)
        eot = chat.end_of_turn(tok, tok.chat_template)
        stops = list(
            dict.fromkeys([i for i in (tok.eos_id, tok.backend.token_to_id(eot) if eot else None) if i is not None])
        )
        if not stops:
            raise ConfigError(
                "chat needs a token that ends a reply: the tokenizer has no eos token and the template no end-of-turn token"
            )
        prefix = cfg.spec.self_attention == "prefix"
        train = read_conversations(fc.train)
        train_rows, _, cut = encode_all(train, tok, fc.max_len, prefix, fc.truncate)
        evals = read_conversations(fc.eval) if fc.eval else []
        eval_rows, _, eval_cut = encode_all(evals, tok, fc.max_len, prefix, fc.truncate)
        limit = cfg.max_seq_len if cfg.has_absolute_positions else fc.max_len
        prompts, kept = reply_prompts(evals, tok, min(fc.max_len, limit), fc.max_target_len)
        records: list[dict[str, Any]] = []

        def evaluate(model: Model, batches: list[dict[str, torch.Tensor]], device: torch.device, autocast: Any = None):
            from lmlab.train.trainer import evaluate as teacher_forced

            result = teacher_forced(model, batches, device, autocast)
            out = {"loss": result["loss"], "ppl": result["ppl"], "token_accuracy": result["accuracy"]}
            if prompts:
                texts, speed = generate_all(model, tok, prompts, fc.max_target_len, stops, fc.batch_size, 1, device)
                refs = [evals[k][1][last_assistant(evals[k][1])] for k in kept]
                scores = metrics.generation_scores(texts, [m["content"].strip() for m in refs])
                out.update(
                    {k: v for k, v in scores.items() if k in ("bleu", "chrf", "rouge1", "rougeL", "bleu_signature")}
                )
                out.update(speed)
                records[:] = [
                    {"where": evals[k][0], "reference": r["content"], "prediction": t}
                    for k, r, t in zip(kept, refs, texts)
                ]
            return out

        def files(out: Path) -> None:
            generation = {"eos_token_id": stops, "pad_token_id": tok.pad_id if tok.pad_id is not None else stops[0]}
            (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
            if records:
                write_jsonl(out / "predictions.jsonl", records)

        notes = [f"added the chat template's special tokens {', '.join(chat.DEFAULT_TOKENS)}"] if added else []
        notes += [
            f"--truncate: {n} {what} in {name}"
            for name, counts in (("the training file", cut), ("the evaluation file", eval_cut))
            for what, n in counts.items()
            if n
        ]
        if evals and len(kept) < len(evals):
            notes.append(f"{len(evals) - len(kept)} evaluation conversations are too long to generate a reply for")
        info = {"end_of_turn": eot, "stop_ids": stops}
        return Setup(train_rows, eval_rows, None, evaluate, info, notes=notes, files=files)

    def data(self, rows: list[dict[str, Any]], pad_id: int, segments: bool) -> TaskData:
        return Seq2SeqData(rows, pad_id, False)

    def predict(
        self, model: Model, tok: Tokenizer, info: dict[str, Any], data: str, batch_size: int, max_len: int
    ) -> list[dict[str, Any]]:
        """The model's reply to every conversation of the file (its last turn need not be the assistant's:
        the reply follows the whole conversation, or the context of the last assistant turn if it has one)."""
        out = []
        prompts = []
        for n, record in read_rows(data):
            where = f"{data}:{n}"
            if "messages" not in record and isinstance(record.get("prompt"), str):
                record = {"messages": [{"role": "user", "content": record["prompt"]}]}
            messages = chat.check_messages(record.get("messages"), where, need_assistant=False)
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            text = chat.render(tok.chat_template, messages, add_generation_prompt=True, **tok.template_variables())
            prompts.append(tok.encode(text, add_special_tokens=False))
            out.append({"where": where, "messages": messages})
        max_new = info["config"]["max_target_len"]
        texts, _ = generate_all(model, tok, prompts, max_new, info["stop_ids"], batch_size)
        for record, t in zip(out, texts):
            record["reply"] = t
        return out
