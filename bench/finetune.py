"""Fine-tuning on a real task: tiny BERT and GPT pre-trained on the demo corpus, then fine-tuned to tell
which part of the Bible a passage comes from (kjv-sections, 6 classes, built by
scripts/build_task_data.py, split by chapter); beside a TF-IDF + logistic-regression baseline
(scikit-learn) on the same split, and the same two models fine-tuned from random weights. The
BERT classifies from the mean of its token states: the [CLS] state of a tiny BERT after a few hundred
CPU steps is the same for every input (std across inputs ~1e-5), so [CLS] pooling cannot learn.

    python bench/finetune.py --pretrain-steps 400 --epochs 1 --lr 1e-3 --out runs/finetune-bench
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
    a = ap.parse_args()
    import torch

    import lmlab
    from lmlab.finetune import FinetuneConfig, finetune
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
            t = time.perf_counter()
            r = finetune(
                FinetuneConfig(
                    task="classify",
                    model=str(folder),
                    train=str(task / "train.tsv"),
                    eval=str(task / "test.tsv"),
                    out=str(out / f"ft-{preset}-{start[:3]}"),
                    epochs=a.epochs,
                    lr=a.lr,
                    batch_size=32,
                    max_len=a.max_len,
                    pooling="mean" if family == "encoder" else None,
                )
            )
            rows.append(
                {
                    "model": f"lmlab {preset} ({start}, {a.pretrain_steps} pre-training steps)"
                    if start == "pre-trained"
                    else f"lmlab {preset} ({start})",
                    "accuracy": r["eval"]["accuracy"],
                    "macro_f1": r["eval"]["macro_f1"],
                    "minutes": (time.perf_counter() - t) / 60,
                }
            )
    print(
        f"\nkjv-sections (6 classes; train {counts['train']}, test {counts['test']} passages; split by chapter), "
        f"fine-tuning {a.epochs} epochs, lr {a.lr}, batch 32, max_len {a.max_len}; chance = majority class "
        f"{max_share(task / 'test.tsv'):.3f}"
    )
    print("| model | test accuracy | test macro-F1 | minutes |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['minutes']:.1f} |")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "counts": counts, "rows": rows}, indent=2))


def max_share(path: Path) -> float:
    labels = [line.split("\t")[-1] for line in path.read_text().splitlines()[1:] if line]
    return max(labels.count(v) for v in set(labels)) / len(labels)


if __name__ == "__main__":
    main()
