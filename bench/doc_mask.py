"""What document masking (--doc-mask) costs a training step: the same model and batch with and without
`document_ids`, alternated step by step in one process, medians and their ratio.

Without document ids a causal model takes SDPA's is_causal fast path (no mask tensor); with them every
layer gets a (B, 1, T, T) block-diagonal mask, and positions restart per document. The batch is packed
from documents of random lengths (mean `--doc-len` tokens), as the token store packs a corpus.

    python bench/doc_mask.py                                   # the lab's shape: seq 64, batch 16
    python bench/doc_mask.py --seq-len 512 --batch-size 8 --doc-len 300
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import environment

from lmlab import Model
from lmlab.config import preset
from lmlab.train.optim import make_optimizer
from lmlab.train.trainer import precision_choice


def packed_documents(batch: int, seq_len: int, mean_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < seq_len:
            n = max(1, int(torch.empty(1).exponential_(1 / mean_len, generator=g)))
            ids += [doc] * n
            doc += 1
        rows.append(ids[:seq_len])
    return torch.tensor(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["gpt2-tiny", "prefix-lm-tiny", "bert-tiny"])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--doc-len", type=int, default=40, help="mean document length in tokens")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per contender (alternating)")
    args = ap.parse_args()
    choice = precision_choice("auto", torch.device("cpu"))
    autocast = torch.bfloat16 if choice["precision"] == "bf16" else None
    print(environment(note="precision " + choice["precision"]))
    print(
        f"\nseq_len {args.seq_len}, batch {args.batch_size}, documents of mean length {args.doc_len}\n"
        "| model | step without (ms) | step with --doc-mask (ms) | ratio |\n|---|---:|---:|---:|"
    )
    for name in args.presets:
        cfg = preset(name, vocab_size=args.vocab, max_seq_len=max(args.seq_len, 64))
        cfg = cfg.replace(heads=("mlm",) if cfg.family == "encoder" else ("lm",), pooler=False)
        torch.manual_seed(0)
        model = Model(cfg).train()
        opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.98))
        ids = torch.randint(5, args.vocab, (args.batch_size, args.seq_len))
        docs = packed_documents(args.batch_size, args.seq_len, args.doc_len, 0)
        extra = {}
        if cfg.family == "prefix-lm":  # the prefix-lm objective: one prefix per window, or per document
            extra = {False: {"prefix_lengths": torch.full((args.batch_size,), args.seq_len // 2)},
                     True: {"prefix_mask": docs.new_zeros(docs.shape, dtype=torch.bool)}}  # fmt: skip
        times = {False: [], True: []}
        for step in range(args.steps + 3):
            for masked in (False, True):
                kw = {"document_ids": docs, **extra.get(masked, {})} if masked else extra.get(masked, {})
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                    loss = model(ids, labels=ids, labelled_logits_only=True, **kw).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step >= 3:  # warm-up steps untimed
                    times[masked].append(time.perf_counter() - start)
        plain, masked = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
        print(f"| {name} | {plain:.1f} | {masked:.1f} | {masked / plain:.2f}x |")


if __name__ == "__main__":
    main()
