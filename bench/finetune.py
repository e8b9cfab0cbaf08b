"""Fine-tuning on a real task: tiny BERT and GPT pre-trained on the demo corpus, then fine-tuned to tell
which part of the Bible a passage comes from (kjv-sections, 6 classes, built by
scripts/build_task_data.py, split by chapter); beside a TF-IDF + logistic-regression baseline
(scikit-learn) on the same split, and the same two models fine-tuned from random weights. The
BERT classifies from the mean of its token states: the [CLS] state of a tiny BERT after a few hundred
CPU steps is the same for every input (std across inputs ~1e-5), so [CLS] pooling cannot learn.

    python bench/finetune.py --pretrain-steps 400 --epochs 1 --lr 1e-3 --out runs/finetune-bench
    python bench/finetune.py --methods full lora dora --lora-lr 1e-3    # full fine-tuning against adapters

Each fine-tuning runs in a process of its own, which reports its peak resident memory; with
--methods, the table adds the method, the trainable parameters, seconds per step and that peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tfidf_baseline(train: Path, test: Path) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from lmlab import metrics
    from lmlab.finetune import read_table

    tr, te = read_table(train)[0], read_table(test)[0]
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    x_train = vec.fit_transform([e.texts[0] for e in tr])
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(x_train, [e.label for e in tr])
    pred = list(clf.predict(vec.transform([e.texts[0] for e in te])))
    gold = [e.label for e in te]
    return {"accuracy": metrics.accuracy(gold, pred), "macro_f1": metrics.macro_f1(gold, pred)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument(
        "--pretrain-lr",
        type=float,
        nargs=2,
        default=[5e-4, 2e-3],
        metavar=("BERT", "GPT"),
        help="pre-training peak learning rates (post-LN BERT collapses at the GPT's 2e-3)",
    )
    ap.add_argument("--models", nargs="+", default=["bert-tiny", "gpt2-tiny"], choices=["bert-tiny", "gpt2-tiny"])
    ap.add_argument("--out", default="runs/finetune-bench")
    ap.add_argument("--methods", nargs="+", default=["full"], choices=["full", "lora", "dora"])
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="the learning rate of lora / dora runs")
    ap.add_argument("--lora-r", type=int, default=8)
    a = ap.parse_args()
    import torch

    import lmlab
    from lmlab.finetune import FinetuneConfig
    from lmlab.pretrain import PretrainConfig, pretrain
    from lmlab.tokenizer import load_tokenizer
    from lmlab.train import TrainConfig

    sys.path.insert(0, str(ROOT / "scripts"))
    from build_task_data import build_kjv_sections

    out = Path(a.out)
    counts = build_kjv_sections(out / "tasks")
    task = out / "tasks" / "kjv-sections"
    rows = []
    t = time.perf_counter()
    base = tfidf_baseline(task / "train.tsv", task / "test.tsv")
    rows.append(
        {"model": "TF-IDF (1-2 grams) + logistic regression", **base, "minutes": (time.perf_counter() - t) / 60}
    )
    for family, preset, lr in (("encoder", "bert-tiny", a.pretrain_lr[0]), ("decoder", "gpt2-tiny", a.pretrain_lr[1])):
        if preset not in a.models:
            continue
        pre = out / f"pretrained-{preset}"
        pretrain(
            PretrainConfig(
                out=str(pre),
                preset=preset,
                seq_len=128,
                train=TrainConfig(max_steps=a.pretrain_steps, lr=lr, warmup_steps=50, eval_batches=4),
            )
        )
        scratch = out / f"scratch-{preset}"  # the same architecture and tokenizer, random weights
        torch.manual_seed(0)
        lmlab.Model(lmlab.load(pre).config).save_pretrained(scratch)
        load_tokenizer(pre).save(scratch)
        for start, folder in (("pre-trained", pre), ("random init", scratch)):
            for method in a.methods:
                fc = FinetuneConfig(
                    task="classify",
                    model=str(folder),
                    train=str(task / "train.tsv"),
                    eval=str(task / "test.tsv"),
                    out=str(out / f"ft-{preset}-{start[:3]}-{method}"),
                    epochs=a.epochs,
                    lr=a.lr if method == "full" else a.lora_lr,
                    batch_size=32,
                    max_len=a.max_len,
                    pooling="mean" if family == "encoder" else None,
                    method=method,
                    lora_r=a.lora_r,
                )
                r, peak, seconds = in_own_process(fc)
                rows.append(
                    {
                        "model": f"lmlab {preset} ({start}, {a.pretrain_steps} pre-training steps)"
                        if start == "pre-trained"
                        else f"lmlab {preset} ({start})",
                        "method": method,
                        "accuracy": r["eval"]["accuracy"],
                        "macro_f1": r["eval"]["macro_f1"],
                        "minutes": seconds / 60,
                        "trainable_params": r["trainable_params"],
                        "total_params": r["total_params"],
                        "s_per_step": 60 * r["minutes"] / max(1, r["steps"]),
                        "peak_rss_mb": peak,
                    }
                )
    print(
        f"\nkjv-sections (6 classes; train {counts['train']}, test {counts['test']} passages; split by chapter), "
        f"fine-tuning {a.epochs} epochs, lr {a.lr}, batch 32, max_len {a.max_len}; chance = majority class "
        f"{max_share(task / 'test.tsv'):.3f}"
    )
    print(
        "| model | method | test accuracy | test macro-F1 | trainable / total parameters | s per step "
        "| peak RSS MB | minutes |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        extra = (
            f"{r['trainable_params']:,} / {r['total_params']:,} | {r['s_per_step']:.3f} | {r['peak_rss_mb']:,.0f}"
            if "method" in r
            else " | | "
        )
        print(
            f"| {r['model']} | {r.get('method', '')} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {extra} "
            f"| {r['minutes']:.1f} |"
        )
    (out / "results.json").write_text(json.dumps({"args": vars(a), "counts": counts, "rows": rows}, indent=2))


def _child(fc, queue) -> None:
    import resource

    from lmlab.finetune import finetune

    t = time.perf_counter()
    r = finetune(fc)
    queue.put((r, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t))


def in_own_process(fc) -> tuple[dict, float, float]:
    """(finetune's result, the process's peak resident memory in MB, seconds), in a fresh process."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fc, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def max_share(path: Path) -> float:
    labels = [line.split("\t")[-1] for line in path.read_text().splitlines()[1:] if line]
    return max(labels.count(v) for v in set(labels)) / len(labels)


if __name__ == "__main__":
    main()
