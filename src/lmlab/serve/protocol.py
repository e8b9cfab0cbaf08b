"""The OpenAI request bodies lmlab serves, as pydantic models, and OpenAI's error JSON."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """The path of the first string in a JSON value that is not valid Unicode (JSON's "\\ud800" escape
    decodes to a lone surrogate, which no tokenizer or UTF-8 encoder takes), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _lone_surrogate(k, where) or _lone_surrogate(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None


class _Request(BaseModel):
    """Every request body: its strings must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        where = _lone_surrogate(data)
        if where:
            raise ValueError(f"{where}: not valid Unicode text (a lone surrogate such as \\ud800)")
        return data


class _Body(_Request):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields lmlab ignores (user, ...)

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingRequest(_Request):
    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class FillMaskRequest(_Request):
    model: str
    input: str | list[str]  # text with [MASK] (or the tokenizer's own mask token)
    top_k: int = Field(5, ge=1, le=50)


class ClassifyRequest(_Request):
    model: str
    input: str | list[str | list[str]]  # a text, or [text, text_pair] for a pair task (MRPC-like)


class TagRequest(_Request):
    model: str
    input: str | list[str]  # words split on white space


class QAItem(BaseModel):
    question: str = Field(min_length=1)
    context: str = Field(min_length=1)


class QARequest(_Request):
    model: str
    input: QAItem | list[QAItem]


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    KIND = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        kind = self.KIND.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        if self.status == 429:
            kind = "rate_limit_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
