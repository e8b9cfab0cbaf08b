"""Tool calls: what a chat answer must look like when the client asks for one, and how an answer is
read back into OpenAI's `tool_calls`.

The tools go into the prompt through the model's chat template (its `tools` variable, as transformers'
`apply_chat_template(tools=...)` passes them). How the answer is read depends on `tool_choice`:

- a named function: the answer is held (structured output) to that function's parameters schema, and is
  the call's arguments;
- "required": the answer is held to a JSON list of calls, `[{"name": ..., "arguments": {...}}, ...]`
  (one call when parallel calls are off), each name one of the tools and its arguments valid under that
  tool's parameters;
- "auto": the model answers freely; calls written the way Hermes-style templates teach
  (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, Qwen2.5 and NousHermes among them)
  become tool calls when the name is a known tool, and the text around them stays the content;
- "none": the answer is text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parameters_of(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters schema (a function without parameters takes an empty object)."""
    return tool["function"].get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}


def answer_schema(tools: list[dict[str, Any]], choice: str | dict[str, Any], parallel: bool) -> dict[str, Any] | None:
    """The JSON schema the answer is held to for `tool_choice` (None: the answer is free)."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return parameters_of(next(t for t in tools if t["function"]["name"] == name))
    if choice != "required":
        return None
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, "arguments": parameters_of(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    item = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"type": "array", "items": item, "minItems": 1, **({} if parallel else {"maxItems": 1})}


def read_calls(
    text: str, tools: list[dict[str, Any]], choice: str | dict[str, Any]
) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of an answer generated under `tool_choice`."""
    names = {t["function"]["name"] for t in tools}
    if isinstance(choice, dict):  # held to the parameters schema: the text is the arguments
        return None, [ToolCall(choice["function"]["name"], _compact(text))]
    if choice == "required":  # held to a list of calls
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:  # cut short by max_tokens: no calls, the text as it came
            return text, []
        return None, [ToolCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]
    if choice == "none":
        return text, []
    calls, kept, last = [], [], 0
    for m in _TAGGED.finditer(text):
        try:
            call = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not (isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments", {}), dict)):
            continue
        calls.append(ToolCall(call["name"], json.dumps(call.get("arguments", {}), ensure_ascii=False)))
        kept.append(text[last : m.start()])
        last = m.end()
    if not calls:
        return text, []
    content = "".join(kept + [text[last:]]).strip()
    return content or None, calls


def _compact(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:
        return text


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: an assistant turn's tool-call arguments as objects (OpenAI
    sends them as JSON text; templates such as Llama 3's and Qwen2.5's iterate or dump them)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c["function"])
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                calls.append({**c, "function": fn})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out
