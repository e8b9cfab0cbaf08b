"""The serving engine: continuous batching over one model, in a thread of its own.

Requests wait in a bounded first-come-first-served queue. At every step boundary the engine admits
waiting requests into free slots of the running batch and prefills their prompts, at most
`prefill_chunk` prompt tokens per step (short prompts join together; a long prompt goes on where it
stopped at the next step, so the streams already running keep flowing), then runs one decode step
for every running row. A row leaves the batch when it finishes (end-of-sequence id, stop
string, max_tokens) or its client goes away (`Request.cancel`), freeing its slot for the next step.

A failure is confined to the requests it touches, and the engine goes on: a prompt whose prefill
raises fails alone (a group prefilled together is retried one by one, so only the request that
fails is told), a row whose sampling raises leaves the batch, and a decoding step that raises fails
the rows of that step, whose cache it may have left half-written. Each is told with a Delta whose
finish_reason is "error" and whose `error` says what happened. Only an exception that is not an
Exception (KeyboardInterrupt, SystemExit) stops the engine; then every request it holds is told.

The batch is one KV cache whose rows are left-padded to a common length: a prompt that joins is padded
(or the batch is, when the newcomer is longer), every row keeps its own positions, and the attention
mask hides the padding; columns that no row needs any more are trimmed away (KVCache.pad / join /
select). The batch samples at once (lmlab.generation.sampling), each row under its own settings and
its own seeded generator, so a request's tokens do not depend on its neighbours. Other work on the
model (embeddings, the encoder endpoints) runs on the engine's thread between steps (`Engine.call`):
one thread runs the model.
Encoder-decoders keep, per row, the encoder's output and its cross-attention cache, padded on the right
to the longest source in the batch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.generation.sampling import SamplingParams, adjust, choose, token_logprobs
from lmlab.generation.text import StreamText
from lmlab.model import Model
from lmlab.model.attention import KVCache


class QueueFull(Exception):
    """The engine's queue is full: try again later (HTTP 429)."""


class EngineStopped(Exception):
    """The engine has stopped (or died): it takes no more requests (HTTP 503)."""


Sampling = SamplingParams  # the engine's name for one request's settings (lmlab.generation.sampling)


@dataclass
class TokenInfo:
    """One token with its log-probability under the raw logits and the top alternatives."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """What a request receives after a step: new text (never a half character, never past a stop
    string), the tokens behind it, and at the end the finish reason ("stop" or "length")."""

    text: str
    tokens: list[TokenInfo]
    finish_reason: str | None = None  # "stop", "length", or "error" (then `error` says why)
    prompt: list[TokenInfo] | None = None  # with Sampling.prompt_logprobs, in the first delta
    error: str | None = None


class Request:
    """A prompt (token ids) and its sampling settings; `emit` is called from the engine thread with each
    Delta, the last one carrying finish_reason. `cancel()` (a client gone) frees the slot at the next step."""

    _next = 0

    def __init__(self, prompt_ids: list[int], sampling: Sampling, emit: Callable[[Delta], None]) -> None:
        Request._next += 1
        self.id = Request._next
        self.prompt_ids, self.sampling, self.emit = list(prompt_ids), sampling, emit
        self.cancelled = False
        self.alone = False  # prefilled on its own (after a group it was part of failed)
        self.created = time.perf_counter()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


class _Row:
    """A running request: its generated ids, text emitted so far and its generator."""

    def __init__(self, req: Request, device: torch.device, vocab: int, tokenizer: Any) -> None:
        self.req = req
        self.text = StreamText(tokenizer, req.sampling.stop, req.sampling.include_stop)  # each id decoded once
        self.prompt_info: list[TokenInfo] | None = None  # sent with the first delta
        self.generator = req.sampling.generator(device)
        s = req.sampling
        # the penalties' state: tokens seen (prompt and output: the repetition penalty), tokens generated
        self.seen = self.counts = None
        if s.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(req.prompt_ids, device=device)] = True
        if s.presence_penalty or s.frequency_penalty:
            self.counts = torch.zeros(vocab, device=device)


@dataclass
class _Prefill:
    """A prompt being prefilled on its own cache, chunk by chunk."""

    row: _Row
    cache: KVCache
    done: int = 0  # prompt tokens already fed
    prompt_info: list[TokenInfo] | None = None
    logits: torch.Tensor | None = None  # (1, V) after the last chunk
    memory: torch.Tensor | None = None  # encoder-decoders: the encoder's output (1, S, C)


class Engine:
    """Continuous batching over `model` (decoder, prefix-LM or encoder-decoder) with `tokenizer`.

    `submit(request)` queues a request (QueueFull when `max_queue` wait already); `start()` runs the
    loop in a daemon thread, `stop()` ends it. `stats()` reports queue depth, batch size and counters.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Any,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        on_step: Callable[[int], None] | None = None,
        threads: int | None = None,
    ) -> None:
        cfg = model.config
        self.threads = threads  # torch threads of the engine's own thread (None: torch's default)
        if not cfg.has_decoder or model.lm_head is None:
            raise ConfigError(f"the engine generates text: a {cfg.family} model has no language-model head")
        self.model, self.tok, self.cfg = model.eval(), tokenizer, cfg
        self.seq2seq = cfg.spec.seq2seq
        self.prefix = cfg.spec.self_attention == "prefix"
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, max(1, prefill_chunk)
        self.device = next(model.parameters()).device
        self.on_step = on_step
        self.waiting: deque[Request] = deque()
        self.calls: list[tuple[concurrent.futures.Future, Callable[..., Any], tuple]] = []  # Engine.call
        self.lock = threading.Condition()
        self.rows: list[_Row] = []
        self.prefilling: _Prefill | None = None
        self.joining: list[_Row] = []  # rows of a group being prefilled together
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) bool: real positions of the (decoder) cache
        self.next_pos: torch.Tensor | None = None  # (B, 1)
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits
        self.memory: torch.Tensor | None = None  # encoder-decoders: (B, S, C)
        self.src_mask: torch.Tensor | None = None  # (B, S)
        self.thread: threading.Thread | None = None
        self.running = False
        self.error: BaseException | None = None  # what stopped the engine, if it died
        self.counters = {
            "requests": 0,
            "finished": 0,
            "cancelled": 0,
            "failed": 0,
            "generated_tokens": 0,
            "prompt_tokens": 0,
        }

    # ---- the public side (any thread) ----------------------------------------------------------------
    @property
    def context(self) -> int:
        return self.cfg.max_seq_len

    def submit(self, req: Request) -> None:
        """Queue a request (QueueFull when the queue is full). Its settings are checked here, in the
        caller's thread: a seed torch's generator cannot take would otherwise stop the engine."""
        if req.sampling.seed is not None:
            try:
                torch.Generator().manual_seed(req.sampling.seed)
            except (ValueError, RuntimeError, OverflowError, TypeError) as e:
                raise ValueError(f"seed {req.sampling.seed!r} cannot seed a generator ({e})") from None
        with self.lock:
            if self.error is not None or (self.thread is not None and not self.running):
                raise EngineStopped(
                    f"the engine has stopped ({self.error!r})" if self.error else "the engine has stopped"
                )
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(req)
            self.counters["requests"] += 1
            self.lock.notify()

    def start(self) -> Engine:
        """Run the loop in a thread; again after stop() (an app's lifespan may start and stop it more
        than once). An engine that died stays dead."""
        if self.error is not None or (self.thread is not None and self.thread.is_alive()):
            return self
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="lmlab-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.error is None

    def stats(self) -> dict[str, int]:
        return {
            "queue": len(self.waiting),
            "batch": len(self.rows),
            "prefilling": int(self.prefilling is not None),
            **self.counters,
        }

    # ---- the loop (engine thread) ---------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run fn(*args) on the engine's thread between two steps (the embedding and encoder endpoints):
        one thread runs the model, so torch's OpenMP threads are one team. Measured: a second thread
        that has run a parallel torch op makes this thread's steps 1.5-10x slower on 2 cores."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            if self.error is not None or (self.thread is not None and not self.running):
                raise EngineStopped("the engine has stopped")
            self.calls.append((future, fn, args))
            self.lock.notify()
        return future

    def _run_calls(self) -> None:
        with self.lock:
            calls, self.calls = self.calls, []
        for future, fn, args in calls:
            if future.set_running_or_notify_cancel():
                try:
                    with torch.inference_mode():
                        future.set_result(fn(*args))
                except Exception as e:  # noqa: BLE001  (the caller's error, handed back to it)
                    future.set_exception(e)

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            while True:
                with self.lock:
                    while self.running and not (self.waiting or self.rows or self.prefilling or self.calls):
                        self.lock.wait(timeout=1.0)
                    if not self.running:
                        break
                if self.calls:
                    self._run_calls()
                try:
                    with torch.inference_mode():
                        self._prefill_within(self.prefill_chunk)
                        if self.rows:
                            self._decode_step()
                except Exception as e:  # noqa: BLE001  (not confined by the steps' own handlers: all in flight)
                    self._fail(self._in_flight(), e, "the engine's step")
                    self._reset_batch()
                    self.prefilling, self.joining = None, []
                if self.on_step is not None:
                    self.on_step(len(self.rows))
        except BaseException as e:  # the engine is dead: /health says so, every request it holds is told
            with self.lock:
                self.error = e
            self._fail(self._in_flight() + self._drain(), e, "the engine stopped")
            self._drop_calls()
            raise
        self._fail(self._in_flight() + self._drain(), None, "the engine was stopped")
        self._drop_calls()

    def _drop_calls(self) -> None:
        with self.lock:
            calls, self.calls = self.calls, []
        for future, _, _ in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineStopped("the engine has stopped"))

    def _in_flight(self) -> list[Request]:
        rows = self.rows + self.joining + ([self.prefilling.row] if self.prefilling else [])
        return [row.req for row in rows]

    def _drain(self) -> list[Request]:
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        return waiting

    def _fail(self, reqs: list[Request], e: BaseException | None, where: str) -> None:
        """Tell each of `reqs` that it failed (finish_reason "error", and why)."""
        if not reqs:
            return
        why = where if e is None else f"{where}: {type(e).__name__}: {e}"
        for req in reqs:
            if req.cancelled:
                self.counters["cancelled"] += 1
                continue
            self.counters["failed"] += 1
            with contextlib.suppress(Exception):  # a client whose loop is gone cannot be told
                req.emit(Delta("", [], "error", error=why))

    def _reset_batch(self) -> None:
        self.rows = []
        self.cache = self.mask = self.next_pos = self.logits = self.memory = self.src_mask = None

    def _next_request(self) -> Request | None:
        """The first waiting request, if a slot is free (cancelled ones are dropped on the way)."""
        with self.lock:
            while self.waiting and len(self.rows) + (self.prefilling is not None) < self.max_batch:
                req = self.waiting.popleft()
                if not req.cancelled:
                    return req
                self.counters["cancelled"] += 1
        return None

    def _prefill_within(self, budget: int) -> None:
        """Prefill waiting prompts, up to `budget` prompt tokens this step: short prompts of a decoder
        go through the model together in one left-padded pass; a long one goes on next step where it
        stopped (the running rows decode in between)."""
        while budget > 0:
            if self.prefilling is None:
                group = self._take_group(budget)
                if len(group) > 1:
                    try:
                        budget -= self._prefill_together(group)
                    except Exception:  # noqa: BLE001  (each is tried alone: only the one that fails is told)
                        self._regroup(group)
                        budget -= 1
                    continue
                req = group[0] if group else self._next_request()
                if req is None:
                    return
                try:
                    self._begin(req)
                except Exception as e:  # noqa: BLE001
                    self._fail([req], e, "starting the request")
                    continue
            req = self.prefilling.row.req
            try:
                budget -= self._prefill_step(budget)
            except Exception as e:  # noqa: BLE001  (its own cache: the batch is untouched)
                self.prefilling = None
                self._fail([req], e, "prefilling the prompt")
                budget -= 1
                continue
            if self.prefilling is not None:  # a long prompt used the budget up
                return

    def _regroup(self, group: list[Request]) -> None:
        """A group's prefill failed: its requests go back to the head of the queue, to be prefilled
        one by one."""
        self.joining = []
        with self.lock:
            for req in reversed(group):
                req.alone = True
                self.waiting.appendleft(req)

    def _take_group(self, budget: int) -> list[Request]:
        """The waiting requests, first come first served, whose whole prompts a causal decoder can
        prefill in one padded pass of at most `budget` tokens (rows x longest prompt); the first
        request that does not fit ends the group. Empty for prefix-LMs and encoder-decoders."""
        if self.seq2seq or self.prefix:
            return []
        group: list[Request] = []
        with self.lock:
            while self.waiting and len(self.rows) + len(group) < self.max_batch:
                req = self.waiting[0]
                if req.cancelled:
                    self.waiting.popleft()
                    self.counters["cancelled"] += 1
                    continue
                longest = max([len(r.prompt_ids) for r in group] + [len(req.prompt_ids)])
                if (
                    (len(group) + 1) * longest > budget
                    or req.alone
                    or req.sampling.prompt_logprobs
                    or req.sampling.max_tokens == 0
                ):
                    break
                group.append(self.waiting.popleft())
        return group

    def _prefill_together(self, group: list[Request]) -> int:
        """Prefill whole prompts in one left-padded pass and put them into the batch; the tokens fed."""
        rows = self.joining = [_Row(req, self.device, self.cfg.vocab_size, self.tok) for req in group]
        T = max(len(req.prompt_ids) for req in group)
        pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
        ids = torch.full((len(group), T), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(group), T, dtype=torch.bool, device=self.device)
        for i, req in enumerate(group):
            n = len(req.prompt_ids)
            ids[i, T - n :] = torch.tensor(req.prompt_ids, device=self.device)
            mask[i, T - n :] = True
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = KVCache(self.cfg.n_layers)
        out = self.model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        self.joining = []
        self.counters["prompt_tokens"] += int(mask.sum())
        self._join_rows(rows, cache, mask, positions[:, -1:] + 1, out.logits[:, -1])
        return len(group) * T

    def _begin(self, req: Request) -> None:
        row = _Row(req, self.device, self.cfg.vocab_size, self.tok)
        self.counters["prompt_tokens"] += len(req.prompt_ids)
        cache = KVCache(self.cfg.decoder_layers if self.seq2seq else self.cfg.n_layers, cross=self.seq2seq)
        self.prefilling = _Prefill(row, cache)

    def _prefill_step(self, budget: int) -> int:
        """Feed the next chunk (at most `budget` tokens, but never nothing) of the prompt being
        prefilled; when it is all in, the row joins the batch. Returns the tokens fed."""
        p = self.prefilling
        ids = p.row.req.prompt_ids
        m = self.model
        if p.row.req.cancelled:
            self.prefilling = None
            self.counters["cancelled"] += 1
            return 1
        fed = p.done
        if self.seq2seq:  # the encoder reads the whole source at once; the decoder starts
            src = torch.tensor([ids], device=self.device)
            start = torch.tensor([[self.cfg.decoder_start_token_id]], device=self.device)
            out = m(src, decoder_input_ids=start, past_key_values=p.cache, use_cache=True)
            p.memory, p.logits, p.done = out.encoder_last_hidden_state, out.logits[:, -1], len(ids)
        else:
            # a prefix-LM's prompt is one bidirectional prefix: it cannot be split into causal chunks
            n = len(ids) if self.prefix else max(1, min(budget, len(ids) - p.done))
            chunk = torch.tensor([ids[p.done : p.done + n]], device=self.device)
            positions = torch.arange(p.done, p.done + n, device=self.device)[None]
            extra = {"prefix_lengths": torch.tensor([n], device=self.device)} if self.prefix else {}
            out = m(chunk, position_ids=positions, past_key_values=p.cache, use_cache=True, **extra)
            if p.row.req.sampling.prompt_logprobs:
                logits = out.logits[0]
                if self.prefix:  # the prefix sees the token it would predict: score the prompt causally
                    logits = m(chunk, prefix_lengths=torch.zeros(1, dtype=torch.long, device=self.device)).logits[0]
                p.prompt_info = (p.prompt_info or [TokenInfo(ids[0], None)]) + self._prompt_info(
                    logits, ids[p.done + 1 : p.done + n + 1], p.row.req.sampling.logprobs or 0
                )
            p.logits, p.done = out.logits[:, -1], p.done + n
        fed = p.done - fed
        if p.done < len(ids):
            return fed
        self.prefilling = None
        p.row.prompt_info = p.prompt_info
        if p.row.req.sampling.max_tokens == 0:  # only the prompt's log-probabilities were asked for
            self._emit(p.row, Delta("", [], "length"))
            self.counters["finished"] += 1
            return fed
        self._join(p)
        return fed

    def _emit(self, row: _Row, delta: Delta) -> None:
        if row.prompt_info is not None:
            delta.prompt, row.prompt_info = row.prompt_info, None
        row.req.emit(delta)

    def _prompt_info(self, logits: torch.Tensor, targets: list[int], k: int) -> list[TokenInfo]:
        """Log-probabilities of each next prompt token under logits (T, V) (the last row has no target)."""
        lp = F.log_softmax(logits.float(), -1)
        out = []
        for t, target in enumerate(targets):
            top = torch.topk(lp[t], k) if k else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            out.append(TokenInfo(target, float(lp[t, target]), alts))
        return out

    def _join(self, p: _Prefill) -> None:
        """Put a prefilled row into the batch."""
        new_len = p.cache.seen
        new_mask = torch.ones(1, new_len, dtype=torch.bool, device=self.device)
        new_pos = torch.tensor([[new_len if not self.seq2seq else 1]], device=self.device)
        self._join_rows([p.row], p.cache, new_mask, new_pos, p.logits, p.memory)

    def _join_rows(
        self,
        rows: list[_Row],
        cache: KVCache,
        new_mask: torch.Tensor,  # (k, T) real positions of the newcomers' cache
        new_pos: torch.Tensor,  # (k, 1)
        logits: torch.Tensor,  # (k, V)
        memory: torch.Tensor | None = None,  # encoder-decoders: (k, S, C)
    ) -> None:
        """Put prefilled rows into the batch: pad the shorter of (batch, newcomers) on the left. When
        that fails the batch may be half-joined: its rows and the newcomers fail."""
        try:
            self._pad_and_join(rows, cache, new_mask, new_pos, logits, memory)
        except Exception as e:  # noqa: BLE001
            reqs = [row.req for row in self.rows + [r for r in rows if r not in self.rows]]
            self._reset_batch()
            self._fail(reqs, e, f"joining {len(rows)} request(s) to a batch of {len(reqs) - len(rows)}")

    def _pad_and_join(
        self,
        rows: list[_Row],
        cache: KVCache,
        new_mask: torch.Tensor,
        new_pos: torch.Tensor,
        logits: torch.Tensor,
        memory: torch.Tensor | None,
    ) -> None:
        new_len = new_mask.shape[1]
        if not self.rows:
            self.cache, self.mask, self.next_pos, self.logits = cache, new_mask, new_pos, logits
            if self.seq2seq:
                self.memory = memory
                self.src_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=self.device)
            self.rows = list(rows)
            return
        L = self.mask.shape[1]
        if new_len < L:
            cache.pad(left=L - new_len)
            new_mask = F.pad(new_mask, (L - new_len, 0), value=False)
        elif new_len > L:
            self.cache.pad(left=new_len - L)
            self.mask = F.pad(self.mask, (new_len - L, 0), value=False)
        if self.seq2seq:
            S, s = self.memory.shape[1], memory.shape[1]
            new_src = torch.ones(memory.shape[0], s, dtype=torch.bool, device=self.device)
            if s < S:
                cache.pad(right=S - s, cross=True)
                memory, new_src = F.pad(memory, (0, 0, 0, S - s)), F.pad(new_src, (0, S - s), value=False)
            elif s > S:
                self.cache.pad(right=s - S, cross=True)
                self.memory, self.src_mask = (
                    F.pad(self.memory, (0, 0, 0, s - S)),
                    F.pad(self.src_mask, (0, s - S), value=False),
                )
        self.cache.join(cache)
        if self.seq2seq:
            self.memory = torch.cat([self.memory, memory])
            self.src_mask = torch.cat([self.src_mask, new_src])
        self.mask = torch.cat([self.mask, new_mask])
        self.next_pos = torch.cat([self.next_pos, new_pos])
        self.logits = torch.cat([self.logits, logits])
        self.rows.extend(rows)

    def _sample_all(self, live: list[int]) -> list[TokenInfo | Exception]:
        """The next token of every live row, the batch at once, each row under its own settings
        (lmlab.generation.sampling); a row whose grammar fails gets its exception instead."""
        rows = [self.rows[i] for i in live]
        logits = self.logits if len(live) == len(self.rows) else self.logits[torch.tensor(live, device=self.device)]
        raw = scores = logits.float()
        failed: dict[int, Exception] = {}
        if any(r.req.sampling.constraint is not None for r in rows):
            scores = raw.clone()
            for j, r in enumerate(rows):
                if r.req.sampling.constraint is not None:
                    try:
                        r.req.sampling.constraint.mask_(scores[j])
                    except Exception as e:  # noqa: BLE001  (this row alone leaves the batch)
                        failed[j] = e
                        scores[j] = raw[j]
        params = [r.req.sampling for r in rows]
        seen = counts = None
        if any(p.repetition_penalty != 1.0 for p in params):
            blank = torch.zeros(raw.shape[-1], dtype=torch.bool, device=self.device)
            seen = torch.stack([blank if r.seen is None else r.seen for r in rows])
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            blank = torch.zeros(raw.shape[-1], device=self.device)
            counts = torch.stack([blank if r.counts is None else r.counts for r in rows])
        scores = adjust(scores, params, seen, counts, constrain=False)
        tokens = choose(scores, params, [r.generator for r in rows])
        want = [p.logprobs for p in params]
        if any(w is not None for w in want):
            chosen, tops = token_logprobs(raw, tokens, max(w or 0 for w in want))
        out: list[TokenInfo | Exception] = []
        for j, t in enumerate(tokens.tolist()):
            if j in failed:
                out.append(failed[j])
            elif want[j] is None:
                out.append(TokenInfo(t, None))
            else:
                out.append(TokenInfo(t, chosen[j], tops[j][: want[j]]))
        return out

    def _advance(self, row: _Row, info: TokenInfo) -> str | None:
        """Record a sampled token; emit the text it completes; the finish reason if it ends the row."""
        s = row.req.sampling
        if row.req.first_token_at is None:
            row.req.first_token_at = time.perf_counter()
        self.counters["generated_tokens"] += 1
        if s.constraint is not None:
            s.constraint.accept(info.id)
        if row.seen is not None:
            row.seen[info.id] = True
        if row.counts is not None:
            row.counts[info.id] += 1
        if info.id in s.stop_ids:  # the end-of-sequence token is not part of the text
            self._emit(row, Delta(row.text.pending(final=True), [info], "stop"))
            return "stop"
        if row.text.add(info.id):  # a stop string
            self._emit(row, Delta(row.text.until_stop(), [info], "stop"))
            return "stop"
        # the context: a decoder's prompt and output share it; an encoder-decoder's output starts at 1
        n = len(row.text.ids)  # the output so far (StreamText keeps the ids)
        used = 1 + n if self.seq2seq else len(row.req.prompt_ids) + n
        if s.constraint is not None and s.constraint.finished:  # the grammar allows nothing more
            self._emit(row, Delta(row.text.pending(final=True), [info], "stop"))
            return "stop"
        if n >= s.max_tokens or used >= self.context:
            self._emit(row, Delta(row.text.pending(final=True), [info], "length"))
            return "length"
        self._emit(row, Delta(row.text.pending(), [info]))
        return None

    def _decode_step(self) -> None:
        """Sample one token per row from its logits, retire finished / cancelled rows, run the model once."""
        live = []
        for i, row in enumerate(self.rows):
            if row.req.cancelled:
                self.counters["cancelled"] += 1
            else:
                live.append(i)
        try:
            infos = self._sample_all(live) if live else []
        except Exception as e:  # noqa: BLE001  (the rows sampled in this step fail; the engine goes on)
            self._fail([self.rows[i].req for i in live], e, "sampling the next tokens")
            live, infos = [], []
        keep, tokens = [], []
        for i, info in zip(live, infos):
            row = self.rows[i]
            try:
                if isinstance(info, Exception):
                    raise info
                reason = self._advance(row, info)
            except Exception as e:  # noqa: BLE001  (this row alone: it leaves the batch)
                self._fail([row.req], e, "sampling the next token")
                continue
            if reason is not None:
                self.counters["finished"] += 1
                continue
            keep.append(i)
            tokens.append(info.id)
        try:
            self._forward(keep, tokens)
        except Exception as e:  # noqa: BLE001  (the step may have written part of the shared cache)
            reqs = [row.req for row in self.rows]
            self._reset_batch()
            self._fail(reqs, e, f"a decoding step of {len(reqs)} request(s)")

    def _forward(self, keep: list[int], tokens: list[int]) -> None:
        """Retire the rows not kept, then run the model once on each kept row's new token."""
        if len(keep) < len(self.rows):
            self._retire(keep)
        if not self.rows:
            return
        new = torch.tensor(tokens, device=self.device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        m = self.model
        if self.seq2seq:
            out = m(
                attention_mask=self.src_mask,
                decoder_input_ids=new,
                decoder_attention_mask=self.mask,
                decoder_position_ids=self.next_pos,
                encoder_outputs=self.memory,
                past_key_values=self.cache,
            )
        else:
            out = m(new, attention_mask=self.mask, position_ids=self.next_pos, past_key_values=self.cache)
        self.logits = out.logits[:, -1]
        self.next_pos = self.next_pos + 1

    def _retire(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.next_pos = self.logits = self.memory = self.src_mask = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        lead = int(self.mask.any(0).float().argmax())  # columns no remaining row needs
        self.cache.select(index, lead)
        self.mask = self.mask[:, lead:]
        self.next_pos, self.logits = self.next_pos[index], self.logits[index]
        if self.seq2seq:
            self.memory, self.src_mask = self.memory[index], self.src_mask[index]
