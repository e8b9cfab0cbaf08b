"""Does T5's own initialisation matter? A tiny T5 built from scratch (no pre-training) with lmlab's
default init (N(0, 0.02) everywhere, GPT-2's depth-scaled residual projections) and with
transformers' T5 init (`init="t5"`: Mesh TensorFlow's fan-in scaling), both fine-tuned for seq2seq
on the same kjv-web pairs with the same budget and seed; prints the test loss, token accuracy, BLEU
and chrF of each. The tokenizer comes from a folder (e.g. bench/seq2seq.py's pre-trained T5).

    python bench/t5_init.py --tokenizer runs/seq2seq-bench/pretrained-t5-tiny \
        --train runs/seq2seq-bench/train.jsonl --test runs/seq2seq-bench/test.jsonl --pairs 4000 --test-pairs 50
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--pairs", type=int, default=4000, help="training pairs (half an epoch over them is run)")
    ap.add_argument("--test-pairs", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    import torch
    from common import environment

    import lmlab
    from lmlab.finetune import FinetuneConfig, finetune
    from lmlab.tokenizer import load_tokenizer

    root = Path(tempfile.mkdtemp(prefix="t5-init-"))
    train, test = root / "train.jsonl", root / "test.jsonl"
    train.write_text("\n".join(Path(a.train).read_text().splitlines()[: a.pairs]) + "\n")
    test.write_text("\n".join(Path(a.test).read_text().splitlines()[: a.test_pairs]) + "\n")
    tok = load_tokenizer(a.tokenizer)
    print("| init | test loss | token accuracy | BLEU | chrF | seconds |\n|---|---|---|---|---|---|")
    for init in ("normal", "t5"):
        cfg = lmlab.preset("t5-tiny", vocab_size=tok.vocab_size, init=init, **tok.model_ids())
        cfg = cfg.replace(decoder_start_token_id=tok.pad_id)
        torch.manual_seed(0)
        lmlab.Model(cfg).save_pretrained(root / init)
        tok.save(root / init)
        t = time.perf_counter()
        r = finetune(
            FinetuneConfig(
                task="seq2seq",
                model=str(root / init),
                train=str(train),
                eval=str(test),
                out=str(root / f"ft-{init}"),
                epochs=0.5,
                lr=a.lr,
                batch_size=16,
                max_len=256,
                max_target_len=96,
                truncate=True,
            )
        )
        ev = r["eval"]
        print(
            f"| {init} | {ev['loss']:.3f} | {ev['token_accuracy']:.3f} | {ev['bleu']:.2f} | {ev['chrf']:.2f} | "
            f"{time.perf_counter() - t:.0f} |"
        )
    print(environment())


if __name__ == "__main__":
    main()
