"""The HTTP side of `lmlab serve`: OpenAI's endpoints on FastAPI over the continuous-batching Engine.

Generation requests become engine Requests whose deltas cross from the engine thread to the event
loop through an asyncio queue; a streamed answer is server-sent events (`data: {json}`, then
`data: [DONE]`), and a client that goes away cancels its requests, which leave the batch at the next
step. Errors are OpenAI's JSON with the right status. The model loads in a thread after start-up, so
/health answers 503 until it is ready.

The app is split the way vLLM splits its server: this module builds it (errors, the guard, health,
metrics, models); one module per API builds its answers (serving_completion, serving_chat,
serving_embedding, serving_tokenization, serving_encoders), each checked against the protocol model
OpenAPI documents before it is sent (protocol.checked); streams.py holds the engine streams and
server-sent events, guard.py the size / time / key guard, served.py the state and checks they share.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmlab.errors import LmlabError
from lmlab.serve import (
    serving_chat,
    serving_completion,
    serving_embedding,
    serving_encoders,
    serving_tokenization,
)
from lmlab.serve.guard import Guard
from lmlab.serve.metrics import Metrics
from lmlab.serve.protocol import APIError, ModelCard, ModelList, add_streamed_models, checked, link, responses
from lmlab.serve.served import ModelState, ServeConfig, Served, load, model_card_of, served

__all__ = ["ServeConfig", "create_app"]

router = APIRouter()
use_model = {"model": "$response.body#/id"}


def create_app(cfg: ServeConfig, load_now: bool = False) -> FastAPI:
    """The app for one model folder. The model loads in a background thread when the app starts
    (or at once with `load_now`)."""
    name = cfg.name or Path(cfg.model).resolve().name
    state, metrics = ModelState(), Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not state.loaded.is_set():
            threading.Thread(target=load, args=(cfg, state, metrics), daemon=True, name="lmlab-load").start()
        elif state.engine is not None:
            state.engine.start()  # a second start-up of the same app (a test client's, say): it was stopped
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="lmlab serve", version="1", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.lmlab, app.state.metrics, app.state.model_name = state, metrics, name
    app.state.lmlab_config = cfg
    app.state.served = Served(cfg, state, metrics, name, int(time.time()))
    openapi = app.openapi
    app.openapi = lambda: app.openapi_schema or add_streamed_models(openapi())  # type: ignore[method-assign]
    if load_now:
        load(cfg, state, metrics)

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

    app.add_middleware(Guard, cfg=cfg, metrics=metrics)
    if cfg.cors_origins:  # outside the guard: a browser's preflight carries no API key
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type"],
        )
    for module in (serving_completion, serving_chat, serving_embedding, serving_tokenization, serving_encoders):
        app.include_router(module.router)
    app.include_router(router)
    return app


# ---- the playground, health, metrics, models ---------------------------------------------------------
@router.get("/", include_in_schema=False)
async def playground() -> HTMLResponse:
    page = resources.files("lmlab.serve") / "static" / "index.html"
    return HTMLResponse(page.read_text(encoding="utf-8"))


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    s = served(request)
    if not s.state.loaded.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    if s.state.error is not None:
        return JSONResponse({"status": "error", "error": s.state.error}, status_code=503)
    if s.state.engine is not None and not s.state.engine.alive:
        return JSONResponse({"status": "error", "error": repr(s.state.engine.error)}, status_code=503)
    return JSONResponse({"status": "ok", "model": s.name, "family": s.family(), "decoding": s.state.choice})


@router.get("/metrics")
async def metrics_endpoint(request: Request) -> PlainTextResponse:
    s = served(request)
    if s.state.engine is not None:
        s.metrics.observe_engine(s.state.engine.stats())
    body, kind = s.metrics.render()
    return PlainTextResponse(body, media_type=kind)


same_model = {"model": "$response.body#/model"}
use_model = {"model": "$response.body#/id"}


@router.get(
    "/v1/models",
    operation_id="listModels",
    response_model=None,
    responses=responses(ModelList, links={"model": link("retrieveModel", {"model_id": "$response.body#/data/0/id"})}),
)
async def models(request: Request) -> dict[str, Any]:
    s = served(request)
    s.ready()
    return checked(ModelList, {"object": "list", "data": [model_card_of(s.name, s.created, s.state.model.config)]})


@router.get(
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
async def model_card(model_id: str, request: Request) -> dict[str, Any]:
    s = served(request)
    s.ready(model_id)
    return checked(ModelCard, model_card_of(s.name, s.created, s.state.model.config))
