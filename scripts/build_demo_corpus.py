"""Build lmlab's built-in demo corpora from Debian packages (run once; the outputs are committed).

    apt-get install bible-kjv bible-kjv-text fortunes-zh
    python scripts/build_demo_corpus.py

English: the King James Bible (public domain; Debian's bible-kjv-text), one chapter per document,
one verse per line, documents separated by blank lines.
Chinese: the Tang (tang300) and Song (song100) poems of Debian's fortunes-zh, one poem per document
(title, author, text). The poems are centuries-old public-domain texts.
"""

from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "lmlab" / "data" / "demo"
VERSE = re.compile(r"^\s+\d+ (.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def kjv() -> list[str]:
    raw = subprocess.run(["bible", "-l100000", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    docs, verses = [], []
    for line in raw.splitlines():
        m = VERSE.match(line)
        if m:
            verses.append(m.group(1).strip())
        elif line.strip() and verses:  # a new chapter heading ends the previous chapter
            docs.append("\n".join(verses))
            verses = []
    if verses:
        docs.append("\n".join(verses))
    return docs


def poems(*files: str) -> list[str]:
    docs = []
    for name in files:
        text = Path(f"/usr/share/games/fortunes/{name}.u8").read_text(encoding="utf-8")
        for poem in text.split("\n%\n"):
            lines = [ANSI.sub("", ln).strip() for ln in poem.strip().splitlines()]
            lines = [ln for ln in lines if ln and ln != "%"]
            if lines:
                docs.append("\n".join(lines))
    return docs


def write(name: str, docs: list[str]) -> None:
    path = OUT / name
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:  # mtime=0: reproducible bytes
        f.write(("\n\n".join(docs) + "\n").encode("utf-8"))
    print(f"{path}: {len(docs)} documents, {path.stat().st_size:,} bytes compressed")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    write("kjv.txt.gz", kjv())
    write("zh-poems.txt.gz", poems("tang300", "song100"))
