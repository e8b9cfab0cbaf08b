"""The HTTP side of `lmlab serve`: OpenAI's endpoints on FastAPI over the continuous-batching Engine.

Generation requests become engine Requests whose deltas cross from the engine thread to the event
loop through an asyncio queue; a streamed answer is server-sent events (`data: {json}`, then
`data: [DONE]`), and a client that goes away cancels its requests, which leave the batch at the next
step. Errors are OpenAI's JSON with the right status. The model loads in a thread after start-up, so
/health answers 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmlab.errors import LmlabError
from lmlab.serve.engine import Delta, Engine, EngineStopped, QueueFull, Sampling, TokenInfo
from lmlab.serve.engine import Request as EngineRequest
from lmlab.serve.metrics import Metrics
from lmlab.serve.protocol import (
    MAX_STOP,
    APIError,
    ChatChunk,
    ChatCompletion,
    ChatRequest,
    ClassifyRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingList,
    EmbeddingRequest,
    FillMaskRequest,
    ModelCard,
    ModelList,
    QARequest,
    TagRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    add_streamed_models,
    link,
    responses,
)


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
class _State:
    model: Any = None
    tok: Any = None
    engine: Engine | None = None
    stop_ids: list[int] = field(default_factory=list)
    task: dict[str, Any] | None = None  # finetune.json of a fine-tuned folder
    choice: dict[str, str] | None = None  # what decoding runs in (lmlab.quantize.decoding_choice)
    error: str | None = None
    loaded: threading.Event = field(default_factory=threading.Event)


def _load(cfg: ServeConfig, state: _State, metrics: Metrics) -> None:
    try:
        from lmlab.chat import stop_ids
        from lmlab.io import load
        from lmlab.tokenizer import load_tokenizer

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model = load(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize)
        tok = load_tokenizer(cfg.model)
        state.model, state.tok, state.choice = model, tok, model.decoding
        info = Path(cfg.model) / "finetune.json"
        state.task = json.loads(info.read_text(encoding="utf-8")) if info.is_file() else None
        state.stop_ids = stop_ids(cfg.model, tok) if model.config.has_decoder else []
        if model.config.has_decoder and model.lm_head is not None:
            state.engine = Engine(model, tok, cfg.max_batch, cfg.max_queue, cfg.prefill_chunk, metrics.on_step).start()
    except Exception as e:  # /health reports it; every request gets 503 with the reason
        state.error = f"{type(e).__name__}: {e}"
    finally:
        state.loaded.set()


def create_app(cfg: ServeConfig, load_now: bool = False) -> FastAPI:
    """The app for one model folder. The model loads in a background thread when the app starts
    (or at once with `load_now`)."""
    name = cfg.name or Path(cfg.model).resolve().name
    state, metrics = _State(), Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not state.loaded.is_set():
            threading.Thread(target=_load, args=(cfg, state, metrics), daemon=True, name="lmlab-load").start()
        elif state.engine is not None:
            state.engine.start()  # a second start-up of the same app (a test client's, say): it was stopped
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="lmlab serve", version="1", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.lmlab, app.state.metrics, app.state.model_name = state, metrics, name
    app.state.lmlab_config = cfg
    openapi = app.openapi
    app.openapi = lambda: app.openapi_schema or add_streamed_models(openapi())  # type: ignore[method-assign]
    created = int(time.time())

    if load_now:
        _load(cfg, state, metrics)

    # ---- errors, size limit, authentication ---------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid" or not loc and "JSON" in msg:
            msg, param = f"the body is not valid JSON ({msg})", None
        elif first.get("type") == "extra_forbidden":  # as OpenAI answers an argument it does not know
            msg = "unrecognized request argument: lmlab does not implement this field (the README lists those it does)"
        return JSONResponse(APIError(400, f"{param}: {msg}" if param else msg, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (an unreadable body, an unknown path or method) in OpenAI's shape too
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        return JSONResponse(APIError(e.status_code, detail).body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(LmlabError)
    async def _lmlab_error(request: Request, e: LmlabError) -> JSONResponse:
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    app.add_middleware(_Guard, cfg=cfg, metrics=metrics)
    if cfg.cors_origins:  # outside the guard: a browser's preflight carries no API key
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type"],
        )

    def ready(model: str | None = None) -> None:
        if not state.loaded.is_set():
            raise APIError(503, "the model is loading", headers={"Retry-After": str(cfg.retry_after)})
        if state.error is not None:
            raise APIError(503, f"the model could not be loaded: {state.error}")
        if state.engine is not None and not state.engine.alive:
            raise APIError(503, f"the engine has stopped: {state.engine.error!r}")
        if model is not None and model != name:
            raise APIError(
                404, f"the model {model!r} does not exist; this server serves {name!r}", "model", "model_not_found"
            )

    def family() -> str:
        return state.model.config.family

    def need_engine(endpoint: str) -> Engine:
        if state.engine is None:
            raise APIError(
                400,
                f"{endpoint} generates text: this is an {family()} model, which has no generative head; "
                "decoder, prefix-lm and encoder-decoder models serve it",
            )
        return state.engine

    def generated(tokens: list[TokenInfo]) -> int:
        """Tokens of an answer, its end-of-sequence token not counted (OpenAI's completion_tokens)."""
        return sum(1 for t in tokens if t.id not in state.stop_ids)

    # ---- the playground, health, metrics, models ---------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        page = resources.files("lmlab.serve") / "static" / "index.html"
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state.loaded.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        if state.error is not None:
            return JSONResponse({"status": "error", "error": state.error}, status_code=503)
        if state.engine is not None and not state.engine.alive:
            return JSONResponse({"status": "error", "error": repr(state.engine.error)}, status_code=503)
        return JSONResponse({"status": "ok", "model": name, "family": family(), "decoding": state.choice})

    @app.get("/metrics")
    async def metrics_endpoint() -> PlainTextResponse:
        if state.engine is not None:
            metrics.observe_engine(state.engine.stats())
        body, kind = metrics.render()
        return PlainTextResponse(body, media_type=kind)

    same_model = {"model": "$response.body#/model"}
    use_model = {"model": "$response.body#/id"}

    @app.get(
        "/v1/models",
        operation_id="listModels",
        response_model=None,
        responses=responses(
            ModelList, links={"model": link("retrieveModel", {"model_id": "$response.body#/data/0/id"})}
        ),
    )
    async def models() -> dict[str, Any]:
        ready()
        return {"object": "list", "data": [_model_card(name, created, state.model.config)]}

    @app.get(
        "/v1/models/{model_id}",
        operation_id="retrieveModel",
        response_model=None,
        responses=responses(
            ModelCard,
            links={
                "complete": link("createCompletion", body=use_model),
                "chat": link("createChatCompletion", body=use_model),
                "embed": link("createEmbedding", body=use_model),
            },
        ),
    )
    async def model_card(model_id: str) -> dict[str, Any]:
        ready(model_id)
        return _model_card(name, created, state.model.config)

    # ---- the tokenizer, as vLLM serves it (lm-evaluation-harness's remote tokenizer) ----------------------
    def special(role: str) -> str | None:
        i = state.tok.id_of(role)
        return None if i is None else state.tok.backend.id_to_token(i)

    @app.get("/tokenizer_info", operation_id="tokenizerInfo", response_model=TokenizerInfo)
    async def tokenizer_info() -> TokenizerInfo:
        ready()
        tok = state.tok
        return TokenizerInfo(
            tokenizer_class="PreTrainedTokenizerFast",
            model_max_length=state.model.config.max_seq_len,
            vocab_size=tok.vocab_size,
            eos_token=special("eos") or special("sep"),
            bos_token=special("bos") or special("cls"),
            pad_token=special("pad"),
            chat_template=tok.chat_template,
        )

    @app.post("/tokenize", operation_id="tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ready(body.model)
        if body.messages is not None:
            text = chat_text(body.messages, [], add_generation_prompt=body.add_generation_prompt)
            ids = state.tok.encode(text, add_special_tokens=False)
        else:
            ids = state.tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=state.model.config.max_seq_len, tokens=ids)

    @app.post("/detokenize", operation_id="detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        ready(body.model)
        if any(i < 0 or i >= state.tok.vocab_size for i in body.tokens):
            raise APIError(400, f"tokens: ids must lie in [0, {state.tok.vocab_size})", "tokens")
        return DetokenizeResponse(prompt=state.tok.decode(body.tokens, skip_special_tokens=False))

    # ---- completions ------------------------------------------------------------------------------------
    def prompt_ids(prompt: str | list[int], where: str) -> list[int]:
        tok, cfg_m = state.tok, state.model.config
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

    def check_common(body: Any) -> list[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise APIError(400, f"stop: at most {MAX_STOP} non-empty strings", "stop")
        return stops

    def sampling_of(body: Any) -> dict[str, Any]:
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

    def constraints(fmt: Any, schema: dict | None = None, param: str = "response_format") -> Any:
        """A function giving each answer its own Constraint for `fmt` (a ResponseFormat) or for a tool
        schema; None when the answer is free text. A schema or grammar that does not compile is a 400."""
        from lmlab.generation import structured

        if schema is None and (fmt is None or fmt.type == "text"):
            return None
        if not state.stop_ids:
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
            table = structured.token_table(state.tok, state.model.config.vocab_size, state.stop_ids)
            structured.Constraint(table, grammar)  # compiled once here, so a bad one is this request's 400
        except LmlabError as e:
            raise APIError(400, f"{param}: {e}", param) from None
        return lambda: structured.Constraint(table, grammar)

    def budget(ids: list[int], max_tokens: int, where: str, param: str) -> None:
        ctx = state.model.config.max_seq_len
        if len(ids) > ctx or (not state.model.config.spec.seq2seq and len(ids) >= ctx and max_tokens > 0):
            raise APIError(
                400,
                f"{where}: the prompt is {len(ids)} tokens; this model's context is {ctx} tokens "
                "(prompts are never truncated)",
                where,
                "context_length_exceeded",
            )
        room = ctx - 1 if state.model.config.spec.seq2seq else ctx - len(ids)
        if max_tokens > room:
            raise APIError(
                400,
                f"{param}={max_tokens} is more than the context allows: the prompt is {len(ids)} tokens, the "
                f"context {ctx}, so at most {room} new tokens",
                param,
                "context_length_exceeded",
            )

    @app.post(
        "/v1/completions",
        operation_id="createCompletion",
        response_model=None,
        responses=responses(
            Completion,
            streams=CompletionChunk,
            links={  # go on from the text it wrote; embed it
                "continue": link("createCompletion", body={**same_model, "prompt": "$response.body#/choices/0/text"}),
                "embed": link("createEmbedding", body={**same_model, "input": "$response.body#/choices/0/text"}),
            },
        ),
    )
    async def completions(body: CompletionRequest, request: Request) -> Any:
        ready(body.model)
        engine = need_engine("/v1/completions")
        stops = check_common(body)
        if body.best_of not in (None, 1) or body.suffix:
            raise APIError(400, "best_of and suffix are not supported", "best_of" if body.best_of else "suffix")
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt: no prompt given", "prompt")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        seq2seq = state.model.config.spec.seq2seq
        if body.echo and seq2seq:
            raise APIError(400, "echo: an encoder-decoder's output does not continue its input", "echo")
        if max_tokens == 0 and not (body.echo and body.logprobs is not None):
            raise APIError(400, "max_tokens: 0 is only for scoring the prompt (with echo and logprobs)", "max_tokens")
        if max_tokens == 0 and body.stream:
            raise APIError(400, "stream: nothing to stream with max_tokens 0", "stream")
        id_lists = [prompt_ids(p, f"prompt[{i}]" if len(prompts) > 1 else "prompt") for i, p in enumerate(prompts)]
        for i, ids in enumerate(id_lists):
            budget(ids, max_tokens, f"prompt[{i}]" if len(prompts) > 1 else "prompt", "max_tokens")
        constraint = constraints(body.response_format)
        if constraint is not None and body.echo:
            raise APIError(400, "echo: the prompt is not held to response_format; ask without echo", "echo")
        jobs = []
        for p, ids in enumerate(id_lists):
            for j in range(body.n):
                sampling = Sampling(
                    **sampling_of(body),
                    max_tokens=max_tokens,
                    stop=stops,
                    stop_ids=state.stop_ids,
                    seed=None if body.seed is None else body.seed + j,
                    logprobs=body.logprobs,
                    prompt_logprobs=body.echo and body.logprobs is not None,
                    constraint=constraint and constraint(),
                )
                jobs.append((p * body.n + j, ids, sampling))
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = _submit(engine, jobs, metrics)
        tok = state.tok

        def choice_logprobs(prompt: list[TokenInfo] | None, tokens: list[TokenInfo], offset: int) -> dict | None:
            if body.logprobs is None:
                return None
            infos = (prompt or []) + tokens
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for info in infos:
                piece = tok.decode([info.id], skip_special_tokens=False)
                out["tokens"].append(piece)
                out["token_logprobs"].append(info.logprob)
                out["top_logprobs"].append(
                    {tok.decode([i], skip_special_tokens=False): lp for i, lp in info.top}
                    if info.logprob is not None
                    else None
                )
                out["text_offset"].append(offset)
                offset += len(piece)
            return out

        def echo_text(index: int) -> str:
            p = prompts[index // body.n]
            return p if isinstance(p, str) else tok.decode(p)

        if body.stream:
            head = {"id": rid, "object": "text_completion", "created": now, "model": name}
            usage = {"prompt_tokens": sum(len(i) for _, i, _ in jobs), "completion_tokens": 0}

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                offsets: dict[int, int] = {}
                async for index, delta in _merge(streams, request):
                    text = delta.text
                    if body.echo and index not in offsets:
                        text = echo_text(index) + text
                        offsets[index] = 0
                    usage["completion_tokens"] += generated(delta.tokens)
                    lp = choice_logprobs(delta.prompt, delta.tokens, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(text)
                    if text or delta.finish_reason is not None or lp is not None:
                        choice = {"text": text, "index": index, "logprobs": lp, "finish_reason": delta.finish_reason}
                        yield {**head, "choices": [choice]}

            return _event_stream(chunks(), streams, head, usage, body.stream_options)

        results = await _collect(streams, request)
        choices, completion_tokens = [], 0
        for index, (text, prompt_info, infos, reason) in sorted(results.items()):
            prefix = echo_text(index) if body.echo else ""
            completion_tokens += generated(infos)
            choices.append(
                {
                    "text": prefix + text,
                    "index": index,
                    "logprobs": choice_logprobs(prompt_info, infos if max_tokens else [], 0),
                    "finish_reason": reason,
                }
            )
        prompt_tokens = sum(len(ids) for _, ids, _ in jobs) // body.n if jobs else 0
        return {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    # ---- chat completions -------------------------------------------------------------------------------
    def chat_text(body_messages: list[Any], tools: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation through the model's chat template (the tools in its `tools` variable)."""
        from lmlab.chat import render
        from lmlab.generation.tools import template_messages

        tok = state.tok
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

    @app.post(
        "/v1/chat/completions",
        operation_id="createChatCompletion",
        response_model=None,
        responses=responses(
            ChatCompletion,
            streams=ChatChunk,
            links={
                "complete": link(
                    "createCompletion", body={**same_model, "prompt": "$response.body#/choices/0/message/content"}
                ),
                "embed": link(
                    "createEmbedding", body={**same_model, "input": "$response.body#/choices/0/message/content"}
                ),
            },
        ),
    )
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        ready(body.model)
        engine = need_engine("/v1/chat/completions")
        stops = check_common(body)
        tok = state.tok
        from lmlab.generation import tools as tool_calls

        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        choice = body.tool_choice or ("auto" if tools else "none")
        if not isinstance(choice, str):
            choice = choice.model_dump()
            if choice["function"]["name"] not in {t["function"]["name"] for t in tools}:
                raise APIError(400, "tool_choice: names a function that is not among the tools", "tool_choice")
        elif choice in ("auto", "required") and not tools:
            raise APIError(400, f'tool_choice: "{choice}" needs tools', "tool_choice")
        schema = tool_calls.answer_schema(tools, choice, body.parallel_tool_calls) if tools else None
        if schema is not None and body.response_format is not None and body.response_format.type != "text":
            raise APIError(
                400,
                "response_format: an answer held to a tool call cannot also follow response_format",
                "response_format",
            )
        ids = prompt_ids(chat_text(body.messages, tools), "messages")
        ctx = state.model.config.max_seq_len
        asked = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        max_tokens = asked if asked is not None else max(1, min(512, ctx - len(ids)))
        budget(ids, max_tokens, "messages", param)
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        constraint = constraints(body.response_format, schema, "tools" if schema is not None else "response_format")
        jobs = [
            (
                j,
                ids,
                Sampling(
                    **sampling_of(body),
                    max_tokens=max_tokens,
                    stop=stops,
                    stop_ids=state.stop_ids,
                    seed=None if body.seed is None else body.seed + j,
                    logprobs=(top or 0) if body.logprobs else None,
                    constraint=constraint and constraint(),
                ),
            )
            for j in range(body.n)
        ]
        calling = bool(tools) and choice != "none"  # the answer is read back for tool calls

        def message_of(text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
            if not calling:
                return {"role": "assistant", "content": text}, reason
            content, calls = tool_calls.read_calls(text, tools, choice)
            if not calls:
                return {"role": "assistant", "content": text}, reason
            return (
                {"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]},
                "tool_calls" if reason == "stop" else reason,
            )

        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        streams = _submit(engine, jobs, metrics)

        def content_logprobs(tokens: list[TokenInfo]) -> dict | None:
            if not body.logprobs:
                return None
            out = []
            for info in tokens:
                if info.id in state.stop_ids:
                    continue
                piece = tok.decode([info.id], skip_special_tokens=False)
                alts = [
                    {
                        "token": (t := tok.decode([i], skip_special_tokens=False)),
                        "logprob": lp,
                        "bytes": list(t.encode()),
                    }
                    for i, lp in info.top
                ]
                out.append(
                    {"token": piece, "logprob": info.logprob, "bytes": list(piece.encode()), "top_logprobs": alts}
                )
            return {"content": out}

        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name}
            usage = {"prompt_tokens": len(ids), "completion_tokens": 0}

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                for j in range(body.n):
                    first = {"index": j, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield {**head, "choices": [{**first, "logprobs": None}]}
                held: dict[int, str] = {}  # with tools, an answer is read for calls once it is whole
                async for index, delta in _merge(streams, request):
                    usage["completion_tokens"] += generated(delta.tokens)
                    lp = content_logprobs(delta.tokens)
                    if calling:  # the text is held; the whole answer goes out as one delta at its end
                        held[index] = held.get(index, "") + delta.text
                        out, reason = {}, None
                        if delta.finish_reason is not None:
                            message, reason = message_of(held.pop(index), delta.finish_reason)
                            out = {k: v for k, v in message.items() if k != "role" and v is not None}
                            if "tool_calls" in out:
                                out["tool_calls"] = [{"index": i, **c} for i, c in enumerate(out["tool_calls"])]
                        if out or reason or (lp and lp["content"]):
                            choice = {"index": index, "delta": out, "logprobs": lp, "finish_reason": reason}
                            yield {**head, "choices": [choice]}
                        continue
                    if delta.text or delta.finish_reason is not None or (lp and lp["content"]):
                        choice = {
                            "index": index,
                            "delta": {"content": delta.text} if delta.text else {},
                            "logprobs": lp,
                            "finish_reason": delta.finish_reason,
                        }
                        yield {**head, "choices": [choice]}

            return _event_stream(chunks(), streams, head, usage, body.stream_options)

        results = await _collect(streams, request)
        choices, completion_tokens = [], 0
        for index, (text, _, infos, reason) in sorted(results.items()):
            completion_tokens += generated(infos)
            message, reason = message_of(text, reason)
            choices.append(
                {"index": index, "message": message, "logprobs": content_logprobs(infos), "finish_reason": reason}
            )
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(ids) + completion_tokens,
            },
        }

    # ---- embeddings -------------------------------------------------------------------------------------
    @app.post("/v1/embeddings", operation_id="createEmbedding", response_model=None, responses=responses(EmbeddingList))
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        ready(body.model)
        if body.dimensions is not None and body.dimensions != state.model.config.d_model:
            raise APIError(400, f"dimensions: this model's embeddings have {state.model.config.d_model}", "dimensions")
        inputs = body.input
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs:
            raise APIError(400, "input: nothing to embed", "input")
        if len(inputs) > 2048:
            raise APIError(400, "input: at most 2048 inputs per request", "input")
        rows = []
        for i, x in enumerate(inputs):
            ids = prompt_ids(x, f"input[{i}]") if not isinstance(x, str) else state.tok.encode(x)
            if not ids or (isinstance(x, str) and not x):
                raise APIError(400, f"input[{i}]: empty input", "input")
            if len(ids) > state.model.config.max_seq_len:
                raise APIError(
                    400,
                    f"input[{i}] is {len(ids)} tokens; this model's context is {state.model.config.max_seq_len}",
                    "input",
                    "context_length_exceeded",
                )
            rows.append(ids)
        vectors = await asyncio.to_thread(_embed, state, rows)
        data = []
        for i, v in enumerate(vectors):
            value: Any = v.tolist()
            if body.encoding_format == "base64":
                value = base64.b64encode(v.float().numpy().tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        n = sum(len(r) for r in rows)
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    # ---- encoder endpoints: fill-mask, classification, token classification, extractive QA -------------
    def need_task(endpoint: str, task: str) -> dict[str, Any]:
        have = state.task["task"] if state.task else None
        if have != task:
            what = f"fine-tuned for {have}" if have else "not fine-tuned (no finetune.json)"
            raise APIError(
                400,
                f"{endpoint} needs a folder fine-tuned with `lmlab finetune --task {task}`; this {family()} "
                f"folder is {what}",
            )
        return state.task

    def texts_of(value: str | list[str]) -> list[str]:
        items = [value] if isinstance(value, str) else list(value)
        if not items or any(not t.strip() for t in items):
            raise APIError(400, "input: give one or more non-empty texts", "input")
        if len(items) > 256:
            raise APIError(400, "input: at most 256 texts per request", "input")
        return items

    @app.post("/v1/fill-mask")
    async def fill_mask(body: FillMaskRequest) -> dict[str, Any]:
        ready(body.model)
        if state.model.mlm_head is None:
            raise APIError(
                400,
                f"/v1/fill-mask needs an encoder with its masked-LM head; this is a {family()} model "
                f"(encoder folders from `lmlab pretrain --family encoder` serve it)",
            )
        from lmlab.generate import fill_mask as predict_masks

        data = []
        for i, text in enumerate(texts_of(body.input)):
            try:
                masks = await asyncio.to_thread(
                    torch.inference_mode()(predict_masks), state.model, state.tok, text, body.top_k
                )
            except LmlabError as e:
                raise APIError(400, f"input[{i}]: {e}", "input") from None
            data.append(
                {
                    "index": i,
                    "masks": [[{"token": t, "probability": p} for t, p in candidates] for candidates in masks],
                }
            )
        return {"object": "list", "model": name, "data": data}

    def listed(records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"object": "list", "model": name, "data": [{"index": i, **r} for i, r in enumerate(records)]}

    async def run_task(task: str, examples: list[Any]) -> list[dict[str, Any]]:
        from lmlab.tasks import get_task

        info = state.task
        max_len = info["config"]["max_len"]
        run = torch.inference_mode()(get_task(task).predict_examples)
        return await asyncio.to_thread(run, state.model, state.tok, info, examples, 32, max_len)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        ready(body.model)
        need_task("/v1/classify", "classify")
        from lmlab.tasks.classify import Example

        columns = len(state.task.get("text_columns") or [None])
        items = [body.input] if isinstance(body.input, str) else list(body.input)
        if columns == 2 and items and isinstance(items[0], str) and len(items) == 2 and isinstance(body.input, list):
            items = [items]  # one pair given flat
        examples = []
        for i, item in enumerate(items):
            texts = [item] if isinstance(item, str) else list(item)
            if len(texts) != columns or any(not isinstance(t, str) or not t.strip() for t in texts):
                raise APIError(400, f"input[{i}]: this model classifies {columns} non-empty text(s) at a time", "input")
            examples.append(Example(texts=texts, where=f"input[{i}]"))
        if not examples or len(examples) > 256:
            raise APIError(400, "input: between 1 and 256 texts per request", "input")
        out = await run_task("classify", examples)
        return listed(out)

    @app.post("/v1/token-classify")
    async def token_classify(body: TagRequest) -> dict[str, Any]:
        ready(body.model)
        need_task("/v1/token-classify", "ner")
        from lmlab.tasks.classify import Example

        texts = texts_of(body.input)  # words are split on white space, as CoNLL files give them
        examples = [Example(words=t.split(), where=f"input[{i}]") for i, t in enumerate(texts)]
        out = await run_task("ner", examples)
        return listed(out)

    @app.post("/v1/question-answering")
    async def question_answering(body: QARequest) -> dict[str, Any]:
        ready(body.model)
        need_task("/v1/question-answering", "qa")
        from lmlab.tasks.qa import QAExample

        items = [body.input] if not isinstance(body.input, list) else body.input
        if not items or len(items) > 256:
            raise APIError(400, "input: between 1 and 256 question / context pairs", "input")
        examples = [QAExample(str(i), it.question, it.context, []) for i, it in enumerate(items)]
        out = await run_task("qa", examples)
        return listed(out)

    return app


# ---- helpers -----------------------------------------------------------------------------------------
class _Guard:
    """ASGI middleware: the body size limit (413 before the body is read whole), a client that stalls
    while sending its body (408 after `read_timeout`), the API key on /v1/ (401; compared in constant
    time) and per-request metrics. Pure ASGI, so streamed answers pass
    through untouched and a client's disconnect reaches them."""

    def __init__(self, app: Any, cfg: ServeConfig, metrics: Metrics) -> None:
        self.app, self.cfg, self.metrics = app, cfg, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, path, cfg = time.perf_counter(), scope["path"], self.cfg
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        status = [500]

        async def reply(e: APIError) -> None:
            body = json.dumps(e.body()).encode()
            extra = [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
            head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
            await send({"type": "http.response.start", "status": e.status, "headers": head})
            await send({"type": "http.response.body", "body": body})
            self.metrics.request(path, e.status, time.perf_counter() - started)

        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body):
            return await reply(APIError(413, f"the body is {length} bytes; at most {cfg.max_body} are accepted"))
        if path.startswith("/v1/") and cfg.api_key is not None:
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                msg = "invalid or missing API key (send Authorization: Bearer KEY)"
                return await reply(APIError(401, msg, code="invalid_api_key"))
        if scope["method"] in ("POST", "PUT", "PATCH"):  # the whole body first, up to the limit, in time
            chunks, size, more = [], 0, True
            while more:
                try:
                    message = await asyncio.wait_for(receive(), cfg.read_timeout)
                except asyncio.TimeoutError:  # a slow or stalled client: its slot is not held forever
                    msg = f"the body did not arrive: nothing for {cfg.read_timeout:g} s after {size} bytes"
                    return await reply(APIError(408, msg))
                if message["type"] == "http.disconnect":
                    return None
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > cfg.max_body:
                    return await reply(APIError(413, f"the body exceeds {cfg.max_body} bytes"))
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def receive_replayed(receive: Any = receive) -> Any:
                return replay.pop() if replay else await receive()

            receive = receive_replayed

        async def send_recorded(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        finally:
            self.metrics.request(path, status[0], time.perf_counter() - started)


def _model_card(name: str, created: int, cfg: Any) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "lmlab",
        "family": cfg.family,
        "context_length": cfg.max_seq_len,
    }


def _event_stream(
    chunks: AsyncIterator[dict[str, Any]],
    streams: list[_Stream],
    head: dict[str, Any],
    usage: dict[str, int],
    options: dict[str, Any] | None,
) -> StreamingResponse:
    """Server-sent events of the chunks, then (with stream_options.include_usage) a usage chunk, then
    [DONE]; however the stream ends (a client gone included), its engine requests are cancelled."""

    async def events() -> AsyncIterator[str]:
        try:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except APIError as e:  # the status line has gone: the error is an event (OpenAI's clients raise it)
                yield f"data: {json.dumps(e.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            if (options or {}).get("include_usage"):
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for s in streams:
                s.req.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _Stream:
    """One engine request and the asyncio queue its deltas arrive on."""

    def __init__(self, index: int, req: EngineRequest, queue: asyncio.Queue) -> None:
        self.index, self.req, self.queue = index, req, queue


def _submit(engine: Engine, jobs: list[tuple[int, list[int], Sampling]], metrics: Metrics) -> list[_Stream]:
    loop = asyncio.get_running_loop()
    streams = []
    for index, ids, sampling in jobs:
        queue: asyncio.Queue = asyncio.Queue()

        def emit(delta: Delta, queue: asyncio.Queue = queue) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        req = EngineRequest(ids, sampling, metrics.timed(emit))
        try:
            engine.submit(req)
        except QueueFull as e:
            for s in streams:
                s.req.cancel()
            raise APIError(429, f"the server is busy: {e}; retry later", headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            for s in streams:
                s.req.cancel()
            raise APIError(503, str(e)) from None
        streams.append(_Stream(index, req, queue))
    return streams


async def _merge(streams: list[_Stream], request: Request) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of all streams as they come, until each has finished; stops if the client disconnects."""
    pending = {s.index: s for s in streams}
    waiters = {asyncio.ensure_future(s.queue.get()): s for s in streams}
    try:
        while waiters:
            done, _ = await asyncio.wait(waiters, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                if await request.is_disconnected():
                    return
                continue
            for fut in done:
                s = waiters.pop(fut)
                delta = fut.result()
                if delta.finish_reason == "error":
                    raise APIError(500, f"generation failed ({delta.error}); the server goes on", code="engine_error")
                yield s.index, delta
                if delta.finish_reason is None:
                    waiters[asyncio.ensure_future(s.queue.get())] = s
                else:
                    pending.pop(s.index, None)
    finally:
        for fut in waiters:
            fut.cancel()


async def _collect(streams: list[_Stream], request: Request) -> dict[int, tuple[str, Any, list[TokenInfo], str]]:
    out: dict[int, list[Any]] = {}
    try:
        async for index, delta in _merge(streams, request):
            text, prompt, infos, _ = out.setdefault(index, ["", None, [], None])
            out[index][0] = text + delta.text
            out[index][1] = delta.prompt if delta.prompt is not None else prompt
            infos.extend(delta.tokens)
            out[index][3] = delta.finish_reason
    finally:
        for s in streams:
            s.req.cancel()
    return {i: tuple(v) for i, v in out.items()}


@torch.inference_mode()
def _embed(state: _State, rows: list[list[int]]) -> list[torch.Tensor]:
    """Mean-pooled, L2-normalised final hidden states (the encoder's, for an encoder-decoder)."""
    model, cfg = state.model, state.model.config
    out = []
    device = next(model.parameters()).device
    for ids in rows:  # one at a time: no padding, so an input's vector does not depend on its batch
        x = torch.tensor([ids], device=device)
        if cfg.spec.seq2seq:
            start = torch.tensor([[cfg.decoder_start_token_id]], device=device)
            h = model(x, decoder_input_ids=start).encoder_last_hidden_state
        else:
            h = model(x).last_hidden_state
        out.append(torch.nn.functional.normalize(h[0].float().mean(0), dim=-1).cpu())
    return out
