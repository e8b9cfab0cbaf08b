"""Build real fine-tuning tasks from text that is at hand without a hub.

kjv-sections (classification, 6 classes): passages of two consecutive verses of the King James Bible
(the built-in demo corpus, public domain), labelled with the part of the Bible they come from: law
(Genesis-Deuteronomy), history (Joshua-Esther), wisdom (Job-Song of Solomon), prophets
(Isaiah-Malachi), gospels (Matthew-Acts), letters (Romans-Revelation). The split is by chapter (every
10th chapter is test, every 10th from the 5th is dev), so neighbouring verses never straddle splits.
Written as GLUE-style TSV (sentence<TAB>label) with a header.

hkcancor-ner (tagging): the Hong Kong Cantonese Corpus (HKCanCor, CC BY 4.0, as shipped inside the
PyPI wheel of pycantonese 5.0.0, fetched with `pip download --no-deps` and read as a zip, never
installed): 16k word-segmented, part-of-speech-tagged utterances of conversational Cantonese. Its
proper-noun tags become entities: nr / xnr -> PER, ns / xns -> LOC, nt / xnt -> ORG (a run of words
of one type is one entity: B- then I-). Utterances with an entity are kept, and as many without;
the split is by recording (file), every 10th test, every 10th from the 5th dev. CoNLL format, one
word and its tag per line. Only built on request (--hkcancor): it downloads 42 MB.

    python scripts/build_task_data.py --out runs/tasks              # kjv-sections/{train,dev,test}.tsv
    python scripts/build_task_data.py --out runs/tasks --hkcancor   # and hkcancor-ner/{train,dev,test}.conll
"""

from __future__ import annotations

import argparse
import gzip
import random
from pathlib import Path

# chapters per book, in canonical order (1,189 in all), and where each part of the Bible ends
CHAPTERS = [
    50,
    40,
    27,
    36,
    34,
    24,
    21,
    4,
    31,
    24,
    22,
    25,
    29,
    36,
    10,
    13,
    10,
    42,
    150,
    31,
    12,
    8,
    66,
    52,
    5,
    48,
    12,
    14,
    3,
    9,
    1,
    4,
    7,
    3,
    3,
    3,
    2,
    14,
    4,
    28,
    16,
    24,
    21,
    28,
    16,
    16,
    13,
    6,
    6,
    4,
    4,
    5,
    3,
    6,
    4,
    3,
    1,
    13,
    5,
    5,
    3,
    5,
    1,
    1,
    1,
    22,
]
SECTIONS = [("law", 5), ("history", 17), ("wisdom", 22), ("prophets", 39), ("gospels", 44), ("letters", 66)]


def section_of_chapter() -> list[str]:
    labels, book = [], 0
    for name, last_book in SECTIONS:
        while book < last_book:
            labels += [name] * CHAPTERS[book]
            book += 1
    return labels


def build_kjv_sections(out: Path, per_chapter: int = 8, seed: int = 0) -> dict[str, int]:
    corpus = Path(__file__).resolve().parents[1] / "src" / "lmlab" / "data" / "demo" / "kjv.txt.gz"
    chapters = [c for c in gzip.open(corpus, "rt", encoding="utf-8").read().split("\n\n") if c.strip()]
    labels = section_of_chapter()
    if len(chapters) != len(labels):
        raise SystemExit(f"{corpus}: expected {len(labels)} chapters, found {len(chapters)}")
    rng = random.Random(seed)
    rows: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for i, (chapter, label) in enumerate(zip(chapters, labels)):
        split = "test" if i % 10 == 0 else "dev" if i % 10 == 5 else "train"
        verses = [v.strip() for v in chapter.splitlines() if v.strip()]
        pairs = [f"{verses[k]} {verses[k + 1]}" for k in range(0, len(verses) - 1, 2)]
        for text in rng.sample(pairs, min(per_chapter, len(pairs))):
            rows[split].append(f"{text.replace(chr(9), ' ')}\t{label}")
    folder = out / "kjv-sections"
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        rng.shuffle(lines)
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return {split: len(lines) for split, lines in rows.items()}


ENTITY = {"nr": "PER", "xnr": "PER", "ns": "LOC", "xns": "LOC", "nt": "ORG", "xnt": "ORG"}


def _hkcancor_wheel(cache: Path) -> Path:
    import subprocess
    import sys

    found = sorted(cache.glob("pycantonese-5.0.0-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "pycantonese==5.0.0", "-d", str(cache)],
            check=True,
        )
        found = sorted(cache.glob("pycantonese-5.0.0-*.whl"))
    if not found:
        raise SystemExit(f"no pycantonese 5.0.0 wheel in {cache}")
    return found[0]


def build_hkcancor_ner(out: Path, cache: Path, seed: int = 0) -> dict[str, int]:
    import zipfile

    z = zipfile.ZipFile(_hkcancor_wheel(cache))
    files = sorted(n for n in z.namelist() if "/hkcancor/" in n and n.endswith(".cha"))
    rng = random.Random(seed)
    rows: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for i, name in enumerate(files):
        split = "test" if i % 10 == 0 else "dev" if i % 10 == 5 else "train"
        lines: list[str] = []
        for line in z.read(name).decode("utf-8").splitlines():  # CHAT: tab-led lines continue the previous
            if line.startswith("\t") and lines:
                lines[-1] += " " + line.strip()
            else:
                lines.append(line)
        with_entity, without = [], []
        for k, line in enumerate(lines[:-1]):
            if not (line.startswith("*") and lines[k + 1].startswith("%mor:")):
                continue
            words = line.split("\t", 1)[1].split()
            mor = lines[k + 1].split("\t", 1)[1].split()
            if len(words) != len(mor):
                continue
            tags, prev = [], None
            for m in mor:
                kind = ENTITY.get(m.split("|")[0]) if "|" in m else None
                tags.append("O" if kind is None else (f"I-{kind}" if kind == prev else f"B-{kind}"))
                prev = kind
            block = "\n".join(f"{w} {t}" for w, t in zip(words, tags))
            (with_entity if any(t != "O" for t in tags) else without).append(block)
        rows[split] += with_entity + rng.sample(without, min(len(with_entity), len(without)))
    folder = out / "hkcancor-ner"
    folder.mkdir(parents=True, exist_ok=True)
    for split, blocks in rows.items():
        rng.shuffle(blocks)
        (folder / f"{split}.conll").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return {split: len(blocks) for split, blocks in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/tasks")
    ap.add_argument("--per-chapter", type=int, default=8, help="passages taken from each chapter")
    ap.add_argument("--hkcancor", action="store_true", help="also build hkcancor-ner (downloads a 42 MB wheel)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "lmlab" / "wheels"))
    a = ap.parse_args()
    counts = build_kjv_sections(Path(a.out), a.per_chapter)
    print(f"kjv-sections: {counts} examples in {Path(a.out) / 'kjv-sections'}")
    if a.hkcancor:
        counts = build_hkcancor_ner(Path(a.out), Path(a.cache))
        print(f"hkcancor-ner: {counts} utterances in {Path(a.out) / 'hkcancor-ner'}")


if __name__ == "__main__":
    main()
