"""Build the tagging and QA tasks that lmlab ships beside its demo corpus (run once; outputs committed).

    apt-get install sword-text-kjv sword-dict-naves libsword-utils
    python scripts/build_builtin_tasks.py

Both come from public-domain SWORD modules that Debian packages, dumped with `mod2imp`:

kjv-italics (tagging, one entity type ADDED): the King James Version with Strong's numbers
(`engKJV2006eb`, standardised 1769 text, "PUBLIC DOMAIN" in its conf) marks the words that the
translators supplied for English sense and that printed Bibles set in italics
(`<transChange type="added">`), e.g. "darkness *was* upon the face of the deep". Tagging them is a
real, human-annotated token-classification task on the demo corpus's own text: it needs both sides
of a word to decide. Words are split off punctuation; a run of supplied words is one entity (B-
then I-). Footnotes and Psalm titles are dropped. CoNLL, one word and its tag per line.

nave-qa (extractive QA, SQuAD v1 format): Nave's Topical Bible (1896, public domain; `Nave`)
describes each person, place or thing with short phrases and the verses they come from, e.g.
ABADDON: "The angel of the bottomless pit, Re 9:11". For every topic whose name occurs in its cited
verse as a capitalised word (a proper name), the cited verse is the context, Nave's phrase is the
question, and the name's first occurrence in the verse is the answer; the model has to find which
of the names in the verse the phrase describes. Only phrases citing one verse are used.

Both split by chapter (every 5th chapter is test), so a chapter's verses stay
on one side. `test` here is what `lmlab compare` scores; a `dev` split is not kept (the files are
shipped, so they are kept small).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
from pathlib import Path

from build_task_data import WEB_BOOKS as BOOKS  # the SWORD modules' book names, in canonical order

OUT = Path(__file__).resolve().parents[1] / "src" / "lmlab" / "data" / "demo" / "tasks"

OSIS = (
    "Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Job Ps Prov Eccl Song "
    "Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal Matt Mark Luke John Acts Rom "
    "1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb Jas 1Pet 2Pet 1John 2John 3John Jude Rev"
).split()
KEY = re.compile(r"^\$\$\$(.+) (\d+):(\d+)$")
DROP = re.compile(r"<note\b.*?</note>|<title\b.*?</title>", re.S)
TAG = re.compile(r"<[^>]+>")
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*|\d+|[^\sA-Za-z\d]")
ADDED_OPEN, ADDED_CLOSE = "\x01", "\x02"
STRAIGHT = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})  # as the demo corpus writes them


def dump(module: str) -> str:
    try:
        return subprocess.run(["mod2imp", module], capture_output=True, text=True, check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        raise SystemExit(
            f"mod2imp {module} failed ({e}); apt-get install sword-text-kjv sword-dict-naves libsword-utils"
        ) from None


def kjv_verses() -> dict[tuple[int, int, int], str]:
    """(book, chapter, verse) -> the verse's OSIS markup, with supplied words between \\x01 and \\x02."""
    books = {name: i for i, name in enumerate(BOOKS)}
    verses: dict[tuple[int, int, int], list[str]] = {}
    key = None
    for line in dump("engKJV2006eb").splitlines():
        m = KEY.match(line)
        if m:
            key = (books[m.group(1)], int(m.group(2)), int(m.group(3))) if m.group(1) in books else None
            if key is not None and key[2] == 0:
                key = None  # chapter and book introductions
            continue
        if key is not None:
            verses.setdefault(key, []).append(line)
    out = {}
    for key, lines in verses.items():
        text = DROP.sub(" ", " ".join(lines))
        text = text.replace('<transChange type="added">', ADDED_OPEN).replace("</transChange>", ADDED_CLOSE)
        text = TAG.sub(" ", text).replace("\u00b6", " ").translate(STRAIGHT)
        out[key] = " ".join(text.split())
    return out


def tagged_words(marked: str) -> list[tuple[str, bool]]:
    """Split a verse into words; each is True when it lies inside a supplied (italic) span."""
    words, inside = [], False
    for m in re.finditer(f"{WORD.pattern}|[{ADDED_OPEN}{ADDED_CLOSE}]", marked):
        tok = m.group(0)
        if tok == ADDED_OPEN:
            inside = True
        elif tok == ADDED_CLOSE:
            inside = False
        else:
            words.append((tok, inside))
    return words


def plain(marked: str) -> str:
    text = marked.replace(ADDED_OPEN, "").replace(ADDED_CLOSE, "")
    return " ".join(re.sub(r"\s+([,.;:!?)])", r"\1", text).split())


def chapter_split(verses: dict[tuple[int, int, int], str]) -> dict[tuple[int, int], str]:
    chapters = sorted({(b, c) for b, c, _ in verses})
    return {ch: "test" if i % 5 == 0 else "train" for i, ch in enumerate(chapters)}


def build_italics(verses, split, sizes=(3000, 800), seed=0) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for (b, c, _), marked in sorted(verses.items()):
        words = tagged_words(marked)
        if not words:
            continue
        lines, prev = [], False
        for w, added in words:
            tag = "O" if not added else ("I-ADDED" if prev else "B-ADDED")
            # punctuation never carries the tag: a span is its words
            if added and not w[0].isalnum():
                tag = "O"
            lines.append(f"{w} {tag}")
            prev = added and w[0].isalnum()
        rows[split[(b, c)]].append("\n".join(lines))
    rng = random.Random(seed)
    return {k: rng.sample(v, min(n, len(v))) for (k, v), n in zip(rows.items(), sizes)}


def nave_entries() -> list[tuple[str, str, str]]:
    """(topic, phrase, osisRef) for every phrase of Nave's that cites exactly one verse."""
    out, topic = [], None
    for line in dump("Nave").splitlines():
        if line.startswith("$$$"):
            topic = line[3:].strip()
            continue
        if topic is None:
            continue
        for part in line.split("<lb/>"):
            refs = re.findall(r'<ref osisRef="([^"]+)">', part)
            phrase = " ".join(TAG.sub(" ", re.sub(r"<ref\b.*?</ref>", " ", part)).replace("\u2192", " ").split())
            phrase = re.sub(r"^\d+\.\s*", "", phrase.strip(" ;,.:"))  # Nave numbers the people of one name
            if len(refs) == 1 and "-" not in refs[0] and refs[0].count(".") == 2 and phrase:
                out.append((topic, phrase, refs[0]))
    return out


def build_nave_qa(verses, split, sizes=(3000, 600), seed=0) -> dict[str, list[dict]]:
    osis = {code: i for i, code in enumerate(OSIS)}
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    seen = set()
    for topic, phrase, ref in nave_entries():
        if not re.fullmatch(r"[A-Z]+", topic) or len(topic) < 3:
            continue
        book, chapter, verse = ref.split(".")
        if book not in osis:
            continue  # the apocrypha (Wis, PrAzar) is not in the KJV module
        key = (osis[book], int(chapter), int(verse))
        if key not in verses:
            continue
        context = plain(verses[key])
        name = topic.capitalize()
        m = re.search(rf"\b{name}\b", context)
        if m is None or (key, phrase) in seen:
            continue
        seen.add((key, phrase))
        qid = f"{ref}-{len(seen)}"
        rows[split[key[:2]]].append(
            {
                "context": context,
                "qas": [{"id": qid, "question": phrase, "answers": [{"text": name, "answer_start": m.start()}]}],
            }
        )
    rng = random.Random(seed)
    return {k: rng.sample(v, min(n, len(v))) for (k, v), n in zip(rows.items(), sizes)}


def main() -> None:
    verses = kjv_verses()
    split = chapter_split(verses)
    OUT.mkdir(parents=True, exist_ok=True)
    italics = build_italics(verses, split)
    for name, blocks in italics.items():
        data = ("\n\n".join(blocks) + "\n").encode("utf-8")
        (OUT / f"kjv-italics-{name}.conll.gz").write_bytes(gzip.compress(data, mtime=0))
    qa = build_nave_qa(verses, split)
    for name, paragraphs in qa.items():
        doc = {"version": "nave-qa", "data": [{"title": "nave", "paragraphs": paragraphs}]}
        data = json.dumps(doc, ensure_ascii=False).encode("utf-8")
        (OUT / f"nave-qa-{name}.json.gz").write_bytes(gzip.compress(data, mtime=0))
    for name, blocks in italics.items():
        tags = [line.rsplit(" ", 1)[1] for b in blocks for line in b.splitlines()]
        print(f"kjv-italics {name}: {len(blocks)} verses, {len(tags)} words, {sum(t == 'B-ADDED' for t in tags)} spans")
    for name, paragraphs in qa.items():
        print(f"nave-qa {name}: {len(paragraphs)} questions")


if __name__ == "__main__":
    main()
