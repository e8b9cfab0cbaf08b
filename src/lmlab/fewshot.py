"""Zero- and few-shot multiple choice by log-likelihood, with lm-evaluation-harness's conventions.

A task file is JSONL, one question per line: {"query": "...", "choices": ["...", ...], "gold": i}
(`gold` may also be the text of the right choice). As lm-eval (0.4.x) scores a `multiple_choice` task:

- the request for a choice is (context, continuation) = (prompt, target_delimiter + choice), with the
  delimiter " " by default; the prompt is `shots` solved examples, each `query + delimiter + right
  choice`, joined and followed by the fewshot delimiter "\\n\\n", then the query;
- the pair is encoded jointly: trailing spaces of the context move onto the continuation, the whole
  string is encoded, and the continuation's tokens are what follows the separately encoded context;
  the tokenizer's own special-token template applies (byte-level BPE has none); an empty context
  is the BOS token alone (else the end-of-text token);
- a request longer than the model keeps its last max_seq_len + 1 tokens and feeds all but the last
  (so the context loses its oldest tokens, never the continuation);
- the score of a choice is the summed log-probability of its continuation tokens; `acc` picks the
  best score, `acc_norm` the best score divided by the choice's length in characters (the choice
  alone, without the delimiter).

Every family can be scored: decoders as above; prefix-LMs with the context as their bidirectional
prefix; encoder-decoders trained with span corruption read the context and a first sentinel in the
encoder and the continuation as the span after that sentinel in the decoder (T5's own way of
continuing text); encoders by pseudo-log-likelihood (each continuation token masked in turn, the
rest of the sequence visible, Salazar et al. 2020), which is not comparable to a true likelihood.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.data.corpus import read_utf8, text_lines
from lmlab.errors import ConfigError, DataError

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def read_task(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    items = []
    for n, line in enumerate(text_lines(read_utf8(path)), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object with query, choices, gold")
        missing = [k for k in ("query", "choices", "gold") if k not in row]
        if missing:
            raise DataError(f"{path}:{n}: no {missing[0]!r} (expected query, choices, gold)")
        choices, gold = row["choices"], row["gold"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"{path}:{n}: choices must be a list of at least two strings")
        if isinstance(gold, str):
            if gold not in choices:
                raise DataError(f"{path}:{n}: gold {gold!r} is not one of the choices")
            gold = choices.index(gold)
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(f"{path}:{n}: gold must index the choices, got {row['gold']!r}")
        items.append({"query": str(row["query"]), "choices": [str(c) for c in choices], "gold": gold})
    if not items:
        raise DataError(f"{path}: no questions")
    return items


# ---- requests and their encoding ----------------------------------------------------------------------
def encode_pair(tok: Any, context: str, continuation: str, special: bool = False) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HFLM._encode_pair makes them. An empty context is
    lm-eval's prefix token alone (the BOS token, else the end-of-text token). `special`: encode with
    the tokenizer's own special-token template, as lm-eval's tok_encode does by default (byte-level BPE
    tokenizers have none)."""
    if context == "":
        prefix = next((i for i in (tok.bos_id, tok.eos_id, tok.id_of("sep")) if i is not None), None)
        if prefix is None:
            raise ConfigError(
                "an empty query is scored after the BOS or end-of-text token, and the tokenizer has neither"
            )
        return [prefix], tok.encode(continuation, add_special_tokens=special)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, add_special_tokens=special)
    ctx = tok.encode(context, add_special_tokens=special)
    return ctx, whole[len(ctx) :]


@dataclass
class Window:
    """What the model reads for one request: `inputs` (all but the last token of the last max_len + 1
    of context + continuation) and the continuation tokens it scores."""

    inputs: list[int]
    continuation: list[int]

    @property
    def context_in_inputs(self) -> int:
        return len(self.inputs) - len(self.continuation) + 1


def window(ctx: list[int], cont: list[int], max_len: int) -> Window:
    if not cont:
        raise DataError("a choice is empty after tokenization")
    if len(cont) > max_len:
        raise ConfigError(f"a choice of {len(cont)} tokens does not fit the model (max_seq_len={max_len})")
    return Window((ctx + cont)[-(max_len + 1) :][:-1], cont)


# ---- scoring, per family ---------------------------------------------------------------------------------
@torch.no_grad()
def loglikelihood(model: Any, tok: Any, context: str, continuation: str, seq2seq_form: str = "span") -> float:
    """Summed log P(continuation tokens | context) (pseudo-log-likelihood for encoders). An
    encoder-decoder is asked in the form it was trained with: "span" (T5's span corruption: the
    continuation is the span behind a sentinel) or "prefix" (the prefix-LM objective, prefix-seq2seq:
    the encoder reads the context, the decoder continues it)."""
    cfg = model.config
    spec = cfg.spec
    ctx, cont = encode_pair(tok, context, continuation, special=spec.has_decoder and not spec.seq2seq)
    if not spec.has_decoder:
        return _pseudo_loglikelihood(model, tok, ctx, cont)
    if spec.seq2seq:
        return _seq2seq_loglikelihood(model, tok, ctx, cont, seq2seq_form)
    w = window(ctx, cont, cfg.max_seq_len)
    x = torch.tensor([w.inputs])
    kw = {"prefix_lengths": torch.tensor([w.context_in_inputs])} if cfg.family == "prefix-lm" else {}
    logits = model(input_ids=x, **kw).logits[0, -len(cont) :].float()  # position t predicts token t+1
    return float(F.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum())


def _seq2seq_loglikelihood(model: Any, tok: Any, ctx: list[int], cont: list[int], form: str = "span") -> float:
    cfg = model.config
    if form not in ("span", "prefix"):
        raise ConfigError(f"seq2seq_form {form!r} is unknown; expected span or prefix")
    sentinel = tok.sentinel_ids[:1] if form == "span" else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    room = cfg.max_seq_len - len(sentinel) - len(eos)
    enc = ctx[-room:] + sentinel + eos
    dec_target = sentinel + cont
    if len(dec_target) > cfg.max_seq_len:
        raise ConfigError(f"a choice of {len(cont)} tokens does not fit the decoder (max_seq_len={cfg.max_seq_len})")
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
    dec_in = torch.tensor([[start] + dec_target[:-1]])
    logits = model(input_ids=torch.tensor([enc]), decoder_input_ids=dec_in).logits[0, -len(cont) :].float()
    return float(F.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum())


def _pseudo_loglikelihood(model: Any, tok: Any, ctx: list[int], cont: list[int]) -> float:
    cfg = model.config
    if tok.mask_id is None:
        raise ConfigError("pseudo-log-likelihood needs the tokenizer's mask token")
    start, end = tok.id_of("cls"), tok.id_of("sep")
    head, tail = ([start] if start is not None else []), ([end] if end is not None else [])
    room = cfg.max_seq_len - len(head) - len(tail)
    if len(cont) > room:
        raise ConfigError(f"a choice of {len(cont)} tokens does not fit the model (max_seq_len={cfg.max_seq_len})")
    body = (ctx + cont)[-room:]
    ids = torch.tensor(head + body + tail)
    first = len(head) + len(body) - len(cont)
    positions = torch.arange(first, first + len(cont))
    batch = ids.repeat(len(cont), 1)
    batch[torch.arange(len(cont)), positions] = tok.mask_id
    logits = model(input_ids=batch).logits.float()
    logp = F.log_softmax(logits[torch.arange(len(cont)), positions], -1)
    return float(logp[torch.arange(len(cont)), ids[positions]].sum())


def choice_logprobs(
    model: Any, tok: Any, prompt: str, choices: list[str], delimiter: str = TARGET_DELIMITER, seq2seq_form: str = "span"
) -> list[float]:
    """The score of each choice after `prompt`: loglikelihood(prompt, delimiter + choice)."""
    return [loglikelihood(model, tok, prompt, delimiter + c, seq2seq_form) for c in choices]


def fewshot_prompt(demos: list[dict[str, Any]], query: str, delimiter: str = TARGET_DELIMITER) -> str:
    return "".join(f"{d['query']}{delimiter}{d['choices'][d['gold']]}{FEWSHOT_DELIMITER}" for d in demos) + query


def score_items(
    model: Any,
    tok: Any,
    items: list[dict[str, Any]],
    shots: int = 0,
    seed: int = 0,
    limit: int | None = None,
    delimiter: str = TARGET_DELIMITER,
    seq2seq_form: str = "span",
) -> dict[str, Any]:
    """acc, acc_norm and chance over `items` (the first `limit`), each prompt with `shots` solved
    examples drawn with `seed` from the other items (seq2seq_form: see loglikelihood)."""
    if shots >= len(items):
        raise ConfigError(f"{shots} shots need more than {len(items)} questions")
    rng = random.Random(seed)
    correct: list[int] = []
    correct_norm: list[int] = []
    evaluated = items[:limit] if limit else items
    for i, item in enumerate(evaluated):
        pool = [j for j in range(len(items)) if j != i]
        demos = [items[j] for j in rng.sample(pool, shots)]
        prompt = fewshot_prompt(demos, item["query"], delimiter)
        lps = choice_logprobs(model, tok, prompt, item["choices"], delimiter, seq2seq_form)
        best = max(range(len(lps)), key=lambda k: lps[k])
        best_norm = max(range(len(lps)), key=lambda k: lps[k] / max(len(item["choices"][k]), 1))
        correct.append(int(best == item["gold"]))
        correct_norm.append(int(best_norm == item["gold"]))
    n = len(evaluated)
    return {
        "questions": n,
        "shots": shots,
        "accuracy": sum(correct) / n,
        "accuracy_norm": sum(correct_norm) / n,
        "correct": correct,  # per question, in order: what a paired bootstrap resamples
        "correct_norm": correct_norm,
        "chance": sum(1 / len(it["choices"]) for it in evaluated) / n,
        "method": "pseudo-log-likelihood" if not model.config.spec.has_decoder else "log-likelihood",
    }


def evaluate_task(
    model_dir: str, task_file: str, shots: int = 0, seed: int = 0, limit: int | None = None
) -> dict[str, Any]:
    from lmlab.io import load
    from lmlab.tokenizer import load_tokenizer

    model, tok = load(model_dir).eval(), load_tokenizer(model_dir)
    heads = ("lm",) if model.config.spec.has_decoder else ("mlm",)
    if not any(getattr(model, f"{h}_head") is not None for h in heads):
        raise ConfigError(
            f"multiple-choice scoring needs a model with its {heads[0]} head; {model_dir} has heads {model.config.heads}"
        )
    items = read_task(task_file)
    if shots >= len(items):
        raise ConfigError(f"{shots} shots need more than {len(items)} questions in {task_file}")
    return score_items(model, tok, items, shots, seed, limit)
