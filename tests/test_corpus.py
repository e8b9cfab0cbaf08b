"""Corpus readers: documents split as asked, and bad input named by file, line and byte."""

from __future__ import annotations

import gzip
import json

import pytest

from lmlab.data.corpus import ReadStats, read_corpus, read_documents
from lmlab.errors import DataError


def test_line_and_blank_separated_documents(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("a b\nc d\n\ne f\n\n\ng\n")
    assert list(read_documents(f, doc_sep="line")) == ["a b", "c d", "e f", "g"]
    assert list(read_documents(f, doc_sep="blank")) == ["a b\nc d", "e f", "g"]


def test_jsonl_field_and_gzip(tmp_path):
    f = tmp_path / "c.jsonl.gz"
    with gzip.open(f, "wt") as g:
        g.write(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert list(read_documents(f, field="body")) == ["one", "two"]


def test_folder_reads_every_corpus_file_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "notes.md").write_text("ignored\n")
    assert list(read_corpus([tmp_path])) == ["first", "second"]


def test_empty_file_is_an_error(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: no documents: the file is empty"):
        list(read_documents(f))
    f.write_text("\n  \n")
    with pytest.raises(DataError, match="has 2 line"):
        list(read_documents(f))


def test_non_utf8_reports_line_and_byte_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"fine line\ncaf\xe9 au lait\nlast\n")
    with pytest.raises(DataError, match=r"latin1\.txt: line 2, byte offset 13: not valid UTF-8 \(byte 0xe9\)"):
        list(read_documents(f))


def test_skip_bad_lines_counts_them(tmp_path):
    f = tmp_path / "mixed.txt"
    f.write_bytes(b"good\n\xff\xfe bad\nalso good\n")
    stats = ReadStats()
    assert list(read_documents(f, skip_bad_lines=True, stats=stats)) == ["good", "also good"]
    assert stats.skipped_lines == 1


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"c\.jsonl: line 2: not valid JSON"):
        list(read_documents(f))
    f.write_text('{"text": "ok"}\n{"body": "x", "id": 3}\n')
    with pytest.raises(DataError, match=r"line 2: no field 'text' \(found: body, id\)"):
        list(read_documents(f))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.txt: no such file"):
        list(read_corpus([tmp_path / "nope.txt"]))
