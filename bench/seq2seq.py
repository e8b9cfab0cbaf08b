"""Seq2seq fine-tuning on a real pair set: kjv-web (the King James Bible -> the World English Bible,
verse by verse; built by scripts/build_task_data.py --kjv-web, split by chapter). Four tiny models,
one per generative layout: t5-tiny and bart-tiny (encoder-decoders), gpt2-tiny (decoder: source,
separator, target in one sequence) and prefix-lm-tiny (the source as a bidirectional prefix). Each is
pre-trained on the built-in demo corpus with its family's objective and the same budget (T5 with
transformers' T5 initialisation, `init="t5"`: with lmlab's default 0.02 everywhere its unscaled
attention learns several times slower), then
fine-tuned on the same training pairs with the same budget, and scored on the same test verses by
greedy generation: sacreBLEU, chrF, ROUGE-L and exact match, beside the baseline of copying the
source (strong here: the two translations share most of their words), with the fine-tuning time
and the batched generation's tokens/s.

    apt-get install sword-text-web libsword-utils
    python bench/seq2seq.py --pretrain-steps 300 --train-pairs 4000 --test-pairs 200 --out runs/seq2seq-bench
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # preset -> pre-training objective
    "t5-tiny": "span",
    "bart-tiny": "infilling",
    "gpt2-tiny": "clm",
    "prefix-lm-tiny": "prefix-lm",
}


def subset(src: Path, dst: Path, n: int) -> Path:
    """The first n lines of a JSONL file (the builder's order: by book and chapter)."""
    lines = src.read_text(encoding="utf-8").splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--train-pairs", type=int, default=4000, help="fine-tuning pairs (1 epoch unless --epochs)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--test-pairs", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak learning rate")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", default="runs/seq2seq-bench")
    a = ap.parse_args()
    import torch
    from common import environment

    from lmlab import metrics
    from lmlab.finetune import FinetuneConfig, finetune
    from lmlab.pretrain import PretrainConfig, pretrain
    from lmlab.train import TrainConfig

    sys.path.insert(0, str(ROOT / "scripts"))
    from build_task_data import build_kjv_web

    out = Path(a.out)
    counts = build_kjv_web(out / "tasks")
    task = out / "tasks" / "kjv-web"
    train = subset(task / "train.jsonl", out / "train.jsonl", a.train_pairs)
    test = subset(task / "test.jsonl", out / "test.jsonl", a.test_pairs)
    pairs = [json.loads(line) for line in test.read_text().splitlines()]
    copy = metrics.generation_scores([p["source"] for p in pairs], [p["target"] for p in pairs])
    rows = [{"model": "copy the source (baseline)", **copy, "loss": None, "minutes": 0.0, "gen_tokens_per_s": None}]
    for preset, objective in MODELS.items():
        if preset not in a.models:
            continue
        pre = out / f"pretrained-{preset}"
        t = time.perf_counter()
        pretrain(
            PretrainConfig(
                out=str(pre),
                preset=preset,
                objective=objective,
                seq_len=128,
                # decoders read source + separator + target as one sequence; T5 gets transformers' T5 init
                model={"max_seq_len": 256, **({"init": "t5"} if preset.startswith("t5") else {})},
                train=TrainConfig(max_steps=a.pretrain_steps, batch_size=16, warmup_steps=30, eval_batches=4),
            )
        )
        pre_minutes = (time.perf_counter() - t) / 60
        torch.manual_seed(0)
        r = finetune(
            FinetuneConfig(
                task="seq2seq",
                model=str(pre),
                train=str(train),
                eval=str(test),
                out=str(out / f"ft-{preset}"),
                epochs=a.epochs,
                lr=a.lr,
                batch_size=16,
                max_len=256,
                max_target_len=96,
                truncate=True,
            )
        )
        ev = r["eval"]
        rows.append(
            {
                "model": f"lmlab {preset} ({objective}, {a.pretrain_steps} steps, {pre_minutes:.1f} min)",
                **ev,
                "minutes": r["minutes"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nkjv-web (train {counts['train']:,}, test {counts['test']:,} verse pairs, split by chapter); fine-tuned on "
        f"the first {a.train_pairs:,} training pairs for {a.epochs} epoch(s) at lr {a.lr}, batch 16, "
        f"scored on the first {a.test_pairs} test pairs, greedy; {environment()}"
    )
    print(f"signatures: BLEU {copy['bleu_signature']}; chrF {copy['chrf_signature']}")
    print("| model | BLEU | chrF | ROUGE-L | exact match | test loss | fine-tuning min | generation tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        loss = f"{r['loss']:.3f}" if r["loss"] is not None else "-"
        tps = f"{r['gen_tokens_per_s']:,.0f}" if r["gen_tokens_per_s"] else "-"
        print(
            f"| {r['model']} | {r['bleu']:.2f} | {r['chrf']:.2f} | {r['rougeL']:.2f} | {r['exact_match']:.1f} | "
            f"{loss} | {r['minutes']:.1f} | {tps} |"
        )
    (out / "results.json").write_text(json.dumps({"args": vars(a), "counts": counts, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
