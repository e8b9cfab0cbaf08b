"""Chat templates: conversations rendered to text by a Jinja template, as transformers does.

A tokenizer's `chat_template` (saved as `chat_template` in tokenizer_config.json) turns a list of
messages `{"role": "system" | "user" | "assistant", "content": str}` into the text the model reads.
`render` runs it the way transformers' `apply_chat_template` does (a sandboxed Jinja environment with
trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII text, the tokenizer's special tokens as `bos_token`, `eos_token`, ...), and the text is
tokenized without adding special tokens, so lmlab and `AutoTokenizer.apply_chat_template` give the
same ids for a saved folder.

A model without a template gets `DEFAULT_TEMPLATE`, ChatML (as Qwen and others use it):

    <|im_start|>system
    You are helpful.<|im_end|>
    <|im_start|>user
    Hi!<|im_end|>
    <|im_start|>assistant
    Hello.<|im_end|>

whose two tokens are added to the vocabulary as special tokens (`DEFAULT_TOKENS`); the model's
embeddings grow to match (`Model.resize_token_embeddings`). `<|im_end|>` ends an assistant turn:
generation stops there.

`assistant_spans` finds the characters of every assistant turn in the rendered text by rendering the
conversation up to each turn, with and without it; the labels of chat fine-tuning cover those
characters only (the turn's text and its end-of-turn token, not the header before it).

This module imports no torch.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from lmlab.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
DEFAULT_TOKENS = ("<|im_start|>", "<|im_end|>")
DEFAULT_END_OF_TURN = "<|im_end|>"
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Message = dict[str, str]


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render(template: str, messages: list[Message], add_generation_prompt: bool = False, **variables: Any) -> str:
    """The text of a conversation under `template`; a template that fails to compile or render is a
    ConfigError carrying Jinja's message and the template's source."""
    import jinja2

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise ConfigError(
            f"the chat template failed to render{where}: {type(e).__name__}: {e}\n"
            f"--- the template ---\n{template}\n--- end of the template ---"
        ) from None


def assistant_spans(template: str, messages: list[Message], **variables: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) characters of each assistant turn in it: from the
    end of the conversation rendered up to the turn with a generation prompt, to the end of the
    conversation rendered with the turn (trailing white space left out)."""
    text = render(template, messages, **variables)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(template, messages[:i], add_generation_prompt=True, **variables)
        upto = render(template, messages[: i + 1], **variables)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ConfigError(
                "the chat template does not render a conversation as the growing sum of its turns (the text "
                f"up to assistant turn {i} is not a prefix of the whole), so lmlab cannot tell which tokens "
                "are the assistant's; use a template that appends each turn"
            )
        end = len(upto.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


def check_messages(messages: Any, where: str, need_assistant: bool = True) -> list[Message]:
    """The messages of one conversation, validated: a list of {role, content} with known roles and
    string content, with at least one assistant turn when training."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {k} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {k} has the unknown role {m['role']!r} (expected {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {k}: 'content' must be a string, found {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn from it")
    return out


def conversation(record: dict[str, Any], where: str) -> list[Message]:
    """The messages of one JSONL record: OpenAI's `{"messages": [...]}`, or `{"prompt", "completion"}`
    (strings, as a user turn and an assistant turn; or lists of messages, as TRL writes them)."""
    if "messages" in record:
        return check_messages(record["messages"], where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                raise DataError(f"{where}: the completion is empty")
            return check_messages(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], where
            )
        if isinstance(prompt, list) and isinstance(completion, list):
            return check_messages(prompt + completion, where)
        raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages")
    raise DataError(
        f"{where}: expected a 'messages' list (OpenAI's chat format) or 'prompt' and 'completion' fields, "
        f"found {', '.join(map(repr, record)) or 'none'}"
    )


def end_of_turn(tok: Any, template: str) -> str | None:
    """The special token that closes an assistant turn under `template` (ChatML's `<|im_end|>`), found by
    rendering a probe conversation: the first token after the assistant's text, if it is a special token."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "zq"}]
    text, spans = assistant_spans(template, probe, **tok.template_variables())
    if not spans:
        return None
    turn = text[spans[0][0] : spans[0][1]]
    rest = turn[turn.find("zq") + 2 :] if "zq" in turn else ""
    ids = tok.encode(rest, add_special_tokens=False) if rest else []
    special = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    return tok.token(ids[0]) if ids and ids[0] in special else None


def stop_ids(folder: Any, tok: Any) -> list[int]:
    """The ids that end a reply of a chat model folder: generation_config.json's `eos_token_id` (what
    chat fine-tuning writes, as transformers reads it), else the end-of-sequence token and the
    template's end-of-turn token."""
    from pathlib import Path

    path = Path(folder) / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        if eos is not None:
            return [eos] if isinstance(eos, int) else [int(i) for i in eos]
    ids = [tok.eos_id] if tok.eos_id is not None else []
    eot = end_of_turn(tok, tok.chat_template) if tok.chat_template else None
    if eot is not None:
        ids.append(tok.backend.token_to_id(eot))
    return list(dict.fromkeys(ids))


class ChatSession:
    """A conversation with a chat model, kept within its context window: `reply(text)` adds a user turn,
    yields the assistant's answer as it is generated and keeps it in the history. Before generating,
    the oldest turns are dropped (the system message stays) until the prompt and `max_new_tokens` fit
    the model's `max_seq_len`; `dropped` says how many were dropped for the last answer. `ask` streams
    an answer (then `remember` it), `reply` returns it whole."""

    def __init__(
        self,
        model: Any,
        tok: Any,
        stops: list[int],
        system: str | None = None,
        max_new_tokens: int = 128,
        **sampling: Any,
    ) -> None:
        if not tok.chat_template:
            raise ConfigError(
                "the model folder has no chat template (tokenizer_config.json has no chat_template); "
                "fine-tune it with `lmlab finetune --task chat` first"
            )
        self.model, self.tok, self.stops = model, tok, stops
        self.system, self.max_new_tokens, self.sampling = system, max_new_tokens, sampling
        self.history: list[Message] = []
        self.dropped = 0

    @property
    def window(self) -> int:
        return self.model.config.max_seq_len

    def reset(self) -> None:
        self.history = []

    def messages(self) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def prompt(self) -> tuple[str, int]:
        """The rendered prompt for the next reply and its length in tokens, after trimming the history."""
        self.dropped = 0
        while True:
            text = render(
                self.tok.chat_template, self.messages(), add_generation_prompt=True, **self.tok.template_variables()
            )
            n = len(self.tok.encode(text, add_special_tokens=False))
            if n + self.max_new_tokens <= self.window:
                return text, n
            if len(self.history) <= 1:
                raise ConfigError(
                    f"the message needs {n} tokens, and {self.max_new_tokens} new tokens must follow it: more than "
                    f"the model's context window of {self.window} tokens (shorten it, or lower --max-new-tokens)"
                )
            # drop the oldest exchange: a user turn and the answer to it
            cut = 2 if len(self.history) > 2 and self.history[1]["role"] == "assistant" else 1
            self.history = self.history[cut:]
            self.dropped += cut

    def ask(self, text: str) -> Any:
        """Add the user turn `text` and return the answer's stream (lmlab.generate.TextStream), to iterate
        and then hand to `remember`. A message that cannot fit is refused (ConfigError) and not kept."""
        from lmlab.generate import stream

        self.history.append({"role": "user", "content": text})
        try:
            prompt, _ = self.prompt()
        except ConfigError:
            self.history.pop()
            raise
        return stream(
            self.model, self.tok, prompt, max_new_tokens=self.max_new_tokens, eos_token_id=self.stops, **self.sampling
        )

    def remember(self, answer: Any) -> None:
        """Keep a streamed answer in the history."""
        self.history.append({"role": "assistant", "content": answer.text.strip()})

    def reply(self, text: str) -> str:
        """The whole answer to `text` (not streamed), kept in the history."""
        answer = self.ask(text)
        for _ in answer:
            pass
        self.remember(answer)
        return answer.text.strip()
