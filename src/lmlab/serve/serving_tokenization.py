"""The tokenizer as vLLM serves it: /tokenizer_info, /tokenize and /detokenize (what
lm-evaluation-harness probes for and tokenizes through when it is given no tokenizer folder)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from lmlab.serve.protocol import (
    APIError,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from lmlab.serve.served import served

router = APIRouter()
same_model = {"model": "$response.body#/model"}


@router.get("/tokenizer_info", operation_id="tokenizerInfo", response_model=TokenizerInfo)
async def tokenizer_info(request: Request) -> TokenizerInfo:
    s = served(request)
    s.ready()
    tok = s.state.tok
    return TokenizerInfo(
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=s.state.model.config.max_seq_len,
        vocab_size=tok.vocab_size,
        eos_token=s.special("eos") or s.special("sep"),
        bos_token=s.special("bos") or s.special("cls"),
        pad_token=s.special("pad"),
        chat_template=tok.chat_template,
    )


@router.post("/tokenize", operation_id="tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    s = served(request)
    s.ready(body.model)
    if body.messages is not None:
        text = s.chat_text(body.messages, [], add_generation_prompt=body.add_generation_prompt)
        ids = s.state.tok.encode(text, add_special_tokens=False)
    else:
        ids = s.state.tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=s.state.model.config.max_seq_len, tokens=ids)


@router.post("/detokenize", operation_id="detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    s = served(request)
    s.ready(body.model)
    if any(i < 0 or i >= s.state.tok.vocab_size for i in body.tokens):
        raise APIError(400, f"tokens: ids must lie in [0, {s.state.tok.vocab_size})", "tokens")
    return DetokenizeResponse(prompt=s.state.tok.decode(body.tokens, skip_special_tokens=False))
