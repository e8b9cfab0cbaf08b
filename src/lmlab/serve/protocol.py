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
    """Every request body: its strings must be valid Unicode, and a field lmlab does not implement is
    refused (400 naming it), never accepted and ignored: a client asking for logit_bias must not get
    an answer that ignored it with a 200."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        where = _lone_surrogate(data)
        if where:
            raise ValueError(f"{where}: not valid Unicode text (a lone surrogate such as \\ud800)")
        return data


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(True, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format; lmlab adds "regex" and "grammar" (a Lark grammar, llguidance's dialect)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JSONSchemaFormat | None = None
    regex: str | None = None
    grammar: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> ResponseFormat:
        need = {"json_schema": self.json_schema, "regex": self.regex, "grammar": self.grammar}
        if self.type in need and need[self.type] is None:
            raise ValueError(f'type "{self.type}" needs the field "{self.type}"')
        return self


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class CalledFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"]
    function: CalledFunction


class _Body(_Request):
    model: str
    user: str | None = None  # the end user's id, for the operator's monitoring: nothing to implement
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    # vLLM's sampling extensions (the openai client sends them in extra_body)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    include_stop_str_in_output: bool = False


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")  # audio, refusal, ...: refused, not dropped

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # a participant's name: templates that know it may use it
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or chat messages rendered through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError('give exactly one of "prompt" and "messages"')
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """vLLM's /tokenizer_info, what lm-evaluation-harness reads to tokenize through the server."""

    tokenizer_class: str
    model_max_length: int
    vocab_size: int
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None


class EmbeddingRequest(_Request):
    model: str
    user: str | None = None
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


# ---- the answers, for the OpenAPI schema (documented, not re-validated on the way out) ------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    family: str
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class EmbeddingItem(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # a list of floats, or base64 of float32 bytes


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


class CompletionChunkChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (the last, with include_usage, has no choices)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ToolCallChunk(ToolCallOut):
    index: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


def checked(model: type[BaseModel], body: dict[str, Any]) -> dict[str, Any]:
    """`body`, after validating it against the response model OpenAPI documents for it (a mismatch is
    lmlab's bug, raised here rather than sent): what is sent is what the schema says."""
    model.model_validate(body)
    return body


STREAMED = (CompletionChunk, ChatChunk, ErrorResponse)  # models only the event streams name


def add_streamed_models(openapi: dict[str, Any]) -> dict[str, Any]:
    """Put the streamed chunks' schemas into an OpenAPI document's components (no route returns
    them as JSON, so FastAPI does not)."""
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for model in STREAMED:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas.setdefault(model.__name__, schema)
    return openapi


def _events(chunk: type[BaseModel]) -> dict[str, Any]:
    """The schema of one server-sent event: `data` is a chunk or an error as JSON, or [DONE]."""
    content = {"anyOf": [{"$ref": f"#/components/schemas/{m}"} for m in (chunk.__name__, "ErrorResponse")]}
    data = {"anyOf": [{"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json", "contentSchema": content}]}  # fmt: skip
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


_ERRORS = {
    400: "a request lmlab cannot serve (OpenAI's error JSON names the parameter)",
    401: "a missing or wrong API key",
    404: "another model id",
    408: "a body (or headers) that did not arrive in time",
    413: "a body over --max-body",
    429: "the queue is full (Retry-After)",
    500: "generation failed for this request; the server goes on",
    503: "the model is loading, could not be loaded, or the engine has stopped",
}


def responses(
    model: type[BaseModel], streams: type[BaseModel] | None = None, links: dict[str, Any] | None = None
) -> dict:
    """FastAPI's `responses=` for an endpoint answering `model` (and, with stream: true, server-sent
    events of `streams` chunks), every error status it may give, and OpenAPI links from its answer to
    other operations."""
    ok: dict[str, Any] = {"model": model, "description": "the answer"}
    if streams is not None:
        ok["description"] = "the answer, or with stream: true server-sent events of chunks, then [DONE]"
        ok["content"] = {"text/event-stream": {"schema": _events(streams)}}
    if links:
        ok["links"] = links
    out: dict[int | str, Any] = {200: ok}
    for status, why in _ERRORS.items():
        out[status] = {"model": ErrorResponse, "description": why}
    return out


def link(operation: str, parameters: dict[str, str] | None = None, body: dict[str, str] | None = None) -> dict:
    """An OpenAPI link to `operation`, its parameters or body fields taken from this answer."""
    out: dict[str, Any] = {"operationId": operation}
    if parameters:
        out["parameters"] = parameters
    if body:
        out["requestBody"] = body
    return out
