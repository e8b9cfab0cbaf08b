"""Training speed of a comparison's contender against nanoGPT's model at the same shape, in one process.

The shape is `lmlab compare`'s default body (or the one its flags name): a decoder of --d-model width,
--n-layers layers, --n-heads heads, --d-ff FFN, --seq-len tokens, batch --batch-size, vocabulary
--vocab-size. nanoGPT's `model.py` (github.com/karpathy/nanoGPT; pass its path with --nanogpt, nothing
of it is shipped here) is built with the same width, depth, heads, context, vocabulary and FFN
(4 x width), no dropout. Both train with the same step: forward + backward + torch.optim.AdamW
(foreach) on a fixed random batch, in float32 and under bf16 autocast, eager and `torch.compile`d.
The contenders alternate round by round; the median tokens/s over the rounds is reported, and the
ratio lmlab / nanoGPT.

    python bench/lab_shape.py --nanogpt ../nanoGPT/model.py
    python bench/lab_shape.py --nanogpt ../nanoGPT/model.py --rounds 5 --steps 20 --modes eager-fp32 compiled-bf16
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from common import environment

MODES = ("eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16")


def lmlab_model(a: argparse.Namespace):
    from lmlab.compare.contenders import Contender, model_config
    from lmlab.compare.settings import CompareConfig
    from lmlab.model import Model
    from lmlab.tokenizer import train_shared_tokenizer

    cc = CompareConfig(
        d_model=a.d_model,
        n_layers=a.n_layers,
        n_heads=a.n_heads,
        d_ff=a.d_ff,
        seq_len=a.seq_len,
        vocab_size=a.vocab_size,
    )
    from lmlab.data.corpus import demo_corpus, read_corpus

    tok = train_shared_tokenizer(read_corpus([demo_corpus("kjv")], "blank", "text"), a.vocab_size)  # the lab's own
    if tok.vocab_size < a.vocab_size:
        raise SystemExit(f"the tokenizer has {tok.vocab_size} tokens, fewer than --vocab-size {a.vocab_size}")
    cfg = model_config(cc, Contender("decoder", "decoder", None, "clm"), tok)
    torch.manual_seed(0)
    model = Model(cfg)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, labels=x).loss  # the trainer's call: the model shifts the labels

    return model, loss, cfg.vocab_size


def nanogpt_model(a: argparse.Namespace, path: str, vocab: int):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = mod
    spec.loader.exec_module(mod)
    cfg = mod.GPTConfig(
        block_size=a.seq_len, vocab_size=vocab, n_layer=a.n_layers, n_head=a.n_heads, n_embd=a.d_model, dropout=0.0
    )
    torch.manual_seed(0)
    model = mod.GPT(cfg)

    def loss(x: torch.Tensor) -> torch.Tensor:
        _, out = model(x, torch.roll(x, -1, 1))  # the same T positions as lmlab's (the last target wraps)
        return out

    return model, loss


def make_step(model, loss_fn, mode: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode.endswith("bf16") else nullcontext()

    def fwd_bwd(x):
        with autocast:
            loss = loss_fn(x)
        loss.backward()
        return loss

    fb = torch.compile(fwd_bwd) if mode.startswith("compiled") else fwd_bwd

    def step(x):
        loss = fb(x)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", required=True, help="path of nanoGPT's model.py")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    a = p.parse_args()
    if a.d_ff != 4 * a.d_model:
        p.error("nanoGPT's FFN is 4 x d_model: keep --d-ff at 4 x --d-model")
    print(f"# {environment()}")
    print(f"# python bench/lab_shape.py {' '.join(sys.argv[1:])}")
    lm_model, lm_loss, vocab = lmlab_model(a)
    ng_model, ng_loss = nanogpt_model(a, a.nanogpt, vocab)
    x = torch.randint(0, vocab, (a.batch_size, a.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = a.batch_size * a.seq_len
    print("| mode | lmlab tokens/s | nanoGPT tokens/s | lmlab / nanoGPT |")
    print("|---|---|---|---|")
    for mode in a.modes:
        torch._dynamo.reset()
        steps = {"lmlab": make_step(lm_model, lm_loss, mode), "nanoGPT": make_step(ng_model, ng_loss, mode)}
        for step in steps.values():  # warm-up (and compilation)
            for _ in range(3):
                step(x)
        rates: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(a.rounds):
            for name, step in steps.items():
                t = time.perf_counter()
                for _ in range(a.steps):
                    step(x)
                rates[name].append(a.steps * tokens / (time.perf_counter() - t))
        lm, ng = statistics.median(rates["lmlab"]), statistics.median(rates["nanoGPT"])
        print(f"| {mode} | {lm:,.0f} | {ng:,.0f} | {lm / ng:.2f} |", flush=True)


if __name__ == "__main__":
    main()
