"""How close llama.cpp runs an lmlab model exported to GGUF: perplexity and top-1 agreement per weight type.

The model (a GPT-2- or LLaMA-style lmlab decoder folder with its tokenizer) is written to GGUF at f32,
f16, q8_0 and q4_0 (`lmlab convert --to gguf`), loaded in llama.cpp through llama-cpp-python (a float32
KV cache, so only the weights differ), and scored on the same windows of text as lmlab scores them:
perplexity of every next token and the share of positions whose most likely next token agrees with
lmlab float32's.

llama-cpp-python builds llama.cpp from its source distribution (about 6 minutes on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip wheel --no-deps llama-cpp-python==0.3.36 -w wheels/
    pip install wheels/llama_cpp_python-*.whl "torch==2.13.0"
    python bench/gguf_parity.py runs/gpt --text held_out.txt --windows 64
"""

from __future__ import annotations

import argparse
import gzip
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import environment


def next_token_nll(logits: np.ndarray, window: list[int]) -> tuple[float, np.ndarray]:
    """Summed negative log-likelihood of window[1:] and the argmax at each position before it."""
    lp = torch.log_softmax(torch.tensor(logits[:-1], dtype=torch.float64), -1)
    target = torch.tensor(window[1:])
    return -lp[torch.arange(len(target)), target].sum().item(), logits[:-1].argmax(-1)


def main() -> None:
    import llama_cpp

    from lmlab.data.corpus import demo_corpus
    from lmlab.export_gguf import write_gguf
    from lmlab.io import load
    from lmlab.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="lmlab decoder folder (GPT-2 or LLaMA style) with its tokenizer")
    ap.add_argument("--text", help="text to score (default: the last 200 KB of the built-in corpus)")
    ap.add_argument("--windows", type=int, default=64, help="windows of the model's context length")
    ap.add_argument("--quants", nargs="+", default=["f32", "f16", "q8_0", "q4_0"])
    a = ap.parse_args()
    model = load(a.model).eval()
    tok = load_tokenizer(a.model)
    text = Path(a.text).read_text() if a.text else gzip.open(demo_corpus("kjv"), "rt").read()[-200_000:]
    ids = tok.encode(text, add_special_tokens=False)
    n_ctx = model.config.max_seq_len
    windows = [ids[i : i + n_ctx] for i in range(0, a.windows * n_ctx, n_ctx) if len(ids[i : i + n_ctx]) > 1]
    count = sum(len(w) - 1 for w in windows)
    ours_nll, ours_top = 0.0, []
    with torch.no_grad():
        for w in windows:
            nll, top = next_token_nll(model(input_ids=torch.tensor([w])).logits[0].numpy(), w)
            ours_nll += nll
            ours_top.append(top)
    base = math.exp(ours_nll / count)
    print("| weights | perplexity | vs lmlab float32 | top-1 agreement |\n|---|---|---|---|")
    print(f"| lmlab float32 | {base:.4f} | | |")
    tmp = Path(tempfile.mkdtemp())
    for q in a.quants:
        path = tmp / f"{q}.gguf"
        write_gguf(a.model, path, q)
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            logits_all=True,
            verbose=False,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
        )
        nll_sum, agree = 0.0, 0
        for w, top in zip(windows, ours_top):
            llm.reset()
            llm.eval(w)
            nll, theirs = next_token_nll(np.array(llm.scores[: len(w)]), w)
            nll_sum += nll
            agree += int((theirs == top).sum())
        ppl = math.exp(nll_sum / count)
        print(f"| llama.cpp {q} | {ppl:.4f} | {(ppl / base - 1) * 100:+.2f}% | {agree / count:.4f} |")
    print(f"\n{count} tokens in {len(windows)} windows; llama-cpp-python {llama_cpp.__version__}; {environment()}")


if __name__ == "__main__":
    main()
