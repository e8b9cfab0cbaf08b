"""The main job of the README: pre-train a tiny GPT and a tiny BERT on the built-in corpus, then use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from lmlab.generate import fill_mask
from lmlab.io import load
from lmlab.pretrain import PretrainConfig, pretrain
from lmlab.tokenizer import load_tokenizer
from lmlab.train import TrainConfig

PROMPT = "And God said unto Moses,"
MASKED = "And God said, Let there be [MASK]: and there was light."


def train_demo_models(out: str | Path, steps: int = 200, on_event: Callable | None = None,
                      start: Callable[[str], Any] | None = None) -> dict[str, dict]:
    """Pre-train gpt2-tiny (causal LM) and bert-tiny (MLM + NSP) on the King James Bible."""
    results = {}
    # post-LN BERT at the GPT's 2e-3 collapses its token states onto one vector within a few hundred
    # steps (docs/benchmarks.md, fine-tuning); 5e-4 keeps them apart
    for name, family, lr in (("gpt", "decoder", 2e-3), ("bert", "encoder", 5e-4)):
        if start:
            start(name)
        pc = PretrainConfig(out=str(Path(out) / name), family=family, seq_len=128,
                            train=TrainConfig(max_steps=steps, batch_size=16, lr=lr, warmup_steps=20,
                                              eval_every=max(steps // 2, 1), save_every=steps, log_every=10))
        results[name] = pretrain(pc, on_event)
    return results


def use_demo_models(out: str | Path, seed: int = 0) -> dict[str, Any]:
    """A sampled continuation from the GPT and the fill-mask candidates of the BERT."""
    gpt_dir, bert_dir = Path(out) / "gpt", Path(out) / "bert"
    gpt, gpt_tok = load(gpt_dir), load_tokenizer(gpt_dir)
    ids = torch.tensor([gpt_tok.encode(PROMPT)])
    sample = gpt.generate(ids, max_new_tokens=48, do_sample=True, top_k=40, temperature=0.8, seed=seed)
    bert, bert_tok = load(bert_dir), load_tokenizer(bert_dir)
    return {"prompt": PROMPT, "continuation": gpt_tok.decode(sample[0, ids.shape[1]:].tolist()),
            "masked": MASKED, "candidates": fill_mask(bert, bert_tok, MASKED, top_k=5)[0]}
