"""The server's guard: body size, a client that stalls mid-body, the API key, per-request metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any

from lmlab.serve.metrics import Metrics
from lmlab.serve.protocol import APIError


class Guard:
    """ASGI middleware: the body size limit (413 before the body is read whole), a client that stalls
    while sending its body (408 after `read_timeout`), the API key on /v1/ (401; compared in constant
    time) and per-request metrics. Pure ASGI, so streamed answers pass
    through untouched and a client's disconnect reaches them."""

    def __init__(self, app: Any, cfg: Any, metrics: Metrics) -> None:
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
