"""Text generation with the KV cache, and fill-mask for encoders.

`generate` follows transformers' conventions and argument names: left-padded prompts with an
attention mask; the return value is prompt + new tokens (for encoder-decoders: the decoder sequence,
start token first); finished rows are padded. Decoding strategies:
  greedy                  num_beams=1, do_sample=False
  sampling                do_sample=True with temperature, top_k, top_p (nucleus) and a seed (a
                          temperature under MIN_TEMPERATURE, 1e-5, decodes greedily)
  beam search             num_beams > 1 with length_penalty, early_stopping (True / False / "never")
                          and num_return_sequences (the n best); transformers' algorithm, so the same
                          token ids come out
and for every strategy repetition_penalty (CTRL's: a seen token's logit divided by the penalty when
positive, multiplied when negative), eos_token_id, stop_strings (with a tokenizer; generation stops at
the token that completes one, which stays in the output), max_new_tokens, and a streamer (any object
with transformers' `put(ids)` / `end()`, e.g. `TextStreamer` here or transformers' own).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.generation.sampling import (  # noqa: F401  (filter_logits, repetition_penalty_: lmlab.generate's names too)
    MIN_TEMPERATURE,
    SamplingParams,
    adjust,
    choose,
    filter_logits,
    repetition_penalty_,
)
from lmlab.generation.text import IncrementalText

if TYPE_CHECKING:  # decoding runs on the model's forward interface; the class is only named here
    from lmlab.model import Model


class TextStreamer:
    """Print new text as it is generated (batch 1): `generate(..., streamer=TextStreamer(tokenizer))`.
    The prompt is not printed; text is printed when a token completes it (no half UTF-8 characters)."""

    def __init__(self, tokenizer: Any, file: Any = None) -> None:
        self.tokenizer, self.file = tokenizer, file or sys.stdout
        self.ids: list[int] = []
        self.text = IncrementalText(tokenizer, [])
        self.printed = 0
        self.prompt_seen = False

    def put(self, ids: torch.Tensor) -> None:
        if ids.dim() > 1 and ids.shape[0] > 1:
            raise ConfigError("TextStreamer streams one sequence; generate a batch without a streamer")
        if not self.prompt_seen:  # transformers' protocol: the prompt comes first
            self.prompt_seen = True
            return
        for i in ids.reshape(-1).tolist():
            self.ids.append(int(i))
            self.text.add(int(i))  # each id decoded once; a half character waits for the next
        text = self.text.text
        if text.endswith("\ufffd"):  # (a tokenizer decoded whole each time) an incomplete character
            return
        print(text[self.printed :], end="", flush=True, file=self.file)
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids)
        print(text[self.printed :], file=self.file, flush=True)


class _Decoder:
    """One interface over the two ways a model continues a sequence: a decoder-only model with its
    cache, or an encoder-decoder whose encoder runs once. `start` runs the prompt, `step` feeds one new
    token per row, `reorder` keeps rows (beam search)."""

    def __init__(
        self, model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
    ) -> None:
        self.model, self.cfg = model, model.config
        self.seq2seq = self.cfg.spec.seq2seq
        # a mask of all ones is no mask: attention then takes its fast paths
        self.mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        B, T = input_ids.shape
        if self.seq2seq:
            self.start_ids = torch.full(
                (B, 1), self.cfg.decoder_start_token_id, dtype=torch.long, device=input_ids.device
            )
        else:
            self.cfg.check_length(T + max_new_tokens, f"a prompt of {T} tokens + {max_new_tokens} new tokens")

    def start(self, input_ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.seq2seq:
            out = m(input_ids, attention_mask=self.mask, decoder_input_ids=self.start_ids, use_cache=True)
            self.memory, self.cache = out.encoder_last_hidden_state, out.past_key_values
            return out.logits[:, -1]
        T = input_ids.shape[1]
        if self.mask is None:
            positions = torch.arange(T, device=input_ids.device).expand(input_ids.shape[0], -1)
        else:  # left padding: count real tokens only
            positions = (self.mask.long().cumsum(-1) - 1).clamp(min=0)
        extra = (
            {"prefix_lengths": torch.full((input_ids.shape[0],), T, device=input_ids.device)}
            if self.cfg.spec.self_attention == "prefix"
            else {}
        )
        out = m(input_ids, attention_mask=self.mask, position_ids=positions, use_cache=True, **extra)
        self.cache, self.next_pos = out.past_key_values, positions[:, -1:] + 1
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.seq2seq:
            return m(
                attention_mask=self.mask,
                decoder_input_ids=tokens[:, None],
                encoder_outputs=self.memory,
                past_key_values=self.cache,
            ).logits[:, -1]
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = m(
            tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos, past_key_values=self.cache
        ).logits[:, -1]
        self.next_pos = self.next_pos + 1
        return logits

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed (B, n) tokens after the cache in one forward: (B, n, V) logits, the cache n longer.
        Decoder and prefix-LM (the prefix is in the cache already: the new tokens see it and each other
        causally)."""
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], tokens.shape[1])], dim=1)
        positions = self.next_pos + torch.arange(tokens.shape[1], device=tokens.device)
        logits = self.model(tokens, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache).logits
        self.next_pos = positions[:, -1:] + 1
        return logits

    def crop(self, keep: int) -> None:
        """Forget the last positions the cache holds beyond `keep` (a rejected draft)."""
        drop = self.cache.seen - keep
        if drop > 0:
            self.cache.crop(keep)
            self.next_pos = self.next_pos - drop
            if self.mask is not None:
                self.mask = self.mask[:, :keep]

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)
        if self.seq2seq:
            self.memory = self.memory.index_select(0, index)
        else:
            self.next_pos = self.next_pos.index_select(0, index)


def _eos_list(eos: int | list[int] | None) -> list[int]:
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


@dataclass
class GenerateResult:
    """What `generate(..., return_dict_in_generate=True)` returns.

    sequences: prompt + new ids, exactly what plain `generate` returns; per sequence, `tokens` are the new
    ids up to and including the one that finished it (padding after it dropped), `finish_reasons` say
    why it ended ("eos", "stop" for a stop string, "length" for max_new_tokens), and with
    `output_logprobs=True` (greedy and sampling) `logprobs` holds the model's log-probability of each
    chosen token, from its raw logits (before temperature, top-k / top-p and repetition penalty)."""

    sequences: torch.Tensor
    tokens: list[list[int]]
    finish_reasons: list[str]
    logprobs: list[list[float]] | None = None
    prompt_length: int = 0  # columns of `sequences` before the new tokens (the decoder start for seq2seq)


@dataclass
class _Run:
    dec: _Decoder
    logits: torch.Tensor  # (rows, V) next-token logits after the prompt
    seq: torch.Tensor  # (rows, L0) what the new tokens are appended to
    eos: list[int]
    pad: int
    stops: list[str]
    tokenizer: Any


def _prepare(
    model: Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    do_sample: bool,
    num_beams: int,
    temperature: float,
    num_return_sequences: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None,
    stop_strings: str | list[str] | None,
    tokenizer: Any,
    streaming: bool,
) -> _Run:
    """Check the request, copy prompts for beams / samples, and run the prompt through the model."""
    cfg = model.config
    if not cfg.has_decoder or model.lm_head is None:
        raise ConfigError(
            f"generate needs a model with an lm head (decoder, prefix-lm or encoder-decoder); this is "
            f"a {cfg.family} model with heads {cfg.heads}"
        )
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1 or num_return_sequences < 1:
        raise ConfigError("num_beams and num_return_sequences must be >= 1")
    if num_beams > 1 and do_sample:
        raise ConfigError("beam search with sampling is not supported: use num_beams > 1 or do_sample, not both")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ConfigError(f"num_return_sequences={num_return_sequences} must be <= num_beams={num_beams}")
    if num_beams == 1 and num_return_sequences > 1 and not do_sample:
        raise ConfigError("greedy decoding returns one sequence per prompt: sample or use beams for more")
    if streaming and (num_beams > 1 or input_ids.shape[0] * num_return_sequences > 1):
        raise ConfigError("streaming works for one sequence with greedy decoding or sampling")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature} (use do_sample=False for greedy)")
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    if stops and tokenizer is None:
        raise ConfigError("stop_strings need the tokenizer (generate(..., tokenizer=tok))")
    eos = _eos_list(cfg.eos_token_id if eos_token_id is None else eos_token_id)
    pad = (
        pad_token_id
        if pad_token_id is not None
        else (cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
    )
    copies = num_beams if num_beams > 1 else num_return_sequences
    if copies > 1:  # every beam / returned sample starts from its own copy of the prompt
        input_ids = input_ids.repeat_interleave(copies, dim=0)
        attention_mask = attention_mask.repeat_interleave(copies, dim=0) if attention_mask is not None else None
    dec = _Decoder(model, input_ids, attention_mask, max_new_tokens)
    seq = dec.start_ids if dec.seq2seq else input_ids
    return _Run(dec, dec.start(input_ids), seq, eos, pad, stops, tokenizer)


@torch.no_grad()
def generate(
    model: Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    num_beams: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | list[str] | None = None,
    tokenizer: Any = None,
    streamer: Any = None,
    seed: int | None = None,
    return_dict_in_generate: bool = False,
    output_logprobs: bool = False,
    prompt_lookup_num_tokens: int | None = None,
    assistant_model: Model | None = None,
    num_assistant_tokens: int = 5,
) -> torch.Tensor | GenerateResult:
    """Prompt + new token ids, (B * num_return_sequences, L); see the module docstring. With
    `return_dict_in_generate`, a GenerateResult (finish reasons, and per-token log-probabilities
    with `output_logprobs`). Speculative greedy decoding of one sequence (transformers' names): drafts
    of up to `prompt_lookup_num_tokens` tokens copied from the text so far, or `num_assistant_tokens`
    from a smaller `assistant_model` with the same vocabulary; the output is greedy decoding's
    (`_speculative_steps`)."""
    if output_logprobs and num_beams > 1:
        raise ConfigError("output_logprobs is offered for greedy decoding and sampling, not beam search")
    drafter = drafter_for(
        model,
        input_ids,
        max_new_tokens,
        do_sample,
        num_beams,
        repetition_penalty,
        prompt_lookup_num_tokens,
        assistant_model,
        num_assistant_tokens,
    )
    was_training = model.training
    model.eval()
    try:
        run = _prepare(
            model,
            input_ids,
            attention_mask,
            max_new_tokens,
            do_sample,
            num_beams,
            temperature,
            num_return_sequences,
            eos_token_id,
            pad_token_id,
            stop_strings,
            tokenizer,
            streamer is not None,
        )
        start = run.seq.shape[1]
        logprobs = None
        if num_beams > 1:
            seq = _beam_search(
                run.dec,
                run.logits,
                run.seq,
                num_beams,
                max_new_tokens,
                repetition_penalty,
                length_penalty,
                early_stopping,
                num_return_sequences,
                run.eos,
                run.pad,
                run.stops,
                run.tokenizer,
            )
        else:
            seq, steps = run.seq, []
            if streamer is not None:
                streamer.put(seq.cpu())
            sampling = sampling_params(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed)
            for nxt, lp in _steps(run, sampling, output_logprobs, drafter):
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                steps.append(lp)
                if streamer is not None:
                    streamer.put(nxt.cpu())
            if streamer is not None:
                streamer.end()
            if output_logprobs:
                logprobs = torch.stack(steps, dim=1).tolist()
        if not return_dict_in_generate:
            return seq
        tokens, reasons = finish(seq[:, start:], run.eos, run.stops, run.tokenizer)
        if logprobs is not None:
            logprobs = [row[: len(t)] for row, t in zip(logprobs, tokens)]
        return GenerateResult(seq, tokens, reasons, logprobs, start)
    finally:
        model.train(was_training)


def finish(new: torch.Tensor, eos: list[int], stops: list[str], tokenizer: Any) -> tuple[list[list[int]], list[str]]:
    """Per row of new ids: the ids up to and including the one that ended it, and why it ended: "eos"
    (an end-of-sequence id), "stop" (the text reached a stop string) or "length"."""
    tokens, reasons = [], []
    for row in new.tolist():
        cut, reason = len(row), "length"
        for i, t in enumerate(row):
            if t in eos:
                cut, reason = i + 1, "eos"
                break
        if stops:  # the first prefix whose text holds a stop string (generation stopped on that token)
            text = IncrementalText(tokenizer, stops)
            for i in range(cut):
                if text.add(row[i]):
                    cut, reason = i + 1, "stop"
                    break
        tokens.append(row[:cut])
        reasons.append(reason)
    return tokens, reasons


def _stopped_by_string(
    seq: torch.Tensor, start: int, stops: list[str], tokenizer: Any, rows: torch.Tensor
) -> torch.Tensor:
    """Rows (among `rows`) whose generated text now contains a stop string (beam search: its rows are
    reordered every step, so each is decoded whole; greedy and sampling use IncrementalText)."""
    hit = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    for r in rows.nonzero().flatten().tolist():
        text = tokenizer.decode(seq[r, start:].tolist())
        hit[r] = any(s in text for s in stops)
    return hit


def sampling_params(
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    seed: int | None,
) -> SamplingParams:
    """generate's (transformers') decoding arguments as the core's SamplingParams (greedy: temperature 0)."""
    return SamplingParams(
        max_tokens=max_new_tokens,
        temperature=temperature if do_sample else 0.0,
        top_k=top_k,
        top_p=1.0 if top_p is None else top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )


def _sample_steps(
    run: _Run, sampling: SamplingParams, want_logprobs: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Greedy or sampled decoding, one step at a time: yields each step's new ids (rows,) (padding for
    rows already finished) and, when wanted, their log-probabilities under the raw logits. Every row
    draws from one generator seeded with `sampling.seed`."""
    dec, logits, seq, stops = run.dec, run.logits, run.seq, run.stops
    device = seq.device
    generator = sampling.generator(device)
    max_new_tokens = sampling.max_tokens
    params = [sampling] * seq.shape[0]
    eos_t = torch.tensor(run.eos, device=device)
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=device)
    texts = [IncrementalText(run.tokenizer, stops) for _ in range(seq.shape[0])] if stops else []
    finished = 0  # rows done so far
    for i in range(max_new_tokens):
        raw = logits.float()
        nxt = choose(adjust(raw, params, seq), params, generator)
        if finished:  # rows already done get padding
            nxt = torch.where(done, torch.full_like(nxt, run.pad), nxt)
        lp = F.log_softmax(raw, -1).gather(1, nxt[:, None]).squeeze(1) if want_logprobs else None
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if len(run.eos):
            done |= torch.isin(nxt, eos_t)
        if stops:
            for r in (~done).nonzero().flatten().tolist():
                if texts[r].add(int(nxt[r])):
                    done[r] = True
        yield nxt, lp
        finished = int(done.sum())
        if finished == len(done) or i == max_new_tokens - 1:
            break
        logits = dec.step(nxt)


def _steps(
    run: _Run, sampling: SamplingParams, want_logprobs: bool, drafter: Any = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The new ids of greedy / sampled decoding, step by step, as `generate` and `stream` take them
    (speculatively, with drafts verified by the model, when a drafter is given)."""
    if drafter is not None:
        return _speculative_steps(run, sampling.max_tokens, drafter, want_logprobs)
    return _sample_steps(run, sampling, want_logprobs)


def find_draft(ids: list[int], n: int, max_ngram: int = 3) -> list[int]:
    """Prompt lookup (Saxena, 2023; transformers' prompt_lookup_num_tokens): the up to `n` tokens that
    followed the most recent earlier occurrence of the sequence's last `max_ngram` tokens (then of
    shorter n-grams), or [] when none recurs."""
    for size in range(min(max_ngram, len(ids) - 1), 0, -1):
        tail = ids[-size:]
        for start in range(len(ids) - size - 1, -1, -1):
            if ids[start : start + size] == tail:
                return ids[start + size : start + size + n]
    return []


class LookupDrafter:
    """Drafts copied from the sequence itself (`find_draft`): no model, no state."""

    def __init__(self, n: int) -> None:
        self.n = n

    def propose(self, ids: list[int], most: int) -> list[int]:
        return find_draft(ids, min(self.n, most))

    def keep(self, length: int) -> None:
        pass


class ModelDrafter:
    """Drafts from a smaller model with the same vocabulary (transformers' `assistant_model`): its own
    KV cache follows the sequence; each proposal feeds what the cache lacks, then decodes `n` tokens
    greedily; `keep` forgets what the verification rejected."""

    def __init__(self, model: Model, n: int) -> None:
        self.model, self.n, self.dec, self.cached = model, n, None, 0

    def propose(self, ids: list[int], most: int) -> list[int]:
        k = min(self.n, most)
        device = next(self.model.parameters()).device
        if self.dec is None:
            prompt = torch.tensor([ids], device=device)
            self.dec = _Decoder(self.model, prompt, None, 1)
            logits = self.dec.start(prompt)
        else:
            logits = self.dec.extend(torch.tensor([ids[self.cached :]], device=device))[:, -1]
        self.cached = len(ids)
        draft = [int(logits.argmax(-1))]
        for _ in range(k - 1):
            logits = self.dec.step(torch.tensor([draft[-1]], device=device))
            self.cached += 1
            draft.append(int(logits.argmax(-1)))
        return draft

    def keep(self, length: int) -> None:
        if self.dec is not None and length < self.cached:
            self.dec.crop(length)
            self.cached = length


def drafter_for(
    model: Model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    do_sample: bool,
    num_beams: int,
    repetition_penalty: float,
    prompt_lookup_num_tokens: int | None,
    assistant_model: Model | None,
    num_assistant_tokens: int,
) -> LookupDrafter | ModelDrafter | None:
    """The drafter speculative decoding asked for (None for plain decoding), after checking the request."""
    if prompt_lookup_num_tokens is None and assistant_model is None:
        return None
    if prompt_lookup_num_tokens is not None and assistant_model is not None:
        raise ConfigError("choose prompt_lookup_num_tokens or assistant_model, not both")
    n = prompt_lookup_num_tokens if assistant_model is None else num_assistant_tokens
    if n < 1:
        raise ConfigError(f"a draft needs at least 1 token, got {n}")
    if do_sample or num_beams > 1 or repetition_penalty != 1.0:
        raise ConfigError("speculative decoding here is greedy: no sampling, beams or repetition penalty")
    if input_ids.shape[0] != 1:
        raise ConfigError(f"speculative decoding takes one sequence; got a batch of {input_ids.shape[0]}")
    if model.config.spec.seq2seq:
        raise ConfigError("speculative decoding is written for decoders and prefix-LMs, not encoder-decoders")
    if assistant_model is None:
        return LookupDrafter(n)
    a = assistant_model.config
    if not a.has_decoder or a.spec.seq2seq or assistant_model.lm_head is None:
        raise ConfigError(f"the draft model must be a decoder or prefix-LM with an lm head; it is a {a.family} model")
    if a.vocab_size != model.config.vocab_size:
        raise ConfigError(
            f"the draft model's vocabulary ({a.vocab_size}) differs from the model's ({model.config.vocab_size}): "
            "drafts must be the same tokenizer's ids"
        )
    a.check_length(input_ids.shape[1] + max_new_tokens, "the draft model: prompt + new tokens")
    assistant_model.eval()
    return ModelDrafter(assistant_model, n)


def _speculative_steps(
    run: _Run, max_new_tokens: int, drafter: LookupDrafter | ModelDrafter, want_logprobs: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Greedy decoding of one sequence with drafts (copied from its own text, or a draft model's): the
    draft goes through the model in one forward behind the current token; the tokens up to the first
    one greedy would not have chosen are kept, and the model's own choice after them comes for free.
    The output is greedy decoding's (each kept token is the argmax of the model's logits at its
    position); the cost per accepted token falls with the draft's hit rate. Yields like `_sample_steps`."""
    dec, seq, stops = run.dec, run.seq, run.stops
    ids = seq[0].tolist()
    text = IncrementalText(run.tokenizer, stops) if stops else None
    raw = run.logits.float()  # (1, V): the logits of the token about to be chosen
    made = 0
    while True:
        nxt = raw.argmax(-1)
        lp = F.log_softmax(raw, -1).gather(1, nxt[:, None]).squeeze(1) if want_logprobs else None
        ids.append(int(nxt))
        made += 1
        yield nxt, lp
        if int(nxt) in run.eos or made == max_new_tokens:
            return
        if text is not None and text.add(int(nxt)):
            return
        draft = drafter.propose(ids, max_new_tokens - made)
        if not draft:
            raw = dec.step(nxt).float()
            continue
        seen = dec.cache.seen
        logits = dec.extend(torch.tensor([[int(nxt), *draft]], device=nxt.device))[0].float()  # (1 + k, V)
        chosen = logits.argmax(-1).tolist()
        kept = 0
        while kept < len(draft) and chosen[kept] == draft[kept]:
            kept += 1
        dec.crop(seen + 1 + kept)  # the current token and the accepted draft stay in the cache
        drafter.keep(len(ids) + kept)
        for j in range(kept):  # accepted draft tokens: each is the argmax at its position
            tok = torch.tensor([draft[j]], device=nxt.device)
            row = logits[j : j + 1]
            lp = F.log_softmax(row, -1).gather(1, tok[:, None]).squeeze(1) if want_logprobs else None
            ids.append(draft[j])
            made += 1
            yield tok, lp
            if draft[j] in run.eos or made == max_new_tokens:
                return
            if text is not None and text.add(draft[j]):
                return
        raw = logits[kept : kept + 1]  # the model's logits after the last kept token


def _beam_search(
    dec: _Decoder,
    logits: torch.Tensor,
    seq: torch.Tensor,
    N: int,
    max_new_tokens: int,
    repetition_penalty: float,
    length_penalty: float,
    early_stopping: bool | str,
    R: int,
    eos: list[int],
    pad: int,
    stops: list[str],
    tokenizer: Any,
) -> torch.Tensor:
    """Beam search as transformers 5 runs it (vectorised, `beams_to_keep` candidates per step), so the
    same hypotheses, scores and stopping decisions come out. seq: (B*N, L0) prompt copies."""
    device = seq.device
    BN, L0 = seq.shape
    B = BN // N
    max_len = L0 + max_new_tokens
    K = max(2, 1 + len(eos)) * N  # candidates kept per step: enough that N survive any EOS
    eos_t = torch.tensor(eos, device=device)
    fill = pad if pad or not eos else eos[0]  # transformers fills with `pad_token_id or eos_token_id`
    running = torch.full((B, N, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :L0] = seq.view(B, N, L0)
    finished = running.clone()
    running_scores = torch.zeros(B, N, device=device)
    running_scores[:, 1:] = -1e9  # at the start every beam is the same prompt: only the first one counts
    finished_scores = torch.full((B, N), -1e9, device=device)
    finished_len = torch.zeros(B, N, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, N, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    first_n = torch.arange(K, device=device) < N
    offsets = torch.arange(B, device=device)[:, None] * N
    cur = L0

    def gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # t (B, X, ...), idx (B, Y)
        return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))

    while True:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        log_probs = repetition_penalty_(log_probs, running[:, :, :cur].reshape(BN, cur), repetition_penalty)
        V = log_probs.shape[-1]
        total = (log_probs.view(B, N, V) + running_scores[:, :, None]).view(B, N * V)
        top_scores, top_index = total.topk(K, dim=-1)
        from_beam, token = top_index // V, top_index % V
        candidates = gather(running, from_beam)
        candidates[:, :, cur] = token
        hits = torch.isin(token, eos_t) if len(eos) else torch.zeros_like(token, dtype=torch.bool)
        if stops:
            flat = candidates[:, :, : cur + 1].reshape(B * K, cur + 1)
            hits |= _stopped_by_string(
                flat, L0, stops, tokenizer, torch.ones(B * K, dtype=torch.bool, device=device)
            ).view(B, K)
        if cur + 1 >= max_len:
            hits = torch.ones_like(hits)
        # the best N candidates that did not stop keep running
        running_candidates = top_scores + hits.float() * -1e9
        keep = running_candidates.topk(N, dim=-1).indices
        running, running_scores = gather(candidates, keep), gather(running_candidates, keep)
        source = gather(from_beam, keep)
        # candidates among the top N that stopped compete for the finished slots, length-normalised
        just_finished = hits & first_n[None, :]
        normalised = top_scores / ((cur + 1 - L0) ** length_penalty)
        normalised = normalised + (is_finished.all(-1, keepdim=True) & (early_stopping is True)).float() * -1e9
        normalised = normalised + (~improvable).float() * -1e9
        normalised = normalised + (~just_finished).float() * -1e9
        merged_scores = torch.cat([finished_scores, normalised], dim=1)
        best = merged_scores.topk(N, dim=-1).indices
        finished = gather(torch.cat([finished, candidates], dim=1), best)
        finished_scores = gather(merged_scores, best)
        finished_len = gather(torch.cat([finished_len, torch.full_like(token, cur + 1 - L0)], dim=1), best)
        is_finished = gather(torch.cat([is_finished, just_finished], dim=1), best)
        cur += 1
        # could a running beam still beat the worst finished one? (transformers' heuristic)
        best_length = (max_len - L0) if (early_stopping == "never" and length_penalty > 0) else (cur - L0)
        best_running = running_scores[:, :1] / (best_length**length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1e9)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        open_beams = not (bool(is_finished.all()) and early_stopping is True)
        if not (bool(improvable.any()) and open_beams and not bool(hits.all())):
            break
        dec.reorder((source + offsets).reshape(-1))
        logits = dec.step(running[:, :, cur - 1].reshape(-1))
    out = finished[:, :R].reshape(B * R, max_len)
    return out[:, : L0 + int(finished_len[:, :R].max())]


# ---- text in, text out: prompt encoding, stop-string trimming, streaming -------------------------------
@dataclass
class Completion:
    """One generated continuation. `text` ends with the stop string that ended it, if one did (as
    transformers keeps it); `tokens` are its new ids, the finishing one included."""

    text: str
    tokens: list[int]
    finish_reason: str  # eos | stop | length
    prompt_tokens: int
    logprobs: list[float] | None = None


def encode_prompts(model: Model, tokenizer: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the prompts, left-padded, and their attention mask. A decoder or prefix-LM continues
    the raw text (no special tokens); an encoder-decoder's input is wrapped as in training (`... </s>`)."""
    seq2seq = model.config.spec.seq2seq
    rows = [tokenizer.encode(p, add_special_tokens=seq2seq) for p in prompts]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ConfigError(f"prompt {empty[0]} is empty after tokenization")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _trim_at_stop(text: str, stops: list[str]) -> str:
    hits = [text.index(s) + len(s) for s in stops if s in text]
    return text[: min(hits)] if hits else text


def complete(model: Model, tokenizer: Any, prompt: str | list[str], **kwargs: Any) -> list[Completion]:
    """Generate for one prompt or a batch (left-padded, one cached pass); returns num_return_sequences
    completions per prompt, in prompt order. Takes `generate`'s keyword arguments (stop_strings,
    num_beams, do_sample, output_logprobs, ...)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids, mask = encode_prompts(model, tokenizer, prompts)
    kwargs.setdefault("tokenizer", tokenizer)
    result = generate(model, ids, mask, return_dict_in_generate=True, **kwargs)
    stops = kwargs.get("stop_strings") or []
    stops = [stops] if isinstance(stops, str) else list(stops)
    per = len(result.tokens) // len(prompts)
    prompt_lengths = mask.sum(1).tolist()
    out = []
    for i, (tokens, reason) in enumerate(zip(result.tokens, result.finish_reasons)):
        text = tokenizer.decode(tokens)
        out.append(
            Completion(
                _trim_at_stop(text, stops) if reason == "stop" else text,
                tokens,
                reason,
                prompt_lengths[i // per],
                result.logprobs[i] if result.logprobs else None,
            )
        )
    return out


class TextStream:
    """`for piece in stream(model, tok, prompt): ...` yields text as it is generated (greedy or sampled,
    one sequence); a piece is emitted when its characters are complete (no half UTF-8 character) and
    never past a stop string. After the loop, `text`, `tokens` and `finish_reason` describe the whole."""

    def __init__(self, model: Model, tokenizer: Any, prompt: str, **kwargs: Any) -> None:
        self.model, self.tokenizer, self.prompt, self.kwargs = model, tokenizer, prompt, kwargs
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.logprobs: list[float] = []

    def __iter__(self) -> Iterator[str]:
        kw = dict(self.kwargs)
        stops = kw.pop("stop_strings", None) or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        for name in ("num_beams", "num_return_sequences"):
            if kw.pop(name, 1) != 1:
                raise ConfigError("streaming works for one sequence with greedy decoding or sampling")
        ids, mask = encode_prompts(self.model, self.tokenizer, [self.prompt])
        eos = _eos_list(kw.get("eos_token_id", self.model.config.eos_token_id))
        printed = 0
        incremental = IncrementalText(self.tokenizer, stops)  # each id decoded once, not the whole text
        for token, logprob in _stream_ids(self.model, ids, mask, stops, self.tokenizer, **kw):
            self.tokens.append(token)
            self.logprobs.append(logprob)
            hit = incremental.add(token)
            text = incremental.text
            if hit:
                self.text, self.finish_reason = _trim_at_stop(text, stops), "stop"
                break
            if token in eos:
                self.text, self.finish_reason = self.tokenizer.decode(self.tokens), "eos"
                break
            self.text = text
            if text.endswith("\ufffd"):  # (a tokenizer decoded whole each time) an incomplete character
                continue
            if len(text) > printed:
                yield text[printed:]
                printed = len(text)
        else:
            self.finish_reason = "length"
            self.text = self.tokenizer.decode(self.tokens)  # a trailing half character, as decode shows it
        if len(self.text) > printed:
            yield self.text[printed:]


@torch.no_grad()
def _stream_ids(
    model: Model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    stops: list[str],
    tokenizer: Any,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: Any = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    prompt_lookup_num_tokens: int | None = None,
    assistant_model: Model | None = None,
    num_assistant_tokens: int = 5,
) -> Iterator[tuple[int, float]]:
    drafter = drafter_for(
        model,
        ids,
        max_new_tokens,
        do_sample,
        1,
        repetition_penalty,
        prompt_lookup_num_tokens,
        assistant_model,
        num_assistant_tokens,
    )
    was_training = model.training
    model.eval()
    try:
        run = _prepare(
            model,
            ids,
            mask,
            max_new_tokens,
            do_sample,
            1,
            temperature,
            1,
            eos_token_id,
            pad_token_id,
            stops,
            tokenizer,
            streaming=True,
        )
        sampling = sampling_params(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        for nxt, lp in _steps(run, sampling, True, drafter):
            yield int(nxt[0]), float(lp[0])
    finally:
        model.train(was_training)


def stream(model: Model, tokenizer: Any, prompt: str, **kwargs: Any) -> TextStream:
    """An iterator over the text of one continuation as it is generated; see TextStream."""
    return TextStream(model, tokenizer, prompt, **kwargs)


@torch.no_grad()
def fill_mask(model: Model, tokenizer: Any, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top candidates with probabilities for every mask in `text` ("[MASK]" works with any tokenizer);
    each mask is predicted with the others still masked."""
    if model.mlm_head is None:
        raise ConfigError("fill-mask needs an encoder with an mlm head")
    mask_token = tokenizer.specials.get("mask")
    if mask_token is None:
        raise ConfigError("the tokenizer has no mask token")
    ids = torch.tensor([tokenizer.encode(text.replace("[MASK]", mask_token))])
    model.config.check_length(ids.shape[1], f"the text ({ids.shape[1]} tokens)")
    where = (ids[0] == tokenizer.mask_id).nonzero().flatten()
    if len(where) == 0:
        raise ConfigError(f"no {mask_token} (or [MASK]) in the text: {text!r}")
    model.eval()
    probs = F.softmax(model(ids).logits[0, where].float(), dim=-1)
    top = torch.topk(probs, top_k, dim=-1)
    return [[(tokenizer.token(int(i)), float(p)) for p, i in zip(ps, idx)] for ps, idx in zip(top.values, top.indices)]
