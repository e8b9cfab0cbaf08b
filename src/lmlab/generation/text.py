"""A row's text as its tokens arrive: each id decoded once, stop strings searched only where a token
added text (linear, not quadratic, in the length of the answer), and, for streaming, the part of the
text that is safe to send: whole characters, and nothing that may yet grow into a stop string."""

from __future__ import annotations

from typing import Any


class IncrementalText:
    """The text of a growing row of new ids, each id decoded once (tokenizers' DecodeStream, for lmlab's
    tokenizers; another tokenizer's `decode` of the whole row otherwise), and whether it now holds a
    stop string: only the text a token added (and the stop's length before it) is searched, so a long
    answer costs linear, not quadratic, time."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        backend = getattr(tokenizer, "backend", None)
        self.tokenizer, self.backend, self.stops = tokenizer, backend, stops
        self.longest = max((len(s) for s in stops), default=0)
        self.ids: list[int] = []
        self.text = ""
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(skip_special_tokens=True)  # as lmlab's Tokenizer.decode

    def add(self, token: int) -> bool:
        """Append one id; True when the text now holds a stop string."""
        if self.backend is None:
            self.ids.append(token)
            self.text = self.tokenizer.decode(self.ids)
            return any(s in self.text for s in self.stops)
        piece = self.stream.step(self.backend, token) or ""  # "" until a multi-byte character completes
        if not piece:
            return False
        self.text += piece
        tail = self.text[-(len(piece) + self.longest - 1) :] if self.longest > 1 else piece
        return any(s in tail for s in self.stops)


class StreamText:
    """What a streamed answer sends: `add` each token; `pending()` is the text not yet sent that is safe
    to send; once `add` returns True (a stop string), `until_stop()` is the rest up to the stop string
    (through it with include_stop); `pending(final=True)` ends the answer with the rest of its text."""

    def __init__(self, tokenizer: Any, stops: list[str], include_stop: bool = False) -> None:
        self.tokenizer, self.stops, self.include_stop = tokenizer, stops, include_stop
        self.text = IncrementalText(tokenizer, [])
        self.ids: list[int] = []
        self.sent = 0  # characters already sent
        self.cut: int | None = None  # where the text ends, once a stop string is found

    def add(self, token: int) -> bool:
        """Append one id; True when the text now holds a stop string (the answer ends there)."""
        self.ids.append(token)
        before = len(self.text.text)
        self.text.add(token)
        if not self.stops:
            return False
        text = self.text.text  # a stop not found before ends in what this token added
        hits = [(i, len(x)) for x in self.stops if (i := text.find(x, max(0, before - len(x) + 1))) >= 0]
        if hits:
            at, size = min(hits)
            self.cut = at + size if self.include_stop else at
        return self.cut is not None

    def until_stop(self) -> str:
        piece = self.text.text[self.sent : self.cut] if self.cut > self.sent else ""
        self.sent = max(self.sent, self.cut)
        return piece

    def pending(self, final: bool = False) -> str:
        """The text not yet sent that is safe to send (all of it when final: the whole text decoded once,
        as `decode` gives it)."""
        text = self.tokenizer.decode(self.ids) if final else self.text.text
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            for stop in self.stops:  # hold back a tail that may grow into a stop string
                for k in range(min(len(stop) - 1, end - self.sent), 0, -1):
                    if text[end - k : end] == stop[:k]:
                        end -= k
                        break
        piece = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece
