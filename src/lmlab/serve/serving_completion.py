"""POST /v1/completions: prompts (text or token ids) continued by the engine, whole or streamed;
`echo` with `logprobs` scores the prompt itself (how lm-evaluation-harness scores choices)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from lmlab.serve.engine import Sampling, TokenInfo
from lmlab.serve.protocol import (
    APIError,
    Completion,
    CompletionChunk,
    CompletionRequest,
    checked,
    link,
    responses,
)
from lmlab.serve.served import served
from lmlab.serve.streams import collect, event_stream, merge, submit

router = APIRouter()
same_model = {"model": "$response.body#/model"}


@router.post(
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
    s = served(request)
    s.ready(body.model)
    engine = s.need_engine("/v1/completions")
    stops = s.check_common(body)
    if body.best_of not in (None, 1) or body.suffix:
        raise APIError(400, "best_of and suffix are not supported", "best_of" if body.best_of else "suffix")
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise APIError(400, "prompt: no prompt given", "prompt")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    seq2seq = s.state.model.config.spec.seq2seq
    if body.echo and seq2seq:
        raise APIError(400, "echo: an encoder-decoder's output does not continue its input", "echo")
    if max_tokens == 0 and not (body.echo and body.logprobs is not None):
        raise APIError(400, "max_tokens: 0 is only for scoring the prompt (with echo and logprobs)", "max_tokens")
    if max_tokens == 0 and body.stream:
        raise APIError(400, "stream: nothing to stream with max_tokens 0", "stream")
    id_lists = [s.prompt_ids(p, f"prompt[{i}]" if len(prompts) > 1 else "prompt") for i, p in enumerate(prompts)]
    for i, ids in enumerate(id_lists):
        s.budget(ids, max_tokens, f"prompt[{i}]" if len(prompts) > 1 else "prompt", "max_tokens")
    constraint = s.constraints(body.response_format)
    if constraint is not None and body.echo:
        raise APIError(400, "echo: the prompt is not held to response_format; ask without echo", "echo")
    jobs = []
    for p, ids in enumerate(id_lists):
        for j in range(body.n):
            sampling = Sampling(
                **s.sampling_of(body),
                max_tokens=max_tokens,
                stop=stops,
                stop_ids=s.state.stop_ids,
                seed=None if body.seed is None else body.seed + j,
                logprobs=body.logprobs,
                prompt_logprobs=body.echo and body.logprobs is not None,
                constraint=constraint and constraint(),
            )
            jobs.append((p * body.n + j, ids, sampling))
    rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    streams = submit(engine, jobs, s.metrics)
    tok = s.state.tok

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
        head = {"id": rid, "object": "text_completion", "created": now, "model": s.name}
        usage = {"prompt_tokens": sum(len(i) for _, i, _ in jobs), "completion_tokens": 0}

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            offsets: dict[int, int] = {}
            async for index, delta in merge(streams, request):
                text = delta.text
                if body.echo and index not in offsets:
                    text = echo_text(index) + text
                    offsets[index] = 0
                usage["completion_tokens"] += s.generated(delta.tokens)
                lp = choice_logprobs(delta.prompt, delta.tokens, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + len(text)
                if text or delta.finish_reason is not None or lp is not None:
                    choice = {"text": text, "index": index, "logprobs": lp, "finish_reason": delta.finish_reason}
                    yield {**head, "choices": [choice]}

        return event_stream(chunks(), streams, head, usage, body.stream_options, CompletionChunk)

    results = await collect(streams, request)
    choices, completion_tokens = [], 0
    for index, (text, prompt_info, infos, reason) in sorted(results.items()):
        prefix = echo_text(index) if body.echo else ""
        completion_tokens += s.generated(infos)
        choices.append(
            {
                "text": prefix + text,
                "index": index,
                "logprobs": choice_logprobs(prompt_info, infos if max_tokens else [], 0),
                "finish_reason": reason,
            }
        )
    prompt_tokens = sum(len(ids) for _, ids, _ in jobs) // body.n if jobs else 0
    return checked(
        Completion,
        {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": s.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        },
    )
