"""Deterministic WordPiece and Unigram training against `tokenizers`' own trainers.

`tokenizers`' WordPieceTrainer and UnigramTrainer break ties in a per-process hash order, so the same
corpus gave other vocabularies from run to run. lmlab trains WordPiece through the BPE trainer over
private-use stand-ins and Unigram through SentencePiece (lmlab.tokenizer). This prints, for each kind
and vocabulary size: how many distinct tokenizer.json files `--runs` fresh processes gave with each trainer,
and held-out tokens per byte of both (lower is better; the claim is lmlab's within 1% or below).

    python bench/tokenizer_determinism.py                     # the built-in KJV: 3 MB to train, 0.5 MB held out
    python bench/tokenizer_determinism.py --sizes 1000 8000 --runs 5
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys

from common import environment

ONE = """
import hashlib, json, sys
from tokenizers import trainers
from lmlab.tokenizer import SPECIALS, N_SENTINELS, _backend, train_tokenizer
kind, size, path, held_path, trainer = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
lines = open(path, encoding="utf-8").read().splitlines()
held = open(held_path, encoding="utf-8").read().splitlines()
if trainer == "lmlab":
    backend = train_tokenizer(kind, lines, size).backend
else:
    sentinels = [f"<extra_id_{i}>" for i in range(N_SENTINELS)] if kind == "unigram" else []
    specials = list(dict.fromkeys(SPECIALS[kind].values())) + sentinels
    backend = _backend(kind, kind == "wordpiece")
    t = (trainers.WordPieceTrainer(vocab_size=size, min_frequency=2, special_tokens=specials, show_progress=False)
         if kind == "wordpiece" else trainers.UnigramTrainer(vocab_size=size, special_tokens=specials,
         unk_token="<unk>", show_progress=False, max_piece_length=16))
    backend.train_from_iterator(lines, trainer=t)
tokens = sum(len(e.ids) for e in backend.encode_batch(held, add_special_tokens=False))
print(json.dumps({"hash": hashlib.sha256(backend.to_str().encode()).hexdigest()[:12],
                  "tpb": tokens / len("\\n".join(held).encode())}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--train-bytes", type=int, default=3_000_000)
    ap.add_argument("--held-bytes", type=int, default=500_000)
    ap.add_argument("--tmp", default="/tmp/lmlab-tokenizer-bench")
    args = ap.parse_args()
    from pathlib import Path

    from lmlab.data.corpus import demo_corpus

    text = gzip.decompress(demo_corpus("kjv").read_bytes()).decode("utf-8")
    cut = text.rfind("\n", 0, args.train_bytes)
    held_from = text.rfind("\n", 0, len(text) - args.held_bytes)
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "train.txt").write_text(text[:cut], encoding="utf-8")
    (tmp / "held.txt").write_text(text[held_from + 1 :], encoding="utf-8")
    print(
        environment(
            note=f"KJV: {cut:,} bytes to train, {len(text) - held_from - 1:,} held out; {args.runs} fresh processes each"
        )
    )
    print("| kind | vocab | trainer | distinct tokenizer.json files | held-out tokens/byte | lmlab vs tokenizers |")
    print("|---|---|---|---|---|---|")
    for kind in ("wordpiece", "unigram"):
        for size in args.sizes:
            seen = {}
            for trainer in ("tokenizers", "lmlab"):
                out = [
                    json.loads(
                        subprocess.run(
                            [sys.executable, "-c", ONE, kind, str(size), str(tmp / "train.txt"), str(tmp / "held.txt"), trainer],
                            capture_output=True, text=True, check=True,
                        ).stdout
                    )
                    for _ in range(args.runs)
                ]  # fmt: skip
                tpb = sorted(o["tpb"] for o in out)
                seen[trainer] = tpb[len(tpb) // 2]
                ratio = f"{seen['lmlab'] / seen['tokenizers'] - 1:+.2%}" if trainer == "lmlab" else ""
                shown = f"{tpb[0]:.5f}" if tpb[0] == tpb[-1] else f"{tpb[0]:.5f} to {tpb[-1]:.5f}"
                print(
                    f"| {kind} | {size:,} | {trainer} | {len({o['hash'] for o in out})} of {args.runs} | {shown} | {ratio} |"
                )
    print(
        f"\ncommand: python bench/tokenizer_determinism.py --sizes {' '.join(map(str, args.sizes))} --runs {args.runs}"
    )


if __name__ == "__main__":
    main()
