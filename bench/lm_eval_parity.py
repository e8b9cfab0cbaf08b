"""lmlab's multiple-choice scorer against lm-evaluation-harness on the same exported model.

A gpt2-tiny-shaped decoder (random weights, seed 0, a context of 64 tokens so that few-shot prompts
overflow it) with a byte-level BPE tokenizer trained on the built-in corpus is saved in Hugging Face
format; lm-eval's HFLM loads that folder and scores the same requests as `lmlab.fewshot.loglikelihood`:
questions built from held-out text (0-shot and 3-shot prompts, the latter longer than the context),
the same questions with a trailing space on the query, and an empty query. Prints the largest
difference of per-choice log-likelihoods and both scorers' acc / acc_norm (lm-eval's definitions
applied to its own log-likelihoods).

    pip install "lm-eval==0.4.13" accelerate "torch==2.13.0"
    python bench/lm_eval_parity.py --questions 40
"""

from __future__ import annotations

import argparse
import random
import tempfile

import numpy as np
import torch

import lmlab
from lmlab.compare.measure import build_questions
from lmlab.data.corpus import demo_corpus, read_corpus
from lmlab.data.store import build_store
from lmlab.fewshot import TARGET_DELIMITER, fewshot_prompt, loglikelihood
from lmlab.tokenizer import train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--context", type=int, default=64)
    a = ap.parse_args()
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    files = [demo_corpus("kjv")]
    tok = train_tokenizer("bpe", read_corpus(files, "blank"), 2048)
    store, _ = build_store(files, tok, "runs/cache", "blank")
    val = store.stream(store.split(0.05, 0)["val"], tok.eos_id, "val")
    questions = build_questions(tok, val, a.questions, seed=0)
    torch.manual_seed(0)
    cfg = lmlab.preset("gpt2-tiny", vocab_size=tok.vocab_size, max_seq_len=a.context, **tok.model_ids())
    model = lmlab.Model(cfg).eval()
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder, format="hf")
    tok.save(folder)
    lm = HFLM(pretrained=folder, tokenizer=folder, device="cpu", batch_size=1)
    rng = random.Random(0)
    requests, groups = [], []
    for shots in (0, 3):
        for i, q in enumerate(questions):
            demos = rng.sample([x for j, x in enumerate(questions) if j != i], shots)
            for query in (q["query"], q["query"] + " "):
                prompt = fewshot_prompt(demos, query)
                groups.append((shots, query.endswith(" "), q, len(requests)))
                requests += [(prompt, TARGET_DELIMITER + c) for c in q["choices"]]
    requests.append(("", "In the beginning"))
    theirs = [r[0] for r in lm.loglikelihood([Instance("loglikelihood", {}, req, i) for i, req in enumerate(requests)])]
    with torch.no_grad():
        ours = [loglikelihood(model, tok, ctx, cont) for ctx, cont in requests]
    diff = np.abs(np.array(ours) - np.array(theirs))
    print(f"lm-eval HFLM max_length {lm.max_length}, {len(requests)} requests")
    print(f"max |lmlab - lm-eval| per-choice log-likelihood: {diff.max():.2e} (median {np.median(diff):.1e})")
    print(f"empty query: lmlab {ours[-1]:.5f}, lm-eval {theirs[-1]:.5f}")
    print("| shots | query | lmlab acc | lm-eval acc | lmlab acc_norm | lm-eval acc_norm |")
    print("|---|---|---|---|---|---|")
    for shots in (0, 3):
        for trailing in (False, True):
            rows = [g for g in groups if g[0] == shots and g[1] == trailing]
            acc = {"lmlab": [0, 0], "lm-eval": [0, 0]}
            for _, _, q, start in rows:
                lens = [float(len(c)) for c in q["choices"]]
                for name, lls in (("lmlab", ours), ("lm-eval", theirs)):
                    ll = np.array(lls[start : start + len(q["choices"])])
                    acc[name][0] += int(np.argmax(ll) == q["gold"])
                    acc[name][1] += int(np.argmax(ll / np.array(lens)) == q["gold"])
            n = len(rows)
            print(
                f"| {shots} | {'ends in a space' if trailing else 'plain'} | {acc['lmlab'][0] / n:.3f} | "
                f"{acc['lm-eval'][0] / n:.3f} | {acc['lmlab'][1] / n:.3f} | {acc['lm-eval'][1] / n:.3f} |"
            )


if __name__ == "__main__":
    main()
