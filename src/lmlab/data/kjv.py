"""The built-in King James Bible corpus, chapter by chapter, and the fine-tuning tasks built from it.

kjv-sections (6 classes): passages of two consecutive verses, labelled with the part of the Bible they
come from: law (Genesis-Deuteronomy), history (Joshua-Esther), wisdom (Job-Song of Solomon), prophets
(Isaiah-Malachi), gospels (Matthew-Acts), letters (Romans-Revelation). The split is by chapter (every
10th chapter is test, every 10th from the 5th is dev), so neighbouring verses never straddle splits.
Written as GLUE-style TSV (sentence<TAB>label) with a header.

kjv-italics (tagging) and nave-qa (extractive QA) are shipped ready-made in data/demo/tasks/, built by
scripts/build_builtin_tasks.py from Debian's public-domain SWORD modules (its docstring says how):
kjv-italics tags the words the translators supplied (printed in italics; entity type ADDED), nave-qa
asks for the person or place that Nave's Topical Bible describes, with the verse it cites as context.
"""

from __future__ import annotations

import gzip
import random
from importlib import resources
from pathlib import Path
from typing import Any

from lmlab.data.corpus import demo_corpus
from lmlab.errors import DataError

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
    """Write kjv-sections/{train,dev,test}.tsv under `out`; returns the number of passages per split."""
    corpus = demo_corpus("kjv")
    chapters = [c for c in gzip.open(corpus, "rt", encoding="utf-8").read().split("\n\n") if c.strip()]
    labels = section_of_chapter()
    if len(chapters) != len(labels):
        raise DataError(f"{corpus}: expected {len(labels)} chapters, found {len(chapters)}")
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


# name -> (lmlab finetune task, shipped file stem or None when built from the corpus)
BUILTIN_TASKS: dict[str, tuple[str, str | None]] = {
    "kjv-sections": ("classify", None),
    "kjv-italics": ("ner", "kjv-italics-{split}.conll"),
    "nave-qa": ("qa", "nave-qa-{split}.json"),
}


def builtin_task(name: str, out: Path) -> dict[str, Any]:
    """Write the built-in task `name` under `out`/name; returns {name, task, train, eval} (eval = its test split)."""
    if name not in BUILTIN_TASKS:
        raise DataError(f"no built-in task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    task, stem = BUILTIN_TASKS[name]
    folder = out / name
    if stem is None:
        if not (folder / "test.tsv").is_file():
            build_kjv_sections(out, per_chapter=3)
        return {"name": name, "task": task, "train": str(folder / "train.tsv"), "eval": str(folder / "test.tsv")}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "test"):
        shipped = Path(str(resources.files("lmlab.data") / "demo" / "tasks" / (stem.format(split=split) + ".gz")))
        if not shipped.is_file():
            raise DataError(f"{shipped}: the built-in task file is missing from this installation")
        target = folder / stem.format(split=split)
        if not target.is_file():
            target.write_bytes(gzip.decompress(shipped.read_bytes()))
        paths[split] = str(target)
    return {"name": name, "task": task, "train": paths["train"], "eval": paths["test"]}
