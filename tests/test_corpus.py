"""Corpus readers: documents split as asked, and bad input named by file, line and byte."""

from __future__ import annotations

import gzip
import json

import numpy as np
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


# ---- Parquet, Arrow, datasets folders and builders ------------------------------------------------
DOCS = [f"document {i}: in the beginning {'word ' * (i % 7)}was the text, line {i}." for i in range(300)]


def _tables(tmp_path):
    """The same documents as JSONL, Parquet (several row groups), an Arrow IPC file and stream, a
    save_to_disk folder and CSV files for the csv builder."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=64)
    with pa.ipc.new_file(str(tmp_path / "file.arrow"), table.schema) as w:
        w.write_table(table, max_chunksize=50)
    with pa.ipc.new_stream(str(tmp_path / "stream.arrow"), table.schema) as w:
        w.write_table(table, max_chunksize=50)
    datasets.Dataset.from_dict({"id": list(range(len(DOCS))), "text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "csv").mkdir()
    for k in range(2):
        part = DOCS[k * 150 : (k + 1) * 150]
        lines = ["id,text"] + [f'{i},"{d}"' for i, d in enumerate(part)]
        (tmp_path / "csv" / f"part-{k}.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_parquet_arrow_datasets_folders_and_builders_read_the_jsonl_documents(tmp_path):
    from lmlab.data.corpus import read_corpus

    root = _tables(tmp_path)
    want = list(read_corpus([root / "docs.jsonl"]))
    assert want == DOCS
    for source in (
        root / "docs.parquet",
        root / "file.arrow",
        root / "stream.arrow",
        root / "saved",
        f"csv:{root}/csv/*.csv",
        f"parquet:{root}/*.parquet",
        f"json:{root}/*.jsonl",
    ):
        assert list(read_corpus([source])) == want, source


def test_a_parquet_corpus_gives_the_jsonl_token_stream(tmp_path):
    from lmlab.data.store import build_store
    from lmlab.tokenizer import train_tokenizer

    root = _tables(tmp_path)
    tok = train_tokenizer("bpe", DOCS, 300)
    streams = []
    for source in (root / "docs.jsonl", root / "docs.parquet", root / "saved", root / "stream.arrow"):
        store, _ = build_store([source], tok, tmp_path / "cache")
        assert store.n_docs == len(DOCS)
        streams.append(np.asarray(store.stream(np.arange(store.n_docs), tok.eos_id, "all")))
    assert all(np.array_equal(s, streams[0]) for s in streams[1:])


def test_bad_tables_name_the_file_the_part_and_the_columns(tmp_path):
    from lmlab.data.corpus import read_corpus

    root = _tables(tmp_path)
    with pytest.raises(DataError, match=r"docs.parquet: no column 'body' \(columns: id, text\); name the text column"):
        list(read_corpus([root / "docs.parquet"], field="body"))
    with pytest.raises(DataError, match=r"saved: no column 'body' \(columns: id, text\)"):
        list(read_corpus([root / "saved"], field="body"))
    data = (root / "docs.parquet").read_bytes()
    (root / "cut.parquet").write_bytes(data[: len(data) // 2])  # the footer gone
    with pytest.raises(DataError, match=r"cut.parquet: not a readable Parquet file"):
        list(read_corpus([root / "cut.parquet"]))
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(root / "docs.parquet").metadata
    start = meta.row_group(2).column(1).data_page_offset  # the third row group's text, overwritten
    broken = bytearray(data)
    broken[start : start + 200] = b"\xff" * 200
    (root / "broken.parquet").write_bytes(bytes(broken))
    with pytest.raises(DataError, match=r"broken.parquet: row group 2 of 5 cannot be read"):
        list(read_corpus([root / "broken.parquet"]))
    data = (root / "file.arrow").read_bytes()
    (root / "cut.arrow").write_bytes(data[:100])
    with pytest.raises(DataError, match=r"cut.arrow: not a readable Arrow file"):
        list(read_corpus([root / "cut.arrow"]))
    with pytest.raises(DataError, match=r"'wikitext' is not one of datasets' local builders .* downloaded first"):
        list(read_corpus(["wikitext:wikitext-103-raw-v1"]))
    with pytest.raises(DataError, match=r"the pattern .* matches no file"):
        list(read_corpus([f"parquet:{root}/nothing/*.parquet"]))
    with pytest.raises(DataError, match=r"docs.jsonl: the parquet builder reads .parquet files"):
        list(read_corpus([f"parquet:{root}/docs.jsonl"]))
