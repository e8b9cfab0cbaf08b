"""How much margin the tiny T5's extractive-QA fine-tuning has at a learning rate: the data and
settings of tests/test_finetune.py::test_qa_learns_to_point_at_the_answer_across_windows[t5], over
several initialisations of the pre-trained folder and fine-tuning seeds. Prints exact match per run.

    python bench/qa_lr_sweep.py --lr 3e-3 1e-3 --inits 0 1 2 --seeds 0 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-3, 1e-3])
    ap.add_argument("--inits", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--init", choices=("normal", "t5"), default="normal", help="ModelConfig.init of the tiny T5s")
    a = ap.parse_args()
    from common import environment
    from conftest import tiny_config, tiny_text
    from test_finetune import _squad

    import lmlab
    from lmlab.finetune import FinetuneConfig, finetune
    from lmlab.tokenizer import train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="qa-sweep-"))
    text = tiny_text()
    tok = train_tokenizer("unigram", text, 400)  # as the test's tiny_pretrained fixture builds its T5
    train, dev = _squad(root / "train.json", 300, 0, 0.2), _squad(root / "dev.json", 60, 1, 0.2)
    rows = []
    for init in a.inits:
        torch.manual_seed(init)
        cfg = tiny_config("t5-tiny", tok).replace(init=a.init)
        lmlab.Model(cfg).save_pretrained(root / f"t5-{init}")
        tok.save(root / f"t5-{init}")
        for lr in a.lr:
            for seed in a.seeds:
                t = time.perf_counter()
                r = finetune(
                    FinetuneConfig(
                        task="qa",
                        model=str(root / f"t5-{init}"),
                        train=str(train),
                        eval=str(dev),
                        out=str(root / "out"),
                        epochs=a.epochs,
                        lr=lr,
                        batch_size=16,
                        max_len=64,
                        doc_stride=16,
                        seed=seed,
                    )
                )
                rows.append((lr, init, seed, r["eval"]["exact_match"], time.perf_counter() - t))
    print("\n| lr | init | seed | exact match | seconds |\n|---|---|---|---|---|")
    for lr, init, seed, em, sec in rows:
        print(f"| {lr:g} | {init} | {seed} | {em:.1f} | {sec:.0f} |")
    for lr in a.lr:
        ems = [em for r_lr, _, _, em, _ in rows if r_lr == lr]
        print(f"lr {lr:g}: min exact match {min(ems):.1f} over {len(ems)} runs")
    print(environment())


if __name__ == "__main__":
    main()
