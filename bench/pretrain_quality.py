"""Does pre-training learn anything an n-gram model would not? Tiny decoder vs interpolated Kneser-Ney.

A gpt2-tiny decoder is pre-trained for a fixed token budget on the built-in demo corpus (King James
Bible); a count-based trigram model with interpolated Kneser-Ney smoothing (Chen & Goodman 1998,
absolute discount D=0.75 at every order, continuation counts below the top order, uniform floor) is
estimated on the same training tokens. Both score the same validation targets: every token of every
seq_len window of the validation split except the first, given only earlier tokens of its window.

    python bench/pretrain_quality.py                       # 1M training tokens, seq_len 128
    python bench/pretrain_quality.py --tokens 300000 --out runs/quality
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from lmlab.data.objectives import Batches, ObjectiveConfig, make_objective
from lmlab.ngram import KneserNeyTrigram
from lmlab.pretrain import PretrainConfig, prepare, pretrain
from lmlab.train import TrainConfig
from lmlab.train.trainer import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000, help="training token budget of the transformer")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--preset", default="gpt2-tiny")
    ap.add_argument("--out", default="runs/pretrain-quality")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    pc = PretrainConfig(
        out=a.out,
        preset=a.preset,
        seq_len=a.seq_len,
        train=TrainConfig(
            max_tokens=a.tokens,
            batch_size=a.batch_size,
            lr=a.lr,
            warmup_steps=50,
            eval_every=10**9,
            save_every=10**9,
            log_every=25,
            seed=a.seed,
        ),
    )
    t0 = time.perf_counter()
    summary = pretrain(pc)
    train_minutes = (time.perf_counter() - t0) / 60

    # the same store, split and windows the run used
    pc2 = PretrainConfig(
        out=a.out, preset=a.preset, seq_len=a.seq_len, resume=True, train=TrainConfig(max_tokens=a.tokens, seed=a.seed)
    )
    pc2, tok, store, ocfg = prepare(pc2)
    splits = store.split(pc2.val_fraction, a.seed)
    ocfg = ObjectiveConfig("clm", a.seq_len)
    val = make_objective(ocfg, store, splits["val"], tok, "val")
    batches = Batches(val, a.batch_size, seed=0, shuffle=False).fixed(math.ceil(len(val) / a.batch_size))
    from lmlab.io import load

    model = load(a.out)
    result = evaluate(model, batches, torch.device("cpu"))
    train_stream = make_objective(ocfg, store, splits["train"], tok, "train").stream
    t1 = time.perf_counter()
    kn = KneserNeyTrigram(np.asarray(train_stream), tok.vocab_size)
    for u, v in ((int(train_stream[0]), int(train_stream[1])), (None, int(train_stream[5])), (7, 11)):
        total = sum(kn.prob(u, v, w) for w in range(tok.vocab_size))  # a proper distribution in every context
        assert abs(total - 1.0) < 1e-6, (u, v, total)
    windows = [val.chunk(u) for u in range(len(val))]
    kn_ppl, n = kn.perplexity(windows)
    kn_minutes = (time.perf_counter() - t1) / 60
    assert n == result["tokens"], (n, result["tokens"])

    print(
        f"\npre-training quality on the demo corpus (KJV), {a.preset}, seq_len {a.seq_len}, "
        f"{summary['tokens']:,} training tokens, {tok.kind} tokenizer of {tok.vocab_size:,}"
    )
    print(f"validation: {len(splits['val'])} documents, {n:,} scored tokens (same targets for both)\n")
    print("| model | validation perplexity | training |\n|---|---|---|")
    print(
        f"| lmlab {a.preset} ({summary['parameters']:,} parameters) | {result['ppl']:.2f} | "
        f"{summary['steps']} steps, {train_minutes:.1f} min |"
    )
    print(
        f"| interpolated Kneser-Ney trigram | {kn_ppl:.2f} | counts over {len(train_stream):,} tokens, "
        f"{kn_minutes:.1f} min |"
    )
    verdict = "beats" if result["ppl"] < kn_ppl else "does NOT beat"
    print(f"\nthe transformer {verdict} the n-gram baseline ({result['ppl']:.2f} vs {kn_ppl:.2f})")
    Path(a.out, "quality.json").write_text(
        json.dumps(
            {
                "transformer_ppl": result["ppl"],
                "kn_trigram_ppl": kn_ppl,
                "scored_tokens": n,
                "summary": summary,
                "args": vars(a),
            },
            indent=2,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
