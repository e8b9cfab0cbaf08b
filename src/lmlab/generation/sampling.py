"""How the next token is chosen, one definition for `lmlab.generate` and the server.

`SamplingParams` holds every setting of one answer. `next_tokens` chooses a token for every row of a
batch at once, each row under its own settings: the grammar's mask (structured output), the repetition
penalty (CTRL's, over the prompt and the output), presence and frequency penalties (OpenAI's, over the
output), then greedy rows take the argmax and sampled rows are divided by their temperature, cut to
their top-k / top-p / min-p and drawn from their own generator. Rows that share a generator draw in one
call (so a seeded `generate` over a batch draws as it always has); the work is per batch, not per row,
except the grammar masks and the draws of rows with generators of their own.

A new setting is a field here and a line in `next_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError

MIN_TEMPERATURE = 1e-5  # below this a temperature decodes greedily (dividing by it would overflow)


@dataclass
class SamplingParams:
    """How one answer is decoded. temperature under MIN_TEMPERATURE is greedy; top_k None or 0, top_p 1
    and min_p 0 are off; `stop` strings end the text (kept in it with include_stop, as transformers'
    stop_strings keep it; cut before it otherwise, as OpenAI's API does); `stop_ids` end it without
    being part of it; `logprobs` (0-20) alternatives come with each token when not None."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    include_stop: bool = False
    stop_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False  # the prompt's own log-probabilities (OpenAI's echo + logprobs)
    constraint: Any = None  # lmlab.generation.structured.Constraint: the answer held to a grammar

    def __post_init__(self) -> None:
        checks = (
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k is None or self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must lie in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must lie in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The answer's own seeded generator (None: greedy, or sampling from torch's global one)."""
        if self.greedy or self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def filter_logits(
    logits: torch.Tensor,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Set to -inf every logit outside the top k, outside the smallest set whose probability reaches
    top_p, and below min_p times the most likely token's probability. Each setting is one number for
    every row or a (B,) tensor of per-row values (0 / 1 / 0: off for that row)."""
    if isinstance(top_k, torch.Tensor):
        if bool((top_k > 0).any()):
            k = top_k.clamp(min=1, max=logits.shape[-1]).to(logits.device)
            kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
            logits = logits.masked_fill((logits < kth) & (top_k > 0).to(logits.device)[:, None], float("-inf"))
    elif top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    on = (top_p < 1.0) if isinstance(top_p, torch.Tensor) else None
    if (on is not None and bool(on.any())) or (on is None and top_p is not None and top_p < 1.0):
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        limit = top_p[:, None].to(logits.device) if on is not None else top_p
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= limit
        if on is not None:
            drop_sorted &= on.to(logits.device)[:, None]
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if min_p is not None and (bool((min_p > 0).any()) if isinstance(min_p, torch.Tensor) else min_p > 0):
        probs = logits.softmax(-1)
        floor = probs.max(-1, keepdim=True).values * (
            min_p[:, None].to(logits.device) if isinstance(min_p, torch.Tensor) else min_p
        )
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def repetition_penalty_(scores: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL's penalty on every token already seen: positive scores divided by it, negative ones
    multiplied. `seen` is (B, L) token ids (transformers' form: every id of the sequence, padding
    included) or a (B, V) boolean mask; `penalty` one number or (B, 1) per row."""
    if not isinstance(penalty, torch.Tensor) and penalty == 1.0:
        return scores
    if seen.dtype == torch.bool:
        hit = torch.where(scores < 0, scores * penalty, scores / penalty)
        return torch.where(seen, hit, scores)
    picked = scores.gather(1, seen)
    if isinstance(penalty, torch.Tensor):
        penalty = penalty.expand_as(picked)
    return scores.scatter(1, seen, torch.where(picked < 0, picked * penalty, picked / penalty))


def _per_row(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def adjust(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    constrain: bool = True,
) -> torch.Tensor:
    """The scores tokens are chosen from: float32 logits with each row's grammar mask (unless the caller
    applied them: constrain=False) and penalties. `seen`: the repetition penalty's tokens ((B, L) ids or
    a (B, V) mask); `counts`: (B, V) how often each token was generated (presence / frequency)."""
    scores = logits.float()
    if constrain and any(p.constraint is not None for p in params):
        scores = scores.clone()
        for i, p in enumerate(params):
            if p.constraint is not None:
                p.constraint.mask_(scores[i])
    device = scores.device
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        reps = [p.repetition_penalty for p in params]
        penalty = reps[0] if len(set(reps)) == 1 else _per_row(reps, device)[:, None]
        scores = repetition_penalty_(scores, seen, penalty)
    if counts is not None and any(p.presence_penalty or p.frequency_penalty for p in params):
        freq = _per_row([p.frequency_penalty for p in params], device)[:, None]
        pres = _per_row([p.presence_penalty for p in params], device)[:, None]
        counts = counts.to(device=device, dtype=torch.float32)
        scores = scores - freq * counts - pres * (counts > 0).float()
    return scores


def choose(
    scores: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | torch.Generator | None = None,
) -> torch.Tensor:
    """(B,) the next token of every row from its adjusted scores: argmax for greedy rows; for sampled
    rows, temperature, top-k / top-p / min-p, then a draw from the row's generator (rows sharing one
    generator draw together, in row order)."""
    greedy = [p.greedy for p in params]
    best = scores.argmax(-1)
    if all(greedy):
        return best
    B, device = scores.shape[0], scores.device
    temps = [1.0 if g else p.temperature for g, p in zip(greedy, params)]
    same = len({(p.top_k or 0, p.top_p, p.min_p) for p in params}) == 1
    if len(set(temps)) == 1 and same:  # one setting for every row: scalars, as generate always did
        p0 = params[0]
        scaled = scores / temps[0]
        filtered = filter_logits(scaled, p0.top_k, p0.top_p if p0.top_p < 1.0 else None, p0.min_p or None)
    else:
        scaled = scores / _per_row(temps, device)[:, None]
        filtered = filter_logits(
            scaled,
            torch.tensor([p.top_k or 0 for p in params], device=device),
            _per_row([p.top_p for p in params], device),
            _per_row([p.min_p for p in params], device),
        )
    probs = filtered.softmax(-1)
    if not isinstance(generators, Sequence):
        generators = [generators] * B
    drawn = torch.empty_like(best)
    groups: dict[int, tuple[torch.Generator | None, list[int]]] = {}
    for i, (g, gen) in enumerate(zip(greedy, generators)):
        if not g:
            groups.setdefault(id(gen), (gen, []))[1].append(i)
    for gen, rows in groups.values():
        if len(rows) == B:
            drawn = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        else:
            index = torch.tensor(rows, device=device)
            drawn[index] = torch.multinomial(probs[index], 1, generator=gen).squeeze(-1)
    if not any(greedy):
        return drawn
    return torch.where(torch.tensor(greedy, device=device), best, drawn)


def next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) the next token of every row: `adjust`, then `choose`."""
    return choose(adjust(logits, params, seen, counts), params, generators)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top: int = 0
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Each row's log-probability of its token under the raw logits, and its `top` best alternatives."""
    lp = F.log_softmax(logits.float(), -1)
    chosen = lp.gather(1, tokens[:, None]).squeeze(1).tolist()
    if not top:
        return chosen, [[] for _ in chosen]
    best = torch.topk(lp, min(top, lp.shape[-1]), dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
