"""What every route of `lmlab serve` works on: the configuration, the loaded model and its engine, and
the request checks the endpoints share (`Served`, reached from a route with `served(request)`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import Request

from lmlab.errors import LmlabError
from lmlab.serve.engine import Engine, EngineStopped, TokenInfo
from lmlab.serve.metrics import Metrics
from lmlab.serve.protocol import MAX_STOP, APIError


@dataclass
class ServeConfig:
    model: str
    name: str | None = None  # the model id clients name; default: the folder's name
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    prefill_chunk: int = 256
    max_body: int = 1 << 20  # bytes
    read_timeout: float = 30.0  # seconds a client may leave the body unfinished between two chunks (408)
    header_timeout: float = 10.0  # seconds a connection has to send a request's headers (408; 0: no limit)
    dtype: str = "auto"  # auto | float32 | bfloat16 (lmlab.quantize.decoding_choice)
    quantize: str = "none"  # none | int8 | fp16
    threads: int | None = None
    retry_after: int = 1  # seconds, with 429
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API (none)


@dataclass
class ModelState:
    model: Any = None
    tok: Any = None
    engine: Engine | None = None
    stop_ids: list[int] = field(default_factory=list)
    task: dict[str, Any] | None = None  # finetune.json of a fine-tuned folder
    choice: dict[str, str] | None = None  # what decoding runs in (lmlab.quantize.decoding_choice)
    error: str | None = None
    loaded: threading.Event = field(default_factory=threading.Event)


def load(cfg: ServeConfig, state: ModelState, metrics: Metrics) -> None:
    try:
        from lmlab.chat import stop_ids
        from lmlab.io import load as load_model
        from lmlab.tokenizer import load_tokenizer

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize)
        tok = load_tokenizer(cfg.model)
        state.model, state.tok, state.choice = model, tok, model.decoding
        info = Path(cfg.model) / "finetune.json"
        state.task = json.loads(info.read_text(encoding="utf-8")) if info.is_file() else None
        state.stop_ids = stop_ids(cfg.model, tok) if model.config.has_decoder else []
        if model.config.has_decoder and model.lm_head is not None:
            state.engine = Engine(
                model, tok, cfg.max_batch, cfg.max_queue, cfg.prefill_chunk, metrics.on_step, threads=cfg.threads
            ).start()
    except Exception as e:  # /health reports it; every request gets 503 with the reason
        state.error = f"{type(e).__name__}: {e}"
    finally:
        state.loaded.set()


@dataclass
class Served:
    """The app's shared state: its configuration, the model (loading in the background), the metrics."""

    cfg: ServeConfig
    state: ModelState
    metrics: Metrics
    name: str
    created: int
    worker: concurrent.futures.ThreadPoolExecutor | None = None  # runs the model when there is no engine

    async def run_model(self, fn: Any, *args: Any) -> Any:
        """fn(*args) on the thread that runs the model: the engine's when there is one (between its
        steps), else one worker thread of its own. One thread, so torch's OpenMP threads are one team:
        a second thread that runs parallel torch ops slows every step of the first on a small machine."""
        engine = self.state.engine
        if engine is not None:
            try:
                future = engine.call(fn, *args)
            except EngineStopped as e:
                raise APIError(503, str(e)) from None
            return await asyncio.wrap_future(future)
        if self.worker is None:
            self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmlab-model")
        return await asyncio.get_running_loop().run_in_executor(self.worker, _inference, fn, args)

    def ready(self, model: str | None = None) -> None:
        if not self.state.loaded.is_set():
            raise APIError(503, "the model is loading", headers={"Retry-After": str(self.cfg.retry_after)})
        if self.state.error is not None:
            raise APIError(503, f"the model could not be loaded: {self.state.error}")
        if self.state.engine is not None and not self.state.engine.alive:
            raise APIError(503, f"the engine has stopped: {self.state.engine.error!r}")
        if model is not None and model != self.name:
            raise APIError(
                404, f"the model {model!r} does not exist; this server serves {self.name!r}", "model", "model_not_found"
            )

    def family(self) -> str:
        return self.state.model.config.family

    def need_engine(self, endpoint: str) -> Engine:
        if self.state.engine is None:
            raise APIError(
                400,
                f"{endpoint} generates text: this is an {self.family()} model, which has no generative head; "
                "decoder, prefix-lm and encoder-decoder models serve it",
            )
        return self.state.engine

    def generated(self, tokens: list[TokenInfo]) -> int:
        """Tokens of an answer, its end-of-sequence token not counted (OpenAI's completion_tokens)."""
        return sum(1 for t in tokens if t.id not in self.state.stop_ids)

    def special(self, role: str) -> str | None:
        i = self.state.tok.id_of(role)
        return None if i is None else self.state.tok.backend.id_to_token(i)

    def prompt_ids(self, prompt: str | list[int], where: str) -> list[int]:
        tok, cfg_m = self.state.tok, self.state.model.config
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, f"{where}: the prompt is empty", where)
            ids = tok.encode(prompt, add_special_tokens=cfg_m.spec.seq2seq)
        else:
            ids = list(prompt)
            if any(i < 0 or i >= cfg_m.vocab_size for i in ids):
                raise APIError(400, f"{where}: token ids must lie in [0, {cfg_m.vocab_size})", where)
        if not ids:
            raise APIError(400, f"{where}: the prompt is empty", where)
        return ids

    def check_common(self, body: Any) -> list[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise APIError(400, f"stop: at most {MAX_STOP} non-empty strings", "stop")
        return stops

    def sampling_of(self, body: Any) -> dict[str, Any]:
        """The sampling settings every generation endpoint shares, as lmlab.generation.SamplingParams names them."""
        return {
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k if body.top_k and body.top_k > 0 else None,
            "min_p": body.min_p,
            "repetition_penalty": body.repetition_penalty,
            "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty,
            "include_stop": body.include_stop_str_in_output,
        }

    def constraints(self, fmt: Any, schema: dict | None = None, param: str = "response_format") -> Any:
        """A function giving each answer its own Constraint for `fmt` (a ResponseFormat) or for a tool
        schema; None when the answer is free text. A schema or grammar that does not compile is a 400."""
        from lmlab.generation import structured

        if schema is None and (fmt is None or fmt.type == "text"):
            return None
        if not self.state.stop_ids:
            raise APIError(400, f"{param}: structured output needs a model with an end-of-sequence token", param)
        try:
            if schema is not None:
                grammar = structured.json_schema_grammar(schema)
            elif fmt.type == "json_object":
                grammar = structured.json_schema_grammar({"type": "object"})
            elif fmt.type == "json_schema":
                grammar = structured.json_schema_grammar(fmt.json_schema.schema_)
            elif fmt.type == "regex":
                grammar = structured.regex_grammar(fmt.regex)
            else:
                grammar = structured.lark_grammar(fmt.grammar)
            table = structured.token_table(self.state.tok, self.state.model.config.vocab_size, self.state.stop_ids)
            structured.Constraint(table, grammar)  # compiled once here, so a bad one is this request's 400
        except LmlabError as e:
            raise APIError(400, f"{param}: {e}", param) from None
        return lambda: structured.Constraint(table, grammar)

    def budget(self, ids: list[int], max_tokens: int, where: str, param: str) -> None:
        ctx = self.state.model.config.max_seq_len
        if len(ids) > ctx or (not self.state.model.config.spec.seq2seq and len(ids) >= ctx and max_tokens > 0):
            raise APIError(
                400,
                f"{where}: the prompt is {len(ids)} tokens; this model's context is {ctx} tokens "
                "(prompts are never truncated)",
                where,
                "context_length_exceeded",
            )
        room = ctx - 1 if self.state.model.config.spec.seq2seq else ctx - len(ids)
        if max_tokens > room:
            raise APIError(
                400,
                f"{param}={max_tokens} is more than the context allows: the prompt is {len(ids)} tokens, the "
                f"context {ctx}, so at most {room} new tokens",
                param,
                "context_length_exceeded",
            )

    def chat_text(self, body_messages: list[Any], tools: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation through the model's chat template (the tools in its `tools` variable)."""
        from lmlab.chat import render
        from lmlab.generation.tools import template_messages

        tok = self.state.tok
        if not tok.chat_template:
            raise APIError(
                400,
                "this model has no chat template (fine-tune it with `lmlab finetune --task chat`); use /v1/completions",
                "messages",
            )
        messages = []
        for i, m in enumerate(body_messages):
            content = m.content
            if isinstance(content, list):  # OpenAI's content parts: only text parts are understood
                if any(part.get("type") != "text" for part in content):
                    raise APIError(
                        400, f"messages[{i}].content: only text parts are supported", f"messages.{i}.content"
                    )
                content = "".join(str(part.get("text", "")) for part in content)
            message = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
            if m.tool_calls is not None:
                if m.role != "assistant":
                    raise APIError(400, f"messages[{i}]: only an assistant turn makes tool calls", f"messages.{i}")
                message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            for key in ("name", "tool_call_id"):
                if getattr(m, key) is not None:
                    message[key] = getattr(m, key)
            messages.append(message)
        extra = {"tools": tools} if tools else {}
        return render(
            tok.chat_template,
            template_messages(messages),
            add_generation_prompt=add_generation_prompt,
            **extra,
            **tok.template_variables(),
        )

    def need_task(self, endpoint: str, task: str) -> dict[str, Any]:
        have = self.state.task["task"] if self.state.task else None
        if have != task:
            what = f"fine-tuned for {have}" if have else "not fine-tuned (no finetune.json)"
            raise APIError(
                400,
                f"{endpoint} needs a folder fine-tuned with `lmlab finetune --task {task}`; this {self.family()} "
                f"folder is {what}",
            )
        return self.state.task

    def texts_of(self, value: str | list[str]) -> list[str]:
        items = [value] if isinstance(value, str) else list(value)
        if not items or any(not t.strip() for t in items):
            raise APIError(400, "input: give one or more non-empty texts", "input")
        if len(items) > 256:
            raise APIError(400, "input: at most 256 texts per request", "input")
        return items

    def listed(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"object": "list", "model": self.name, "data": [{"index": i, **r} for i, r in enumerate(records)]}

    async def run_task(self, task: str, examples: list[Any]) -> list[dict[str, Any]]:
        from lmlab.tasks import get_task

        info = self.state.task
        max_len = info["config"]["max_len"]
        run = get_task(task).predict_examples
        return await self.run_model(run, self.state.model, self.state.tok, info, examples, 32, max_len)


def served(request: Request) -> Served:
    return request.app.state.served


def model_card_of(name: str, created: int, cfg: Any) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "lmlab",
        "family": cfg.family,
        "context_length": cfg.max_seq_len,
    }


def _inference(fn: Any, args: tuple) -> Any:
    with torch.inference_mode():
        return fn(*args)
