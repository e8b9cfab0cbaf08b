"""Structured output: decoding held to a JSON schema, a regular expression or a Lark grammar.

The grammar engine is llguidance (the `structured` extra): it compiles a schema in about a millisecond,
computes the mask of allowed next tokens in 40-55 us a token on lmlab's vocabularies and has no
dependencies of its own (`python bench/constrained.py` measured it beside xgrammar and outlines-core:
docs/benchmarks.md). A `Constraint` is one answer's parser state: before each token the logits of every
token that cannot continue a valid text are set to -inf (`mask_`), the chosen token is fed back
(`accept`), and `finished` says when the grammar allows nothing more (or only the end token).

JSON is written compactly by default (no optional white space, "," and ":" as separators), so a model
cannot spend its token budget on spaces; a schema can ask otherwise through llguidance's "x-guidance"
options (`{"whitespace_flexible": true}`).
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import numpy as np
import torch

from lmlab.errors import ConfigError

COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class GrammarError(ConfigError):
    """A schema, regular expression or grammar that cannot be compiled, or a token it does not allow."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ConfigError(
            "structured output needs llguidance: pip install 'lmlab[structured]' (or pip install llguidance)"
        ) from None
    return llguidance


def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    """The llguidance grammar of texts that are JSON values valid under `schema` (compact by default)."""
    ll = _llguidance()
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return ll.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)
    except ValueError as e:
        raise GrammarError(f"the JSON schema cannot be read: {e}") from None


def regex_grammar(pattern: str) -> str:
    return _llguidance().LLMatcher.grammar_from_regex(pattern)


def lark_grammar(source: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(source)


def token_table(tokenizer: Any, vocab_size: int, eos: list[int]) -> Any:
    """llguidance's view of `tokenizer` (every token's bytes), built once per tokenizer and vocabulary
    size: `vocab_size` is the model's, which may be padded past the tokenizer's."""
    ll = _llguidance()
    tables = _TABLES.setdefault(tokenizer, {})
    key = (vocab_size, tuple(eos))
    if key not in tables:
        try:
            tables[key] = ll.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(eos))
        except Exception as e:  # noqa: BLE001  (llguidance raises plain exceptions for tokenizers it cannot read)
            raise GrammarError(f"llguidance cannot read this model's tokenizer ({tokenizer.kind}): {e}") from None
    return tables[key]


def unpack_bitmask(words: torch.Tensor, n: int) -> torch.Tensor:
    """llguidance's mask (one bit per token, 32 to an int32 word, lowest bit first) as n booleans."""
    bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[:n]
    return torch.from_numpy(bits.view(np.bool_))


class Constraint:
    """One answer's grammar state over a vocabulary of `vocab_size` tokens."""

    def __init__(self, table: Any, grammar: str) -> None:
        ll = _llguidance()
        self.vocab_size = table.vocab_size
        self.matcher = ll.LLMatcher(table, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot be compiled: {self.matcher.get_error()}")
        self.words = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)

    @classmethod
    def for_json_schema(cls, tokenizer: Any, vocab_size: int, eos: list[int], schema: dict | bool) -> Constraint:
        return cls(token_table(tokenizer, vocab_size, eos), json_schema_grammar(schema))

    def allowed(self) -> torch.Tensor:
        """A boolean vector over the vocabulary: the tokens that may come next."""
        self.matcher.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
        if self.matcher.is_error():
            raise GrammarError(f"structured output failed: {self.matcher.get_error()}")
        return unpack_bitmask(self.words, self.vocab_size)

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """Set, in place, the logits of the tokens the grammar does not allow next to -inf; returns logits."""
        allowed = self.allowed()
        if not bool(allowed.any()):
            raise GrammarError("the grammar allows no next token (and the model has no end token it allows)")
        n = min(logits.shape[-1], allowed.numel())
        logits[..., :n].masked_fill_(~allowed[:n], float("-inf"))
        logits[..., n:] = float("-inf")
        return logits

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise GrammarError(f"token {token} is not allowed here: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """True when the text is complete and nothing more may follow (the end token was taken, or the
        grammar cannot go on)."""
        return bool(self.matcher.is_stopped())


def check_json(text: str, schema: dict | bool | None = None) -> Any:
    """Parse `text` as JSON and, when jsonschema is installed and a schema given, validate it; returns
    the value (a helper for tests and callers that want the parsed answer)."""
    value = json.loads(text)
    if schema not in (None, True):
        import jsonschema

        jsonschema.validate(value, schema)
    return value
