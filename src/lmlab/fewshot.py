"""Zero- and few-shot evaluation of decoder models by log-likelihood, as lm-evaluation-harness scores
multiple choice.

A task file is JSONL, one question per line: {"query": "...", "choices": ["...", ...], "gold": i}
(`gold` may also be the text of the right choice). Each choice is scored by the summed log-probability
of its tokens given the prompt, which is `shots` solved examples (drawn from the other lines of the
file with a seed, each "query + right choice", separated by a blank line) followed by the query. The
prediction is the best-scoring choice (`accuracy`) or the best per character of the choice
(`accuracy_norm`, lm-evaluation-harness's acc_norm). A prompt too long for the model loses its oldest
tokens, never the choice.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError, DataError


def read_task(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
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
        items.append({"query": row["query"], "choices": [str(c) for c in choices], "gold": gold})
    if not items:
        raise DataError(f"{path}: no questions")
    return items


@torch.no_grad()
def choice_logprobs(model: Any, tok: Any, prompt: str, choices: list[str]) -> list[float]:
    """Summed log P(choice tokens | prompt) for each choice."""
    cfg = model.config
    context = tok.encode(prompt, add_special_tokens=False)
    scores = []
    for choice in choices:
        cont = tok.encode(choice, add_special_tokens=False)
        if not cont:
            raise DataError(f"choice {choice!r} is empty after tokenization")
        ids = (context + cont)[-cfg.max_seq_len :]  # drop the oldest prompt tokens when too long
        if len(ids) <= len(cont):
            raise ConfigError(
                f"a choice of {len(cont)} tokens leaves no room for the prompt (max_seq_len={cfg.max_seq_len})"
            )
        x = torch.tensor([ids])
        logp = F.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)  # position t predicts t+1
        targets = x[0, 1:]
        token_lp = logp.gather(1, targets[:, None])[:, 0]
        scores.append(float(token_lp[-len(cont) :].sum()))
    return scores


def evaluate_task(
    model_dir: str, task_file: str, shots: int = 0, seed: int = 0, limit: int | None = None
) -> dict[str, Any]:
    from lmlab.io import load
    from lmlab.tokenizer import load_tokenizer

    model, tok = load(model_dir).eval(), load_tokenizer(model_dir)
    if model.config.family not in ("decoder", "prefix-lm") or model.lm_head is None:
        raise ConfigError(
            f"few-shot scoring needs a decoder with an lm head; {model_dir} is a {model.config.family} model"
        )
    items = read_task(task_file)
    if shots >= len(items):
        raise ConfigError(f"{shots} shots need more than {len(items)} questions in {task_file}")
    rng = random.Random(seed)
    correct = correct_norm = 0
    evaluated = items[:limit] if limit else items
    for i, item in enumerate(evaluated):
        pool = [j for j in range(len(items)) if j != i]
        demos = [items[j] for j in rng.sample(pool, shots)]
        prompt = "".join(f"{d['query']}{d['choices'][d['gold']]}\n\n" for d in demos) + item["query"]
        lps = choice_logprobs(model, tok, prompt, item["choices"])
        best = max(range(len(lps)), key=lambda k: lps[k])
        best_norm = max(range(len(lps)), key=lambda k: lps[k] / max(len(item["choices"][k]), 1))
        correct += best == item["gold"]
        correct_norm += best_norm == item["gold"]
    n = len(evaluated)
    chance = sum(1 / len(it["choices"]) for it in evaluated) / n
    return {
        "questions": n,
        "shots": shots,
        "accuracy": correct / n,
        "accuracy_norm": correct_norm / n,
        "chance": chance,
    }
