"""uvicorn's HTTP protocol with a deadline for each request's headers (slowloris).

uvicorn times an idle keep-alive connection out, but not a connection that is opened and left
silent, nor one that sends its request line and headers a byte at a time: each stays open for as
long as the client likes, holding a file descriptor. A few hundred such clients use up a process's
descriptors and nobody else is answered (docs/reliability.md measures it). Here every connection
has `seconds` from the moment it opens, or from the end of its previous response, to finish the
headers of its next request; a client that is late gets a 408 (or, if it sent nothing, is just
closed). The body has its own limit, ServeConfig.read_timeout, enforced by the app's middleware.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any


def http_protocol_class() -> type[asyncio.Protocol]:
    """The protocol uvicorn would pick itself ("auto"): httptools when it is installed, else h11."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return base


def with_header_timeout(seconds: float, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """`base` (uvicorn's HTTP protocol) cutting off connections whose headers take over `seconds`."""
    from lmlab.serve.protocol import APIError

    base = base or http_protocol_class()
    error = APIError(408, f"the request's headers did not arrive within {seconds:g} s", code="request_timeout")
    body = json.dumps(error.body()).encode()
    late = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

    class HeaderTimeout(base):  # type: ignore[misc, valid-type]
        _timer: asyncio.TimerHandle | None = None
        _waiting_for: Any = None  # the cycle that was current when the clock started
        _got_bytes = False

        def _arm(self) -> None:
            self._disarm()
            self._waiting_for, self._got_bytes = self.cycle, False
            self._timer = self.loop.call_later(seconds, self._too_late)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _too_late(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                if self._got_bytes:
                    self.transport.write(late)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._got_bytes = self._got_bytes or bool(data)
            super().data_received(data)
            if self._timer is not None and self.cycle is not self._waiting_for:  # headers complete
                self._disarm()

        def on_response_complete(self) -> None:
            finished = self.cycle
            super().on_response_complete()  # may start a pipelined request, whose headers are in
            if not self.transport.is_closing() and self.cycle is finished:
                self._arm()  # the clock starts again for the next request on this connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    HeaderTimeout.__name__ = f"{base.__name__}WithHeaderTimeout"
    return HeaderTimeout


def uvicorn_config(
    app: Any, host: str, port: int, header_timeout: float, protocol: type[asyncio.Protocol] | None = None, **kw: Any
) -> Any:
    """A uvicorn Config for `app`: with a header deadline unless `header_timeout` is 0. `protocol`:
    uvicorn's HTTP protocol class to build on (default: the one uvicorn picks)."""
    import uvicorn

    http = with_header_timeout(header_timeout, protocol) if header_timeout > 0 else (protocol or "auto")
    return uvicorn.Config(app, host=host, port=port, http=http, **kw)
