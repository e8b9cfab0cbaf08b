"""Read documents from .txt / .jsonl files (gzip-compressed or not), with errors that say where.

Text files hold one document per line (doc_sep="line") or documents separated by blank lines
(doc_sep="blank"). JSONL files hold one JSON object per line; `field` names the text.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lmlab.errors import DataError

DOC_SEPS = ("line", "blank")
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz", ".text", ".gz")


@dataclass
class ReadStats:
    documents: int = 0
    lines: int = 0
    skipped_lines: int = 0  # not UTF-8 or not JSON, skipped with skip_bad_lines


def demo_corpus(name: str = "kjv") -> Path:
    """Path of a built-in corpus: "kjv" (King James Bible, English) or "zh-poems" (Tang and Song poems)."""
    path = Path(str(resources.files("lmlab.data") / "demo" / f"{name}.txt.gz"))
    if not path.is_file():
        raise DataError(f"no built-in corpus {name!r}; built-in corpora: kjv, zh-poems")
    return path


def corpus_files(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """Files named directly, and the corpus files inside named folders (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
            if not found:
                raise DataError(f"{p}: folder holds no corpus files ({', '.join(SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


BOM = "\ufeff"  # what Windows editors put at the start of a UTF-8 file: not part of the text


def text_lines(text: str) -> list[str]:
    """The lines of a text: split at "\n" (a "\r" before it dropped), and nowhere else. (str.splitlines
    also splits at U+2028, U+0085 and other characters a JSON string or a token may hold.)"""
    return [line.rstrip("\r") for line in text.split("\n")]


def read_utf8(path: str | os.PathLike[str]) -> str:
    """A whole text file (without a leading byte-order mark), or a DataError naming the file, the line
    and the byte that is not UTF-8."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: line {line}, byte offset {e.start}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
            "convert the file to UTF-8"
        ) from None


def _is_jsonl(path: Path) -> bool:
    name = path.name.removesuffix(".gz")
    return name.endswith((".jsonl", ".json"))


def _lines(path: Path, stats: ReadStats, skip_bad_lines: bool) -> Iterator[tuple[int, str]]:
    """(line number, text) with the newline stripped; undecodable lines raise or are counted and skipped."""
    opener = gzip.open if path.name.endswith(".gz") else open
    offset = 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                stats.lines += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    if skip_bad_lines:
                        stats.skipped_lines += 1
                        offset += len(raw)
                        continue
                    where = "uncompressed byte offset" if path.name.endswith(".gz") else "byte offset"
                    raise DataError(
                        f"{path}: line {number}, {where} {offset + e.start}: not valid UTF-8 (byte "
                        f"0x{raw[e.start]:02x}); convert the file to UTF-8 or pass --skip-bad-lines to skip such "
                        "lines"
                    ) from None
                offset += len(raw)
                if number == 1:
                    text = text.removeprefix(BOM)
                yield number, text.rstrip("\r\n")
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a gzip stream corrupted inside
        if isinstance(e, (gzip.BadGzipFile, EOFError, zlib.error)) or "gzip" in str(e).lower():
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
        raise DataError(f"{path}: cannot be read ({e})") from None


def read_documents(
    path: str | os.PathLike[str],
    doc_sep: str = "line",
    field: str = "text",
    skip_bad_lines: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Yield the documents of one file. Raises DataError naming the file and line for bad input."""
    path = Path(path)
    if doc_sep not in DOC_SEPS:
        raise DataError(f"doc_sep {doc_sep!r} is unknown; expected one of {', '.join(DOC_SEPS)}")
    stats = stats if stats is not None else ReadStats()
    before, lines_before, skipped_before = stats.documents, stats.lines, stats.skipped_lines
    if _is_jsonl(path):
        for number, line in _lines(path, stats, skip_bad_lines):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_bad_lines:
                    stats.skipped_lines += 1
                    continue
                raise DataError(f"{path}: line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or field not in obj:
                if skip_bad_lines:
                    stats.skipped_lines += 1
                    continue
                fields = ", ".join(map(str, obj)) if isinstance(obj, dict) else f"a {type(obj).__name__}"
                raise DataError(
                    f"{path}: line {number}: no field {field!r} (found: {fields}); name the text field with --field"
                )
            text = obj[field]
            if not isinstance(text, str):
                raise DataError(f"{path}: line {number}: field {field!r} holds {type(text).__name__}, expected text")
            if text.strip():
                stats.documents += 1
                yield text
    elif doc_sep == "line":
        for _, line in _lines(path, stats, skip_bad_lines):
            if line.strip():
                stats.documents += 1
                yield line
    else:
        buf: list[str] = []
        for _, line in _lines(path, stats, skip_bad_lines):
            if line.strip():
                buf.append(line)
            elif buf:
                stats.documents += 1
                yield "\n".join(buf)
                buf = []
        if buf:
            stats.documents += 1
            yield "\n".join(buf)
    if stats.documents == before:
        lines, skipped = stats.lines - lines_before, stats.skipped_lines - skipped_before
        what = "is empty" if lines == 0 else f"has {lines} line(s) but no text"
        if skipped:
            what += f" ({skipped} line(s) skipped as unreadable)"
        raise DataError(f"{path}: no documents: the file {what}")


def read_corpus(
    paths: list[str | os.PathLike[str]],
    doc_sep: str = "line",
    field: str = "text",
    skip_bad_lines: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Documents of several files or folders, in order."""
    for path in corpus_files(paths):
        yield from read_documents(path, doc_sep, field, skip_bad_lines, stats)
