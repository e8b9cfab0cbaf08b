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

kjv-web (seq2seq): the King James Bible -> the World English Bible, verse by verse (both public
domain): archaic English in, modern English out. The KJV is the built-in demo corpus; the WEB comes
from Debian's sword-text-web, dumped with `mod2imp engWEB2015eb` (libsword-utils), its OSIS markup
stripped (footnotes, Psalm titles and section headings dropped; curly quotes made straight, as the
KJV writes them). Verses are paired by book, chapter and verse number; a pair is kept when both
sides are non-empty. Split by chapter as above. JSONL: {"source", "target", "ref"}. Since the text
is changed (markup stripped), the result is not "the World English Bible" as its trademark notice
asks: it is built on your machine, never shipped. Built with --kjv-web.

chatterbot (chat): the English conversations of chatterbot-corpus 1.3.3 (BSD-3-Clause as its PyPI
classifier says; the wheel carries no licence file, so none of its text is shipped with lmlab: this
downloads the wheel with `pip download --no-deps` and reads it as a zip). Each conversation's
utterances alternate user / assistant; a trailing unanswered utterance is dropped. Conversations
that open with the same utterance stay in one split (every 10th opening test, every 10th from the
5th dev). JSONL in OpenAI's format: {"messages": [...], "category"}. Built with --chatterbot.

    python scripts/build_task_data.py --out runs/tasks              # kjv-sections/{train,dev,test}.tsv
    python scripts/build_task_data.py --out runs/tasks --hkcancor   # and hkcancor-ner/{train,dev,test}.conll
    apt-get install sword-text-web libsword-utils
    python scripts/build_task_data.py --out runs/tasks --kjv-web    # and kjv-web/{train,dev,test}.jsonl
    python scripts/build_task_data.py --out runs/tasks --chatterbot # and chatterbot/{train,dev,test}.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import random
import re
import subprocess
import sys
from pathlib import Path

from lmlab.data.kjv import CHAPTERS, SECTIONS, build_kjv_sections, section_of_chapter  # noqa: F401

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


def _split(i: int) -> str:
    return "test" if i % 10 == 0 else "dev" if i % 10 == 5 else "train"


def _write_jsonl(folder: Path, rows: dict[str, list[dict]]) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    for split, records in rows.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (folder / f"{split}.jsonl").write_text(text, encoding="utf-8")
    return {split: len(records) for split, records in rows.items()}


# the World English Bible's names of the 66 books, in the canonical (KJV) order
WEB_BOOKS = (
    "Genesis|Exodus|Leviticus|Numbers|Deuteronomy|Joshua|Judges|Ruth|I Samuel|II Samuel|I Kings|II Kings|"
    "I Chronicles|II Chronicles|Ezra|Nehemiah|Esther|Job|Psalms|Proverbs|Ecclesiastes|Song of Solomon|Isaiah|"
    "Jeremiah|Lamentations|Ezekiel|Daniel|Hosea|Joel|Amos|Obadiah|Jonah|Micah|Nahum|Habakkuk|Zephaniah|Haggai|"
    "Zechariah|Malachi|Matthew|Mark|Luke|John|Acts|Romans|I Corinthians|II Corinthians|Galatians|Ephesians|"
    "Philippians|Colossians|I Thessalonians|II Thessalonians|I Timothy|II Timothy|Titus|Philemon|Hebrews|James|"
    "I Peter|II Peter|I John|II John|III John|Jude|Revelation of John"
).split("|")
_DROP = re.compile(r"<note\b.*?</note>|<title\b.*?</title>", re.S)
_TAG = re.compile(r"<[^>]+>")
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?)\]])")
_STRAIGHT = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def web_verses() -> dict[tuple[int, int, int], str]:
    """(book index, chapter, verse) -> the WEB's plain text, from `mod2imp engWEB2015eb`."""
    try:
        raw = subprocess.run(["mod2imp", "engWEB2015eb"], capture_output=True, text=True, check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"mod2imp engWEB2015eb failed ({e}); apt-get install sword-text-web libsword-utils") from None
    books = {name: i for i, name in enumerate(WEB_BOOKS)}
    verses: dict[tuple[int, int, int], str] = {}
    key = None
    for line in raw.splitlines():
        if line.startswith("$$$"):
            book, _, ref = line[3:].rpartition(" ")
            chapter, _, verse = ref.partition(":")
            ok = book in books and chapter.isdigit() and verse.isdigit() and int(chapter) > 0 and int(verse) > 0
            key = (books[book], int(chapter), int(verse)) if ok else None
            continue
        if key is None:
            continue
        line = line.split("<chapter eID=")[0]  # what follows a chapter's end is book matter (glossary, ...)
        text = _TAG.sub("", _DROP.sub(" ", line))
        text = _SPACE_BEFORE.sub(r"\1", " ".join(html.unescape(text).translate(_STRAIGHT).split()))
        verses[key] = (verses.get(key, "") + " " + text).strip()
    return verses


def build_kjv_web(out: Path) -> dict[str, int]:
    corpus = Path(__file__).resolve().parents[1] / "src" / "lmlab" / "data" / "demo" / "kjv.txt.gz"
    chapters = [c for c in gzip.open(corpus, "rt", encoding="utf-8").read().split("\n\n") if c.strip()]
    if len(chapters) != sum(CHAPTERS):
        raise SystemExit(f"{corpus}: expected {sum(CHAPTERS)} chapters, found {len(chapters)}")
    web = web_verses()
    rows: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    i = 0
    for book, n_chapters in enumerate(CHAPTERS):
        for chapter in range(1, n_chapters + 1):
            kjv = [v.strip() for v in chapters[i].splitlines() if v.strip()]
            for verse, source in enumerate(kjv, 1):
                target = web.get((book, chapter, verse), "")
                if source and target:
                    ref = f"{WEB_BOOKS[book]} {chapter}:{verse}"
                    rows[_split(i)].append({"source": source, "target": target, "ref": ref})
            i += 1
    return _write_jsonl(out / "kjv-web", rows)


def build_chatterbot(out: Path, cache: Path) -> dict[str, int]:
    import zipfile

    import yaml

    found = sorted(cache.glob("chatterbot_corpus-1.3.3-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "chatterbot-corpus==1.3.3", "-d"]
        subprocess.run([*cmd, str(cache)], check=True)
        found = sorted(cache.glob("chatterbot_corpus-1.3.3-*.whl"))
    if not found:
        raise SystemExit(f"no chatterbot-corpus 1.3.3 wheel in {cache}")
    z = zipfile.ZipFile(found[0])
    conversations = []
    for name in sorted(n for n in z.namelist() if "/data/english/" in n and n.endswith(".yml")):
        data = yaml.safe_load(z.read(name).decode("utf-8")) or {}
        for turns in data.get("conversations") or []:
            turns = [str(t).strip() for t in turns if str(t).strip()]
            turns = turns[: len(turns) // 2 * 2]  # a trailing utterance without an answer is dropped
            if turns:
                roles = ["user", "assistant"] * (len(turns) // 2)
                messages = [{"role": r, "content": t} for r, t in zip(roles, turns)]
                conversations.append({"messages": messages, "category": Path(name).stem})
    openings = sorted({c["messages"][0]["content"].lower() for c in conversations})
    split_of = {o: _split(i) for i, o in enumerate(openings)}
    rows: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for c in conversations:
        rows[split_of[c["messages"][0]["content"].lower()]].append(c)
    return _write_jsonl(out / "chatterbot", rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/tasks")
    ap.add_argument("--per-chapter", type=int, default=8, help="passages taken from each chapter")
    ap.add_argument("--hkcancor", action="store_true", help="also build hkcancor-ner (downloads a 42 MB wheel)")
    ap.add_argument("--kjv-web", action="store_true", help="also build kjv-web (needs sword-text-web, libsword-utils)")
    ap.add_argument("--chatterbot", action="store_true", help="also build chatterbot (downloads a small wheel)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "lmlab" / "wheels"))
    a = ap.parse_args()
    counts = build_kjv_sections(Path(a.out), a.per_chapter)
    print(f"kjv-sections: {counts} examples in {Path(a.out) / 'kjv-sections'}")
    if a.hkcancor:
        counts = build_hkcancor_ner(Path(a.out), Path(a.cache))
        print(f"hkcancor-ner: {counts} utterances in {Path(a.out) / 'hkcancor-ner'}")
    if a.kjv_web:
        print(f"kjv-web: {build_kjv_web(Path(a.out))} verse pairs in {Path(a.out) / 'kjv-web'}")
    if a.chatterbot:
        print(
            f"chatterbot: {build_chatterbot(Path(a.out), Path(a.cache))} conversations in {Path(a.out) / 'chatterbot'}"
        )


if __name__ == "__main__":
    main()
