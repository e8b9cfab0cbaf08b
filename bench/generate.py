"""Decoding speed of lmlab's generate against transformers' generate on the same GPT-2-shaped model.

Both libraries decode greedily with their KV cache from the same weights (lmlab loads transformers'
checkpoint), in the same process, alternating, and must produce the same token ids (checked). New
tokens per second = batch x new tokens / wall time of the whole generate call (prompt included);
the median of the repeats is reported.

    python bench/generate.py                          # 6 layers, 512 wide, 32-token prompt, 256 new tokens
    python bench/generate.py --batches 1 8 --repeats 5 --json out.json
    python bench/generate.py --dtype bfloat16         # both in bf16; transformers in float32 timed too
    python bench/generate.py --int8 --batches 1       # and lmlab with int8 linear layers (lmlab.quantize)

In bfloat16 the two libraries round differently, so their greedy tokens may part ways at some step;
the share of new tokens they agree on is printed instead of being required.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch
from common import environment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and activations of both libraries"
    )
    ap.add_argument("--int8", action="store_true", help="also time lmlab with int8 linear layers (lmlab.quantize)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    import transformers

    import lmlab

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=a.vocab,
        n_embd=a.d_model,
        n_layer=a.layers,
        n_head=a.heads,
        n_positions=a.prompt + a.new,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    dtype = getattr(torch, a.dtype)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = lmlab.load(d, dtype=dtype).eval()
    if a.int8:
        from lmlab.quantize import quantize_int8

        ours8 = copy.deepcopy(ours).float()
        quantize_int8(ours8)
    hf32 = hf  # transformers in float32: timed too when the comparison runs in another dtype
    if dtype != torch.float32:
        hf = copy.deepcopy(hf32).to(dtype)

    def hf_generate(model, ids):
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=a.new,
            min_new_tokens=a.new,
            do_sample=False,
            pad_token_id=0,
        )

    rows, agree = [], {}
    for batch in a.batches:
        ids = torch.randint(1, a.vocab, (batch, a.prompt))
        runs = {
            "lmlab": lambda: ours.generate(ids, max_new_tokens=a.new, eos_token_id=-1),
            "transformers": lambda: hf_generate(hf, ids),
        }
        if hf32 is not hf:
            runs["transformers float32"] = lambda: hf_generate(hf32, ids)
        if a.int8:
            runs["lmlab int8"] = lambda: ours8.generate(ids, max_new_tokens=a.new, eos_token_id=-1)
        outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the tokens of both
        if a.int8:
            same8 = outputs["lmlab int8"][:, a.prompt :] == outputs["lmlab"][:, a.prompt :]
            agree[f"int8, batch {batch}"] = same8.float().mean().item()
        same = outputs["lmlab"][:, a.prompt :] == outputs["transformers"][:, a.prompt :]
        agree[batch] = same.float().mean().item()
        assert dtype != torch.float32 or bool(same.all()), "the two libraries decoded differently"
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(a.repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                with torch.no_grad():
                    fn()
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(t) for name, t in times.items()}
        for name in runs:
            rows.append(
                {
                    "batch": batch,
                    "impl": name,
                    "seconds": med[name],
                    "tokens_per_s": batch * a.new / med[name],
                    "ms_per_step": med[name] / a.new * 1e3,
                    "speedup": med["transformers"] / med[name],
                    "speedup_vs_float32": med.get("transformers float32", med["transformers"]) / med[name],
                }
            )
    print(
        f"\ngreedy decoding, GPT-2 shape d_model={a.d_model} layers={a.layers} heads={a.heads} vocab={a.vocab}, "
        f"{a.prompt}-token prompt, {a.new} new tokens, {a.dtype}, median of {a.repeats}"
    )
    print(environment())
    if dtype != torch.float32 or a.int8:
        print(
            "new tokens on which the contenders agree with lmlab / transformers: "
            + ", ".join(f"{b if isinstance(b, str) else f'batch {b}'}: {v:.1%}" for b, v in agree.items())
        )
    extra = " vs transformers float32 |" if dtype != torch.float32 else ""
    print(
        f"| batch | implementation | new tokens/s | ms per step | vs transformers ({a.dtype}) |{extra}\n"
        f"|---|---|---|---|---|{'---|' if extra else ''}"
    )
    for r in rows:
        tail = f" {r['speedup_vs_float32']:.2f}x |" if extra else ""
        print(
            f"| {r['batch']} | {r['impl']} | {r['tokens_per_s']:,.1f} | {r['ms_per_step']:.2f} | "
            f"{r['speedup']:.2f}x |{tail}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
