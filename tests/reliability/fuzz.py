"""Every reader fuzzed with hypothesis: a file of random bytes, or a valid file mutated (cut short,
bytes flipped, spans deleted or inserted, lines swapped), handed to the reader lmlab uses for it.
What may come out: a result, or one of lmlab's own errors (LmlabError) naming the file. Anything
else is a defect: another exception, a call that runs past 5 s (a hang), or a valid file whose
result is not the one it encodes.

    python -m tests.reliability fuzz --examples 2000
"""

from __future__ import annotations

import gzip
import json
import signal
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.errors import LmlabError

HANG_SECONDS = 5


def _corpus(path: Path, doc_sep: str = "line") -> Any:
    from lmlab.data.corpus import read_documents

    return list(read_documents(path, doc_sep))


def _table(path: Path) -> Any:
    from lmlab.tasks.classify import read_table

    return read_table(path)[0]


def _conll(path: Path) -> Any:
    from lmlab.tasks.ner import read_conll

    return read_conll(path)


def _squad(path: Path) -> Any:
    from lmlab.tasks.qa import read_squad

    return read_squad(path)


def _pairs(path: Path) -> Any:
    from lmlab.tasks.seq2seq import read_pairs

    return read_pairs(path)


def _chat(path: Path) -> Any:
    from lmlab.tasks.chat import read_conversations

    return read_conversations(path)


def _yaml(path: Path) -> Any:
    from lmlab.settings import PretrainConfig, load_yaml

    return PretrainConfig.from_dict(load_yaml(path), str(path))


def _tokenizer(path: Path) -> Any:
    from lmlab.tokenizer import load_tokenizer

    return load_tokenizer(path).encode("in the beginning")


def _tokenizer_file() -> bytes:
    from lmlab.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as d:
        train_tokenizer("bpe", ["in the beginning god created the heaven and the earth"] * 20, 300).save(d)
        return (Path(d) / "tokenizer.json").read_bytes()


CHAT = [
    {"messages": [{"role": "user", "content": "who made the earth?"}, {"role": "assistant", "content": "god"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "peace"}]},
]  # fmt: skip
SQUAD = {
    "data": [
        {
            "paragraphs": [
                {
                    "context": "In the beginning God created the heaven and the earth.",
                    "qas": [{"id": "q1", "question": "Who created?", "answers": [{"text": "God", "answer_start": 17}]}],
                }
            ]
        }
    ]
}


@dataclass
class Reader:
    suffix: str
    valid: Callable[[], bytes]
    read: Callable[[Path], Any]
    count: int  # what the valid file holds: documents, examples, pairs, conversations (-1: not checked)


READERS: dict[str, Reader] = {
    "corpus text, a document per line": Reader(".txt", lambda: b"in the beginning\nand the earth\n\nwas without form\n", _corpus, 3),
    "corpus text, blank-line separated": Reader(".txt", lambda: b"in the beginning\nand the earth\n\nwas without form\n", lambda p: _corpus(p, "blank"), 2),
    "corpus JSONL": Reader(".jsonl", lambda: b'{"text": "in the beginning"}\n{"text": "and the earth"}\n', _corpus, 2),
    "corpus gzip": Reader(".txt.gz", lambda: gzip.compress(b"in the beginning\nand the earth\n"), _corpus, 2),
    "corpus JSONL gzip": Reader(".jsonl.gz", lambda: gzip.compress(b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n'), _corpus, 3),
    "classification TSV": Reader(".tsv", lambda: b"text\tlabel\nthe lord\tholy\nthe field\tland\n", _table, 2),
    "classification CSV": Reader(".csv", lambda: b'text,label\n"the lord, the king",holy\nthe field,land\n', _table, 2),
    "CoNLL": Reader(".conll", lambda: b"the O\nlord B-GOD\n\nin O\negypt B-LOC\n", _conll, 2),
    "SQuAD JSON": Reader(".json", lambda: json.dumps(SQUAD, indent=1).encode(), _squad, 1),
    "seq2seq JSONL": Reader(".jsonl", lambda: b'{"source": "thee", "target": "you"}\n{"source": "thou", "target": "you"}\n', _pairs, 2),
    "chat JSONL": Reader(".jsonl", lambda: "".join(json.dumps(c) + "\n" for c in CHAT).encode(), _chat, 2),
    "YAML config": Reader(".yaml", lambda: b"family: decoder\nseq_len: 64\ntrain:\n  max_steps: 3\n  lr: 0.001\n", _yaml, -1),
    "tokenizer.json": Reader(".json", _tokenizer_file, _tokenizer, -1),
}  # fmt: skip


def _mutate(draw: st.DrawFn, data: bytes) -> bytes:
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cut", "flip", "delete", "insert", "swap lines", "duplicate"]))
        n = len(data)
        if kind == "cut":
            data = data[: draw(st.integers(0, n))]
        elif kind == "flip" and n:
            i = draw(st.integers(0, n - 1))
            data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1 :]
        elif kind == "delete" and n:
            i = draw(st.integers(0, n - 1))
            data = data[:i] + data[i + draw(st.integers(1, 16)) :]
        elif kind == "insert":
            i = draw(st.integers(0, n))
            junk = draw(
                st.one_of(
                    st.binary(max_size=12),
                    st.sampled_from(
                        [
                            b"\x00",
                            b"\xff\xfe",
                            b'"',
                            b"{",
                            b"\t",
                            b"\n\n",
                            b"\r",
                            b"[]",
                            b"null",
                            b"-1",
                            b"1e999",
                            "\u2028".encode(),
                        ]
                    ),
                )
            )
            data = data[:i] + junk + data[i:]
        elif kind == "swap lines":
            lines = data.split(b"\n")
            if len(lines) > 1:
                i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
                data = b"\n".join(lines)
        elif kind == "duplicate" and n:
            i = draw(st.integers(0, n - 1))
            data = data[:i] + data[i : i + draw(st.integers(1, 64))] * 2 + data[i + 64 :]
    return data


@st.composite
def contents(draw: st.DrawFn, valid: bytes) -> bytes:
    base = draw(
        st.sampled_from(["random", "mutated", "mutated", "mutated gzip" if valid[:2] == b"\x1f\x8b" else "mutated"])
    )
    if base == "random":
        return draw(st.binary(max_size=400))
    if base == "mutated gzip":  # the stream inside, mutated, compressed again (a valid gzip of bad text)
        return gzip.compress(_mutate(draw, gzip.decompress(valid)))
    return _mutate(draw, valid)


class _Hang(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Hang(f"no answer in {HANG_SECONDS} s")


def call(reader: Reader, data: bytes, folder: Path) -> tuple[str, str]:
    """("ok" | "lmlab error" | "defect", detail) for one input."""
    path = folder / f"input{reader.suffix}"
    if reader.read is _tokenizer:
        path = folder / "tokenizer.json"
    path.write_bytes(data)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    try:
        reader.read(path)
        return "ok", ""
    except LmlabError as e:
        if str(path) not in str(e) and path.name not in str(e):
            return "defect", f"an lmlab error that does not name the file: {type(e).__name__}: {e}"
        return "lmlab error", ""
    except _Hang as e:
        return "defect", f"hang: {e}"
    except Exception as e:  # noqa: BLE001  (the point: what else comes out)
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return "defect", f"{type(e).__name__}: {e} (at {Path(tb.filename).name}:{tb.lineno})"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def campaign(name: str, examples: int, seed: int = 0) -> dict[str, Any]:
    """Run `examples` inputs through the reader `name`; the counts and the defects (minimal inputs)."""
    reader = READERS[name]
    valid = reader.valid()
    counts = {"ok": 0, "lmlab error": 0, "defect": 0}
    defects: dict[str, tuple[str, bytes]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        outcome, detail = call(reader, valid, folder)  # the valid file reads, and holds what it should
        if outcome != "ok":
            defects["valid"] = (f"the valid file: {detail}", valid)
        elif reader.count >= 0 and len(reader.read(folder / (f"input{reader.suffix}"))) != reader.count:
            got = len(reader.read(folder / f"input{reader.suffix}"))
            defects["valid"] = (f"the valid file gave {got} items, not {reader.count}", valid)

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[p for p in __import__("hypothesis").Phase if p.name != "shrink"],
        )
        @given(contents(valid))
        def run(data: bytes) -> None:
            outcome, detail = call(reader, data, folder)
            counts[outcome] += 1
            if outcome == "defect":  # one entry per exception type and place, with its shortest input
                kind, _, rest = detail.partition(": ")
                key = f"{kind} at {rest.rsplit(' (at ', 1)[-1].rstrip(')')}" if " (at " in rest else detail[:160]
                if key not in defects or len(data) < len(defects[key][1]):
                    defects[key] = (detail, data)

        run()
    return {
        "reader": name,
        "examples": sum(counts.values()),
        "accepted": counts["ok"],
        "lmlab_errors": counts["lmlab error"],
        "defects": [{"problem": d, "input": v[:300].decode("latin-1")} for d, v in defects.values()],
    }
