"""The token store: a corpus tokenized once into a memory-mapped file, with a document index.

    folder/tokens.bin     every document's tokens, back to back (uint16 when the vocabulary fits, else uint32)
    folder/offsets.npy    int64 (n_docs + 1,): document d is tokens[offsets[d]:offsets[d + 1]]
    folder/meta.json      dtype, counts, and what the store was built from
    folder/<split>-*.bin  a split's documents packed into one stream, separator token between documents

Building streams documents through the tokenizer in batches, so a corpus larger than memory is
fine; the store is cached under a key made of the files (path, size, mtime), the tokenizer and the
reading options, and reused on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lmlab.data.corpus import ReadStats, corpus_files, read_corpus
from lmlab.errors import DataError
from lmlab.tokenizer import Tokenizer

STORE_VERSION = 1


class TokenStore:
    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        self.offsets = np.load(self.folder / "offsets.npy")
        n = int(self.offsets[-1])
        self.tokens = (
            np.memmap(self.folder / "tokens.bin", dtype=self.dtype, mode="r", shape=(n,))
            if n
            else np.zeros(0, dtype=self.dtype)
        )

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d] : self.offsets[d + 1]]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    # ---- building ------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        documents: Iterable[str],
        tokenizer: Tokenizer,
        folder: str | os.PathLike[str],
        batch_docs: int = 2048,
        meta: dict | None = None,
    ) -> TokenStore:
        """Tokenize `documents` (no special tokens) into `folder`; written under a temp name, then renamed."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
        lengths: list[int] = []
        with open(tmp / "tokens.bin", "wb") as out:
            batch: list[str] = []
            for doc in documents:
                batch.append(doc)
                if len(batch) == batch_docs:
                    lengths += cls._write(out, tokenizer.encode_many(batch), dtype)
                    batch = []
            if batch:
                lengths += cls._write(out, tokenizer.encode_many(batch), dtype)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(tmp / "offsets.npy", offsets)
        info = {
            "version": STORE_VERSION,
            "dtype": dtype.name,
            "n_docs": len(lengths),
            "n_tokens": int(offsets[-1]),
            "vocab_size": tokenizer.vocab_size,
            **(meta or {}),
        }
        (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return cls(folder)

    @staticmethod
    def _write(out, rows: list[list[int]], dtype: np.dtype) -> list[int]:
        flat = np.fromiter((t for r in rows for t in r), dtype=dtype, count=sum(len(r) for r in rows))
        flat.tofile(out)
        return [len(r) for r in rows]

    # ---- splits and packing ---------------------------------------------------------------------
    def split(self, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
        """Deterministic document-level split: {"train": doc ids, "val": doc ids}, each sorted."""
        n = self.n_docs
        if n < 2:
            raise DataError(
                f"the corpus has {n} document(s); a train/validation split needs at least 2 "
                "(one document per line, or documents separated by blank lines with --doc-sep blank)"
            )
        # at least 2 validation documents where possible: next-sentence prediction draws from another document
        n_val = min(n - 1, max(2 if n >= 4 else 1, round(n * val_fraction)))
        perm = np.random.default_rng(seed).permutation(n)
        return {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val])}

    def stream(self, docs: np.ndarray, separator: int | None, name: str) -> np.ndarray:
        """The documents `docs` packed back to back (separator between them), memory-mapped and cached."""
        key = hashlib.sha1(docs.tobytes() + str(separator).encode()).hexdigest()[:12]
        path = self.folder / f"{name}-{key}.bin"
        if not path.exists():
            # a name of this process's own: processes sharing the cache (the ranks of a torchrun job)
            # may write the same stream at once, and the last rename of identical bytes wins
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as out:
                sep = np.array([separator], dtype=self.dtype) if separator is not None else None
                for d in docs:
                    self.doc(int(d)).tofile(out)
                    if sep is not None:
                        sep.tofile(out)
            os.replace(tmp, path)
        n = path.stat().st_size // self.dtype.itemsize
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=self.dtype)


def _fingerprint(files: list[Path], tokenizer: Tokenizer, options: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": STORE_VERSION, **options}, sort_keys=True).encode())
    for f in files:
        for part in sorted(f.rglob("*")) if f.is_dir() else [f]:  # a datasets folder: every file in it
            if part.is_file():
                st = part.stat()
                h.update(f"{part.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(tokenizer.backend.to_str().encode())
    return h.hexdigest()[:16]


def build_store(
    paths: list[str | os.PathLike[str]],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike[str],
    doc_sep: str = "line",
    field: str = "text",
    skip_bad_lines: bool = False,
) -> tuple[TokenStore, ReadStats]:
    """The cached store of these files under this tokenizer, building it on first use."""
    files = corpus_files(paths)
    options = {"doc_sep": doc_sep, "field": field, "skip_bad_lines": skip_bad_lines}
    folder = Path(cache_dir) / f"store-{_fingerprint(files, tokenizer, options)}"
    stats = ReadStats()
    if (folder / "meta.json").is_file():
        store = TokenStore(folder)
        stats.documents = store.n_docs
        return store, stats
    docs = read_corpus(files, doc_sep, field, skip_bad_lines, stats)
    store = TokenStore.build(
        docs, tokenizer, folder, meta={"files": [str(f) for f in files], **options, "skipped_lines": 0}
    )
    meta = store.meta | {"skipped_lines": stats.skipped_lines}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return store, stats
