"""Every reader fuzzed with hypothesis: a file of random bytes, or a valid file mutated (cut short,
bytes flipped, spans deleted or inserted, lines swapped), handed to the reader lmlab uses for it.
What may come out: a result, or one of lmlab's own errors (LmlabError) naming the file. Anything
else is a defect: another exception, a call that runs past 5 s (a hang), or a silent wrong result.

Silent wrong results are caught by a reference reader per format, written here from the format's
own rules with the standard library's parsers (json, gzip, yaml, the tokenizers library), not from
lmlab's code: what it reads from each input must be what lmlab read, an input it refuses must be
refused by lmlab too, and one it reads must not be refused. The rules: a file is UTF-8 (a leading
byte-order mark is not text); a line ends at "\n" (a "\r" before it dropped), nowhere else; blank
lines carry nothing; JSON values must have the types the format gives them.

    python -m tests.reliability fuzz --examples 2000
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import signal
import tempfile
import traceback
import zlib
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


# ---- reference readers: what an input holds by its format's rules (Invalid: it should be refused) ----
class Invalid(Exception):
    pass


def _text(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("not UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def _lines(text: str) -> list[str]:
    return [line.rstrip("\r") for line in text.split("\n")]


def _gunzip(data: bytes) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise Invalid(f"not gzip ({e})") from None


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise Invalid(f"not JSON ({e})") from None


def _nonempty(items: list) -> list:
    if not items:
        raise Invalid("nothing in it")
    return items


def ref_lines(data: bytes) -> list[str]:
    return _nonempty([line for line in _lines(_text(data)) if line.strip()])


def ref_blocks(data: bytes) -> list[str]:
    blocks, block = [], []
    for line in _lines(_text(data)) + [""]:
        if line.strip():
            block.append(line)
        elif block:
            blocks.append("\n".join(block))
            block = []
    return _nonempty(blocks)


def _records(data: bytes) -> list[dict]:
    out = []
    for line in _lines(_text(data)):
        if line.strip():
            record = _json(line)
            if not isinstance(record, dict):
                raise Invalid("a line that is not a JSON object")
            out.append(record)
    return _nonempty(out)


def ref_jsonl_corpus(data: bytes) -> list[str]:
    out = []
    for record in _records(data):
        if not isinstance(record.get("text"), str):
            raise Invalid("a record without a text")
        if record["text"].strip():
            out.append(record["text"])
    return _nonempty(out)


def ref_tsv(data: bytes) -> list[tuple]:
    """Tab-separated, no quoting: a header row, then rows of as many cells."""
    records = re.split(r"\r\n|\r|\n", _text(data))
    header, out = records[0].split("\t"), []
    if "text" not in header or "label" not in header:
        raise Invalid("no text or label column")
    for r in records[1:]:
        if r == "":
            continue
        cells = r.split("\t")
        if len(cells) != len(header):
            raise Invalid("a row of another width")
        row = dict(zip(header, cells))
        out.append(((row["text"],), row["label"]))
    return _nonempty(out)


def ref_jsonl_table(data: bytes) -> list[tuple]:
    out = []
    for record in _records(data):
        text, label = record.get("text"), record.get("label", ...)
        if not isinstance(text, str) or label is ... or not isinstance(label, (str, int, float)):
            raise Invalid("a record without a text and a label")
        out.append(((text,), label))
    return out


def check_csv(data: bytes, result: Any) -> str | None:
    """CSV (RFC 4180 quoting): the reference is Python's csv module itself, which lmlab uses too; so
    only what it cannot vouch for is checked: every text and label is text that the file holds."""
    text = _text(data)
    plain = text.replace('""', '"')
    for ex in result:
        for value in [*ex.texts, ex.label]:
            if not isinstance(value, str):
                return f"a {type(value).__name__} where the file holds text: {value!r}"
            if value not in plain and value not in text:
                return f"{value!r} is not in the file"
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if len(result) != sum(1 for r in rows[1:] if r):
        return f"{len(result)} examples from {sum(1 for r in rows[1:] if r)} rows"
    return None


def ref_conll(data: bytes) -> list[tuple]:
    sentences, words, tags = [], [], []
    for line in _lines(_text(data)) + [""]:
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                sentences.append((tuple(words), tuple(tags)))
            words, tags = [], []
            continue
        if len(parts) < 2:
            raise Invalid("a token without its tag")
        words.append(parts[0])
        tags.append(parts[-1])
    return _nonempty(sentences)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"an offset that is not an integer: {value!r}")
    return value


def ref_squad(data: bytes) -> list[tuple]:
    """SQuAD v1.1 / v2.0: every answer's text at its character offset (0 or more) in its context."""
    doc, out = _json(_text(data)), []
    try:
        for article in doc["data"]:
            for para in article["paragraphs"]:
                context = para["context"]
                if not isinstance(context, str):
                    raise Invalid("a context that is not text")
                for qa in para["qas"]:
                    if not isinstance(qa["question"], str) or not isinstance(qa["id"], (str, int)):
                        raise Invalid("a question or id that is not text")
                    answers = []
                    for a in qa.get("answers", []):
                        start, text = _int(a["answer_start"]), a["text"]
                        if not isinstance(text, str) or start < 0 or context[start : start + len(text)] != text:
                            raise Invalid("an answer not at its offset")
                        answers.append((text, start))
                    impossible = bool(qa.get("is_impossible", False)) or not answers
                    out.append((str(qa["id"]), qa["question"], context, () if impossible else tuple(answers)))
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise Invalid(f"not SQuAD ({e})") from None
    return _nonempty(out)


def ref_pairs(data: bytes) -> list[tuple]:
    out = []
    for record in _records(data):
        source, target = record.get("source"), record.get("target")
        if not isinstance(source, str) or not isinstance(target, str) or not source.strip() or not target.strip():
            raise Invalid("a pair without a source or a target")
        out.append((source, target))
    return out


def check_chat(data: bytes, result: Any) -> str | None:
    """Every conversation is a line's messages, each with a role and text."""
    records = _records(data)
    if len(result) != len(records):
        return f"{len(result)} conversations from {len(records)} records"
    for (_, messages), record in zip(result, records):
        given = record.get("messages")
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"a message without a role or text: {m!r}"
        if isinstance(given, list) and [m.get("content") for m in messages] != [
            g.get("content") if isinstance(g, dict) else None for g in given
        ]:
            return "messages that are not the record's"
    return None


def check_yaml(data: bytes, result: Any) -> str | None:
    """Every setting the file gives (top level and under train:) has its value in the config."""
    import yaml

    given = yaml.safe_load(_text(data))
    given = {} if given is None else given  # an empty file: every setting its default
    if not isinstance(given, dict):
        return "a config from a file that is not a mapping"
    train = given.get("train") or {}
    for where, values, obj in (("", given, result), ("train.", train, getattr(result, "train", None))):
        for key, value in values.items():
            if key == "train" or not isinstance(key, str) or not hasattr(obj, key):
                continue
            have = getattr(obj, key)
            if have != value and not (isinstance(value, int) and isinstance(have, float) and have == value):
                return f"{where}{key}: the file says {value!r}, the config holds {have!r}"
    return None


def ref_tokenizer(data: bytes) -> list[int]:
    from tokenizers import Tokenizer

    try:
        text = data.decode("utf-8")  # as the library reads it (a byte-order mark included)
        return Tokenizer.from_str(text).encode("in the beginning").ids
    except UnicodeDecodeError as e:
        raise Invalid("not UTF-8") from e
    except Exception as e:  # noqa: BLE001  (the library's own refusal)
        raise Invalid(f"the tokenizers library refuses it ({e})") from None


@dataclass
class Reader:
    suffix: str
    valid: Callable[[], bytes]
    read: Callable[[Path], Any]
    count: int  # what the valid file holds: documents, examples, pairs, conversations (-1: not checked)
    expect: Callable[[bytes], Any] | None = None  # the reference reader (raises Invalid)
    view: Callable[[Any], Any] = lambda result: result  # lmlab's result, in the reference's terms
    check: Callable[[bytes, Any], str | None] | None = None  # a property of a result, where no reference is


def _gz(reference: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    return lambda data: reference(_gunzip(data))


def _examples(result: Any) -> list[tuple]:
    return [(tuple(ex.texts), ex.label) for ex in result]


def _sentences(result: Any) -> list[tuple]:
    return [(tuple(ex.words), tuple(ex.label)) for ex in result]


def _questions(result: Any) -> list[tuple]:
    return [(e.id, e.question, e.context, tuple(e.answers)) for e in result]


def _pairs_of(result: Any) -> list[tuple]:
    return [(p.source, p.target) for p in result]


TEXT = b"in the beginning\nand the earth\n\nwas without form\n"
READERS: dict[str, Reader] = {
    "corpus text, a document per line": Reader(".txt", lambda: TEXT, _corpus, 3, ref_lines),
    "corpus text, blank-line separated": Reader(".txt", lambda: TEXT, lambda p: _corpus(p, "blank"), 2, ref_blocks),
    "corpus JSONL": Reader(".jsonl", lambda: b'{"text": "in the beginning"}\n{"text": "and the earth"}\n', _corpus, 2, ref_jsonl_corpus),
    "corpus gzip": Reader(".txt.gz", lambda: gzip.compress(b"in the beginning\nand the earth\n"), _corpus, 2, _gz(ref_lines)),
    "corpus JSONL gzip": Reader(".jsonl.gz", lambda: gzip.compress(b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n'), _corpus, 3, _gz(ref_jsonl_corpus)),
    "classification TSV": Reader(".tsv", lambda: b"text\tlabel\nthe lord\tholy\nthe field\tland\n", _table, 2, ref_tsv, _examples),
    "classification JSONL": Reader(".jsonl", lambda: b'{"text": "the lord", "label": "holy"}\n{"text": "the field", "label": 2}\n', _table, 2, ref_jsonl_table, _examples),
    "classification CSV": Reader(".csv", lambda: b'text,label\n"the lord, the king",holy\nthe field,land\n', _table, 2, check=check_csv),
    "CoNLL": Reader(".conll", lambda: b"the O\nlord B-GOD\n\nin O\negypt B-LOC\n", _conll, 2, ref_conll, _sentences),
    "SQuAD JSON": Reader(".json", lambda: json.dumps(SQUAD, indent=1).encode(), _squad, 1, ref_squad, _questions),
    "seq2seq JSONL": Reader(".jsonl", lambda: b'{"source": "thee", "target": "you"}\n{"source": "thou", "target": "you"}\n', _pairs, 2, ref_pairs, _pairs_of),
    "chat JSONL": Reader(".jsonl", lambda: "".join(json.dumps(c) + "\n" for c in CHAT).encode(), _chat, 2, check=check_chat),
    "YAML config": Reader(".yaml", lambda: b"family: decoder\nseq_len: 64\ntrain:\n  max_steps: 3\n  lr: 0.001\n", _yaml, -1, check=check_yaml),
    "tokenizer.json": Reader(".json", _tokenizer_file, _tokenizer, -1, ref_tokenizer),
}  # fmt: skip


def _mutate(draw: st.DrawFn, data: bytes) -> bytes:
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cut", "flip", "delete", "insert", "swap lines", "duplicate", "bom"]))
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
                            b"\xef\xbb\xbf",  # a UTF-8 byte-order mark
                            b"\xc2\x85",  # U+0085, which str.splitlines takes for a line end
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
        elif kind == "bom":  # what Windows editors write first
            data = b"\xef\xbb\xbf" + data
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
    """("ok" | "lmlab error" | "defect", detail) for one input, its result judged by the reference."""
    outcome, detail, result = _read(reader, data, folder)
    if outcome == "defect":
        return outcome, detail
    return judge(reader, data, outcome, result) or (outcome, detail)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 160 else text[:160] + "..."


def judge(reader: Reader, data: bytes, outcome: str, result: Any) -> tuple[str, str] | None:
    """A defect if lmlab's outcome is not the reference's: a wrong result, a file read that should be
    refused, or one refused that should be read."""
    if reader.expect is not None:
        try:
            want: Any = reader.expect(data)
        except Invalid as e:
            if outcome == "ok":
                return (
                    "defect",
                    f"wrong result: read a file it should refuse ({e}), giving {_short(reader.view(result))}",
                )
            return None
        if outcome != "ok":
            return "defect", f"wrong result: refused a file that holds {_short(want)}"
        got = reader.view(result)
        if got != want:
            return "defect", f"wrong result: read {_short(got)}, the file holds {_short(want)}"
        return None
    if reader.check is not None and outcome == "ok":
        try:
            problem = reader.check(data, result)
        except Invalid as e:
            problem = f"read a file it should refuse ({e})"
        if problem:
            return "defect", f"wrong result: {problem}"
    return None


def _read(reader: Reader, data: bytes, folder: Path) -> tuple[str, str, Any]:
    path = folder / f"input{reader.suffix}"
    if reader.read is _tokenizer:
        path = folder / "tokenizer.json"
    path.write_bytes(data)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    try:
        return "ok", "", reader.read(path)
    except LmlabError as e:
        if str(path) not in str(e) and path.name not in str(e):
            return "defect", f"an lmlab error that does not name the file: {type(e).__name__}: {e}", None
        return "lmlab error", "", None
    except _Hang as e:
        return "defect", f"hang: {e}", None
    except Exception as e:  # noqa: BLE001  (the point: what else comes out)
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return "defect", f"{type(e).__name__}: {e} (at {Path(tb.filename).name}:{tb.lineno})", None
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
                if detail.startswith("wrong result: "):  # one entry per kind of wrong result
                    detail_key = re.sub(r" \(.*|,? the file .*| \[.*| '.*", "", detail)[:60]
                    if detail_key not in defects or len(data) < len(defects[detail_key][1]):
                        defects[detail_key] = (detail, data)
                    return
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
