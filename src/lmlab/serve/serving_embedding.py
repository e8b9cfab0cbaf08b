"""POST /v1/embeddings: mean-pooled, normalised final states (lmlab.embed), float or base64."""

from __future__ import annotations

import base64
from typing import Any

import torch
from fastapi import APIRouter, Request

from lmlab.serve.protocol import (
    APIError,
    EmbeddingList,
    EmbeddingRequest,
    checked,
    responses,
)
from lmlab.serve.served import served

router = APIRouter()
same_model = {"model": "$response.body#/model"}


@router.post("/v1/embeddings", operation_id="createEmbedding", response_model=None, responses=responses(EmbeddingList))
async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    s = served(request)
    s.ready(body.model)
    if body.dimensions is not None and body.dimensions != s.state.model.config.d_model:
        raise APIError(400, f"dimensions: this model's embeddings have {s.state.model.config.d_model}", "dimensions")
    inputs = body.input
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs:
        raise APIError(400, "input: nothing to embed", "input")
    if len(inputs) > 2048:
        raise APIError(400, "input: at most 2048 inputs per request", "input")
    rows = []
    for i, x in enumerate(inputs):
        ids = s.prompt_ids(x, f"input[{i}]") if not isinstance(x, str) else s.state.tok.encode(x)
        if not ids or (isinstance(x, str) and not x):
            raise APIError(400, f"input[{i}]: empty input", "input")
        if len(ids) > s.state.model.config.max_seq_len:
            raise APIError(
                400,
                f"input[{i}] is {len(ids)} tokens; this model's context is {s.state.model.config.max_seq_len}",
                "input",
                "context_length_exceeded",
            )
        rows.append(ids)
    vectors = await s.run_model(embed_rows, s.state.model, rows)
    data = []
    for i, v in enumerate(vectors):
        value: Any = v.tolist()
        if body.encoding_format == "base64":
            value = base64.b64encode(v.float().numpy().tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    n = sum(len(r) for r in rows)
    usage = {"prompt_tokens": n, "total_tokens": n}
    return checked(EmbeddingList, {"object": "list", "data": data, "model": s.name, "usage": usage})


def embed_rows(model: Any, rows: list[list[int]]) -> list[torch.Tensor]:
    """One vector per row of ids, each on its own (no padding, so a vector does not depend on its batch)."""
    from lmlab.embed import pooled_states

    return [pooled_states(model, torch.tensor([ids]))[0].cpu() for ids in rows]
