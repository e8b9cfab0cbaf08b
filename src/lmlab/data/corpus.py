"""Read documents from .txt / .jsonl files (gzip-compressed or not), Parquet and Arrow files, folders
that Hugging Face `datasets` saved (`save_to_disk`) and `datasets`' local builders, with errors that
say where.

Text files hold one document per line (doc_sep="line") or documents separated by blank lines
(doc_sep="blank"). JSONL files hold one JSON object per line; `field` names the text. Parquet and
Arrow files (a table with a text column, `field`) are read a row group / record batch at a time with
pyarrow; a `save_to_disk` folder through `datasets.load_from_disk`; `BUILDER:PATTERN` (csv, json,
text, parquet, arrow) names the files of one of `datasets`' local builders by a glob, CSV files being
read by `datasets`' csv builder, the others by the readers above. Everything is read offline (the
`datasets` extra: pip install 'lmlab[datasets]').
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
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz", ".text", ".gz", ".parquet", ".arrow")
# datasets' packaged builders that read local files, and the files each takes
BUILDERS = {
    "csv": (".csv", ".tsv"),
    "json": (".json", ".jsonl", ".json.gz", ".jsonl.gz"),
    "text": (".txt", ".text", ".txt.gz"),
    "parquet": (".parquet",),
    "arrow": (".arrow",),
}


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


def is_saved_dataset(path: Path) -> bool:
    """A folder `datasets.Dataset.save_to_disk` wrote (or one split of a DatasetDict's)."""
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _builder_files(spec: str) -> list[Path]:
    """The files `BUILDER:PATTERN` names (a glob), checked against what the builder reads."""
    import glob

    builder, pattern = spec.split(":", 1)
    if builder not in BUILDERS:
        raise DataError(
            f"{spec}: {builder!r} is not one of datasets' local builders ({', '.join(BUILDERS)}); lmlab reads data "
            "offline, so a dataset on the Hugging Face Hub has to be downloaded first (huggingface-cli download "
            "--repo-type dataset NAME --local-dir DIR) and its files named (--data parquet:DIR/**/*.parquet)"
        )
    found = sorted(Path(f) for f in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(f).is_file())
    if not found:
        raise DataError(f"{spec}: the pattern {pattern!r} matches no file")
    wrong = [f for f in found if not f.name.endswith(BUILDERS[builder])]
    if wrong:
        raise DataError(f"{wrong[0]}: the {builder} builder reads {', '.join(BUILDERS[builder])} files")
    return found


def corpus_files(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """Files named directly, `datasets` folders, the files a `BUILDER:PATTERN` names, and the corpus files
    inside other named folders (sorted)."""
    files: list[Path] = []
    for raw in paths:
        text = str(raw)
        builder = text.split(":", 1)[0]
        if ":" in text and not Path(text).exists() and len(builder) > 1 and "/" not in builder:
            files += _builder_files(text)
            continue
        p = Path(raw)
        if is_saved_dataset(p):
            files.append(p)
        elif p.is_dir():
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


# ---- tables: Parquet, Arrow, datasets folders, CSV --------------------------------------------------
def _datasets() -> object:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach for the Hub
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading Parquet, Arrow, CSV and datasets folders needs pip install 'lmlab[datasets]'"
        ) from None
    return datasets


def _column(path: Path, names: list[str], field: str) -> None:
    if field not in names:
        raise DataError(
            f"{path}: no column {field!r} (columns: {', '.join(names) or 'none'}); name the text column with --field"
        )


def _texts(path: Path, where: str, values: list[object], field: str) -> Iterator[str]:
    for k, text in enumerate(values):
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{path}: {where}, row {k}: column {field!r} holds {type(text).__name__}, expected text")
        if text.strip():
            yield text


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    _datasets()
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    _column(path, table.schema_arrow.names, field)
    for group in range(table.num_row_groups):
        try:
            values = table.read_row_group(group, columns=[field]).column(0).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: row group {group} of {table.num_row_groups} cannot be read ({e})") from None
        yield from _texts(path, f"row group {group}", values, field)


def _arrow_documents(path: Path, field: str) -> Iterator[str]:
    """An Arrow IPC file (Feather v2) or stream (what `datasets` writes in its cache and save_to_disk)."""
    _datasets()
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            schema = reader.schema
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches, schema = iter(reader), reader.schema
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow file ({e})") from None
    _column(path, schema.names, field)
    k = 0
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: record batch {k} cannot be read ({e})") from None
        if batch is None:
            return
        yield from _texts(path, f"record batch {k}", batch.column(field).to_pylist(), field)
        k += 1


def _saved_documents(path: Path, field: str) -> Iterator[str]:
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001  (datasets raises many kinds for a damaged folder)
        raise DataError(f"{path}: not a readable datasets folder ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(
            f"{path}: a DatasetDict (splits {', '.join(ds)}); name one split's folder, e.g. {path / next(iter(ds))}"
        )
    _column(path, ds.column_names, field)
    for start in range(0, len(ds), 1000):
        yield from _texts(path, f"rows {start}-", ds[start : start + 1000][field], field)


def _csv_documents(path: Path, field: str) -> Iterator[str]:
    datasets = _datasets()
    options = {"delimiter": "\t"} if path.name.endswith(".tsv") else {}
    try:
        ds = datasets.load_dataset("csv", data_files=[str(path)], split="train", streaming=True, **options)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable CSV file ({type(e).__name__}: {e})") from None
    if first is None:
        return
    _column(path, list(first), field)
    yield from _texts(path, "data row 1", [first[field]], field)
    for number, row in enumerate(rows, start=2):
        yield from _texts(path, f"data row {number}", [row[field]], field)


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
    table = None
    if is_saved_dataset(path):
        table = _saved_documents(path, field)
    elif path.name.endswith(".parquet"):
        table = _parquet_documents(path, field)
    elif path.name.endswith(".arrow"):
        table = _arrow_documents(path, field)
    elif path.name.endswith((".csv", ".tsv")):
        table = _csv_documents(path, field)
    if table is not None:
        for text in table:
            stats.documents += 1
            yield text
        if stats.documents == before:
            raise DataError(f"{path}: no documents: the column {field!r} holds no text")
        return
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
