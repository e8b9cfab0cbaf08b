"""lmlab's own encoder endpoints: fill-mask, and for fine-tuned folders classification, token
classification and extractive QA, each answering as `lmlab predict` does."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from lmlab.errors import LmlabError
from lmlab.serve.protocol import (
    APIError,
    ClassifyRequest,
    FillMaskRequest,
    QARequest,
    TagRequest,
)
from lmlab.serve.served import served

router = APIRouter()
same_model = {"model": "$response.body#/model"}


@router.post("/v1/fill-mask")
async def fill_mask(body: FillMaskRequest, request: Request) -> dict[str, Any]:
    s = served(request)
    s.ready(body.model)
    if s.state.model.mlm_head is None:
        raise APIError(
            400,
            f"/v1/fill-mask needs an encoder with its masked-LM head; this is a {s.family()} model "
            f"(encoder folders from `lmlab pretrain --family encoder` serve it)",
        )
    from lmlab.generate import fill_mask as predict_masks

    data = []
    for i, text in enumerate(s.texts_of(body.input)):
        try:
            masks = await s.run_model(predict_masks, s.state.model, s.state.tok, text, body.top_k)
        except LmlabError as e:
            raise APIError(400, f"input[{i}]: {e}", "input") from None
        data.append(
            {
                "index": i,
                "masks": [[{"token": t, "probability": p} for t, p in candidates] for candidates in masks],
            }
        )
    return {"object": "list", "model": s.name, "data": data}


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
    s = served(request)
    s.ready(body.model)
    s.need_task("/v1/classify", "classify")
    from lmlab.tasks.classify import Example

    columns = len(s.state.task.get("text_columns") or [None])
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
    out = await s.run_task("classify", examples)
    return s.listed(out)


@router.post("/v1/token-classify")
async def token_classify(body: TagRequest, request: Request) -> dict[str, Any]:
    s = served(request)
    s.ready(body.model)
    s.need_task("/v1/token-classify", "ner")
    from lmlab.tasks.classify import Example

    texts = s.texts_of(body.input)  # words are split on white space, as CoNLL files give them
    examples = [Example(words=t.split(), where=f"input[{i}]") for i, t in enumerate(texts)]
    out = await s.run_task("ner", examples)
    return s.listed(out)


@router.post("/v1/question-answering")
async def question_answering(body: QARequest, request: Request) -> dict[str, Any]:
    s = served(request)
    s.ready(body.model)
    s.need_task("/v1/question-answering", "qa")
    from lmlab.tasks.qa import QAExample

    items = [body.input] if not isinstance(body.input, list) else body.input
    if not items or len(items) > 256:
        raise APIError(400, "input: between 1 and 256 question / context pairs", "input")
    examples = [QAExample(str(i), it.question, it.context, []) for i, it in enumerate(items)]
    out = await s.run_task("qa", examples)
    return s.listed(out)
