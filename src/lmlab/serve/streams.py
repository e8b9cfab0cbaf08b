"""Engine requests as asyncio streams, and server-sent events: what every generation endpoint shares."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from lmlab.serve.engine import Delta, Engine, EngineStopped, QueueFull, Sampling, TokenInfo
from lmlab.serve.engine import Request as EngineRequest
from lmlab.serve.metrics import Metrics
from lmlab.serve.protocol import APIError, checked


def event_stream(
    chunks: AsyncIterator[dict[str, Any]],
    streams: list[Stream],
    head: dict[str, Any],
    usage: dict[str, int],
    options: dict[str, Any] | None,
    chunk_model: type[BaseModel],
) -> StreamingResponse:
    """Server-sent events of the chunks, then (with stream_options.include_usage) a usage chunk, then
    [DONE]; however the stream ends (a client gone included), its engine requests are cancelled."""

    async def events() -> AsyncIterator[str]:
        try:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(checked(chunk_model, chunk))}\n\n"
            except APIError as e:  # the status line has gone: the error is an event (OpenAI's clients raise it)
                yield f"data: {json.dumps(e.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            if (options or {}).get("include_usage"):
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                last = checked(chunk_model, {**head, "choices": [], "usage": usage})
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for s in streams:
                s.req.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Stream:
    """One engine request and the asyncio queue its deltas arrive on."""

    def __init__(self, index: int, req: EngineRequest, queue: asyncio.Queue) -> None:
        self.index, self.req, self.queue = index, req, queue


def submit(engine: Engine, jobs: list[tuple[int, list[int], Sampling]], metrics: Metrics) -> list[Stream]:
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
        streams.append(Stream(index, req, queue))
    return streams


async def merge(streams: list[Stream], request: Request) -> AsyncIterator[tuple[int, Delta]]:
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


async def collect(streams: list[Stream], request: Request) -> dict[int, tuple[str, Any, list[TokenInfo], str]]:
    out: dict[int, list[Any]] = {}
    try:
        async for index, delta in merge(streams, request):
            text, prompt, infos, _ = out.setdefault(index, ["", None, [], None])
            out[index][0] = text + delta.text
            out[index][1] = delta.prompt if delta.prompt is not None else prompt
            infos.extend(delta.tokens)
            out[index][3] = delta.finish_reason
    finally:
        for s in streams:
            s.req.cancel()
    return {i: tuple(v) for i, v in out.items()}
