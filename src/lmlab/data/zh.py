"""The built-in Chinese corpus (zh-poems: Tang shi and Song ci) and the fine-tuning task built from it.

zh-poets (classification, 4 classes): a line of verse (a couplet, as the corpus prints it) labelled with its
poet, among the four with the most poems in the corpus (杜甫, 王维, 李白, 李商隐): style attribution
from a dozen characters. Split by poem (every 5th poem of each poet is test), so the lines of one poem
never straddle splits. Written as TSV (sentence<TAB>label) with a header.
"""

from __future__ import annotations

import gzip
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lmlab.data.corpus import demo_corpus

AUTHOR = re.compile(r"^作者[：:]\s*([^（(\s]+)")


def poems() -> list[tuple[str, list[str]]]:
    """(poet, lines of verse) of every poem of the built-in corpus, in order."""
    out = []
    for block in gzip.open(demo_corpus("zh-poems"), "rt", encoding="utf-8").read().split("\n\n"):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        poet = next((m.group(1) for line in lines if (m := AUTHOR.match(line))), None)
        verse = [line for line in lines if not AUTHOR.match(line) and not line.startswith("《")]
        if poet and verse:
            out.append((poet, verse))
    return out


def build_zh_poets(out: Path, poets: int = 4) -> dict[str, Any]:
    folder = out / "zh-poets"
    if not (folder / "test.tsv").is_file():
        every = poems()
        top = [p for p, _ in Counter(p for p, _ in every).most_common(poets)]
        rows: dict[str, list[str]] = {"train": [], "test": []}
        seen: Counter[str] = Counter()
        for poet, verse in every:
            if poet not in top:
                continue
            split = "test" if seen[poet] % 5 == 4 else "train"
            seen[poet] += 1
            rows[split] += [f"{line}\t{poet}" for line in verse]
        folder.mkdir(parents=True, exist_ok=True)
        for split, lines in rows.items():
            random.Random(0).shuffle(lines)  # poets mixed: a file cut to its first N rows keeps every class
            (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return {
        "name": "zh-poets",
        "task": "classify",
        "train": str(folder / "train.tsv"),
        "eval": str(folder / "test.tsv"),
    }
