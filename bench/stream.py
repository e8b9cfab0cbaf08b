"""Streaming (pretrain --stream) against the token store, on the same corpus, in one process.

1. Data alone: tokens per second each source hands the trainer (next_batch), the store already built.
2. Training: the demo's shape (a tiny GPT, seq 64, batch 16), a step = next_batch + forward + backward +
   AdamW, the two sources alternating step by step; medians and the ratio. The streaming worker shares
   the CPU with training, as it does in a real run.

    python bench/stream.py                 # the built-in KJV corpus
    python bench/stream.py --data corpus.txt --steps 60
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import environment

from lmlab import Model
from lmlab.config import preset
from lmlab.data.corpus import demo_corpus, read_corpus
from lmlab.data.objectives import Batches, ObjectiveConfig, make_objective, stream_objective
from lmlab.data.store import build_store
from lmlab.data.streaming import StreamBatches, StreamSpec
from lmlab.tokenizer import train_tokenizer
from lmlab.train.optim import make_optimizer
from lmlab.train.trainer import precision_choice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a text corpus, one document per blank-line block (default: kjv)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    data = Path(args.data) if args.data else demo_corpus("kjv")
    work = Path(tempfile.mkdtemp(prefix="lmlab-stream-bench-"))
    tok = train_tokenizer("bpe", read_corpus([data], "blank"), 8192)
    tok.save(work / "tok")
    ocfg = ObjectiveConfig("clm", args.seq_len)
    store, _ = build_store([data], tok, work / "cache", "blank")
    stored = Batches(make_objective(ocfg, store, np.arange(store.n_docs), tok, "all"), args.batch_size, 0)
    objective = stream_objective(ocfg, tok)
    spec = StreamSpec([str(data)], "blank", "text", False, str(work / "tok"), tok.eos_id, objective.window, 0, 50)
    streamed = StreamBatches(objective, spec, args.batch_size, 0)
    choice = precision_choice("auto", torch.device("cpu"))
    print(environment(note="precision " + choice["precision"]))
    print(f"\ncorpus {data.name}: {store.n_docs:,} documents, {store.n_tokens:,} tokens")

    tokens = args.batch_size * args.seq_len
    rates = {}
    for name, source in (("token store", stored), ("stream", streamed)):
        source.next_batch()  # the worker's start-up and first windows, untimed
        start = time.perf_counter()
        for _ in range(200):
            source.next_batch()
        rates[name] = 200 * tokens / (time.perf_counter() - start)
    print("\n| data alone | tokens/s into the trainer |\n|---|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} |")

    cfg = preset("gpt2-tiny", vocab_size=tok.vocab_size, max_seq_len=args.seq_len)
    torch.manual_seed(0)
    model = Model(cfg).train()
    opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.98))
    autocast = torch.bfloat16 if choice["precision"] == "bf16" else None
    times: dict[str, list[float]] = {"token store": [], "stream": []}
    for step in range(args.steps + 3):
        for name, source in (("token store", stored), ("stream", streamed)):
            start = time.perf_counter()
            batch = source.next_batch()
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = model(**batch, labelled_logits_only=True).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 3:
                times[name].append(time.perf_counter() - start)
    streamed.close()
    a, b = statistics.median(times["token store"]) * 1e3, statistics.median(times["stream"]) * 1e3
    print(
        f"\n| training step (gpt2-tiny, seq {args.seq_len}, batch {args.batch_size}) | median ms |\n|---|---:|\n"
        f"| token store | {a:.1f} |\n| stream | {b:.1f} |\n| stream / token store | {b / a:.3f}x |"
    )


if __name__ == "__main__":
    main()
