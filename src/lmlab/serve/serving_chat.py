"""POST /v1/chat/completions: messages through the chat template, structured output and tool calls."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from lmlab.serve.engine import Sampling, TokenInfo
from lmlab.serve.protocol import (
    APIError,
    ChatChunk,
    ChatCompletion,
    ChatRequest,
    checked,
    link,
    responses,
)
from lmlab.serve.served import served
from lmlab.serve.streams import collect, event_stream, merge, submit

router = APIRouter()
same_model = {"model": "$response.body#/model"}


@router.post(
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
            "embed": link("createEmbedding", body={**same_model, "input": "$response.body#/choices/0/message/content"}),
        },
    ),
)
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    s = served(request)
    s.ready(body.model)
    engine = s.need_engine("/v1/chat/completions")
    stops = s.check_common(body)
    tok = s.state.tok
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
    ids = s.prompt_ids(s.chat_text(body.messages, tools), "messages")
    ctx = s.state.model.config.max_seq_len
    asked = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_tokens = asked if asked is not None else max(1, min(512, ctx - len(ids)))
    s.budget(ids, max_tokens, "messages", param)
    top = body.top_logprobs if body.logprobs else None
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    constraint = s.constraints(body.response_format, schema, "tools" if schema is not None else "response_format")
    jobs = [
        (
            j,
            ids,
            Sampling(
                **s.sampling_of(body),
                max_tokens=max_tokens,
                stop=stops,
                stop_ids=s.state.stop_ids,
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
    streams = submit(engine, jobs, s.metrics)

    def content_logprobs(tokens: list[TokenInfo]) -> dict | None:
        if not body.logprobs:
            return None
        out = []
        for info in tokens:
            if info.id in s.state.stop_ids:
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
            out.append({"token": piece, "logprob": info.logprob, "bytes": list(piece.encode()), "top_logprobs": alts})
        return {"content": out}

    if body.stream:
        head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": s.name}
        usage = {"prompt_tokens": len(ids), "completion_tokens": 0}

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            for j in range(body.n):
                first = {"index": j, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield {**head, "choices": [{**first, "logprobs": None}]}
            held: dict[int, str] = {}  # with tools, an answer is read for calls once it is whole
            async for index, delta in merge(streams, request):
                usage["completion_tokens"] += s.generated(delta.tokens)
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

        return event_stream(chunks(), streams, head, usage, body.stream_options, ChatChunk)

    results = await collect(streams, request)
    choices, completion_tokens = [], 0
    for index, (text, _, infos, reason) in sorted(results.items()):
        completion_tokens += s.generated(infos)
        message, reason = message_of(text, reason)
        choices.append(
            {"index": index, "message": message, "logprobs": content_logprobs(infos), "finish_reason": reason}
        )
    return checked(
        ChatCompletion,
        {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": s.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(ids) + completion_tokens,
            },
        },
    )
