"""Decoding speed of lmlab's generate against transformers' generate on the same GPT-2-shaped model.

Both libraries decode greedily with their KV cache from the same weights (lmlab loads transformers'
checkpoint), in the same process, alternating, and must produce the same token ids (checked). New
tokens per second = batch x new tokens / wall time of the whole generate call (prompt included);
the median of the repeats is reported.

    python bench/generate.py                          # 6 layers, 512 wide, 32-token prompt, 256 new tokens
    python bench/generate.py --batches 1 8 --repeats 5 --json out.json
    python bench/generate.py --dtype bfloat16         # both in bf16; transformers in float32 timed too
    python bench/generate.py --int8 --batches 1       # and lmlab with int8 linear layers (lmlab.quantize)
    python bench/generate.py --int8 --floor           # and the floor those int8 kernels allow (below)
    python bench/generate.py --int8 --llama-cpp f32 f16 q8_0 q4_0 --batches 1   # and llama.cpp (below)
    python bench/generate.py --int8 --onnx            # and ONNX Runtime float32 / int8 (below)
    python bench/generate.py --fp16                   # and lmlab with float16 weights (lmlab.quantize)
    python bench/generate.py --prompt-lookup 10 --batches 1   # and prompt-lookup drafts of up to 10 tokens

`--llama-cpp Q...` also decodes with llama.cpp (llama-cpp-python, built from its source distribution;
see bench/gguf_parity.py) from the same weights written to GGUF at each type Q (`lmlab convert --to
gguf`, with a small byte-level BPE vocabulary of the built-in corpus: the prompts are ids, so only the
vocabulary's size matters), greedy through llama-cpp-python's `generate` (its Python loop per token
is what its users get). At batch 1 through llama-cpp-python's high-level `generate`; at larger batches through its ctypes
binding of llama.h (the high-level API decodes one sequence): all prompts in one `llama_decode`, then
one `llama_decode` of B tokens per step, one sequence id per row. llama.cpp
computes GELU from a float16 table, so its greedy tokens may part ways with lmlab's at some step; the
share of new tokens they agree on is printed.

`--onnx` also decodes in ONNX Runtime from the same weights exported with `lmlab convert --to onnx
--quantize int8` (the graph takes and returns the KV cache; lmlab.export_onnx.OnnxDecoder is the greedy
loop, one `InferenceSession.run` per token), float32 and dynamic int8, at every batch size.

`--floor` times a hand-written decode loop on lmlab's int8 weights: no modules, no checks, a cache
preallocated for the whole run, the GPT-2 block written out op by op, greedy. It is not a way to run
models; it measures what is left for any eager implementation once the int8 matmuls, attention and
norms are paid for, so that a target can be compared with what this CPU allows. Its tokens are
compared with lmlab int8's.

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
    ap.add_argument("--floor", action="store_true", help="with --int8: also time the hand-written int8 floor")
    ap.add_argument("--fp16", action="store_true", help="also time lmlab with float16-weight linear layers")
    ap.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="K",
        help="also time lmlab's prompt-lookup decoding with drafts of up to K tokens (batch 1)",
    )
    ap.add_argument(
        "--llama-cpp", nargs="+", default=[], metavar="Q", help="also llama.cpp at these GGUF types (batch 1)"
    )
    ap.add_argument("--onnx", action="store_true", help="also ONNX Runtime float32 and int8 (lmlab convert --to onnx)")
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
        llms = llama_cpp_models(d, a) if a.llama_cpp else {}
        onnx = onnx_decoders(d) if a.onnx else {}
    if a.int8:
        from lmlab.quantize import quantize_int8

        ours8 = copy.deepcopy(ours).float()
        quantize_int8(ours8)
    if a.fp16:
        from lmlab.quantize import quantize_fp16

        ours16 = copy.deepcopy(ours).float()
        quantize_fp16(ours16)
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
        if a.prompt_lookup and batch == 1:
            runs["lmlab prompt lookup"] = lambda: ours.generate(
                ids, max_new_tokens=a.new, eos_token_id=-1, prompt_lookup_num_tokens=a.prompt_lookup
            )
        if a.fp16:
            runs["lmlab fp16 weights"] = lambda: ours16.generate(ids, max_new_tokens=a.new, eos_token_id=-1)
        if a.int8 and a.floor:
            runs["int8 floor"] = lambda: int8_floor(ours8, ids, a.new)
        for name, dec in onnx.items():
            runs[name] = lambda dec=dec: torch.from_numpy(dec.greedy(ids.numpy(), a.new))
        for q, llm in llms.items():
            if batch == 1:
                runs[f"llama.cpp {q}"] = lambda llm=llm: llama_cpp_generate(llm, ids, a.new)
            else:  # several sequences in one llama_decode per step (llama.cpp's low-level batch API)
                runs[f"llama.cpp {q}"] = lambda llm=llm: llama_cpp_batch_generate(llm, ids, a.new)
        outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the tokens of both
        if a.int8:
            same8 = outputs["lmlab int8"][:, a.prompt :] == outputs["lmlab"][:, a.prompt :]
            agree[f"int8, batch {batch}"] = same8.float().mean().item()
        for q in llms:
            same_q = outputs[f"llama.cpp {q}"][:, a.prompt :] == outputs["lmlab"][:, a.prompt :]
            agree[f"llama.cpp {q} vs lmlab, batch {batch}"] = same_q.float().mean().item()
        if "lmlab prompt lookup" in outputs:
            same_pl = outputs["lmlab prompt lookup"][:, a.prompt :] == outputs["lmlab"][:, a.prompt :]
            agree[f"prompt lookup, batch {batch}"] = same_pl.float().mean().item()
        if a.fp16:
            same16 = outputs["lmlab fp16 weights"][:, a.prompt :] == outputs["lmlab"][:, a.prompt :]
            agree[f"fp16 weights, batch {batch}"] = same16.float().mean().item()
        for name in onnx:
            same_o = outputs[name][:, a.prompt :] == outputs["lmlab"][:, a.prompt :]
            agree[f"{name} vs lmlab, batch {batch}"] = same_o.float().mean().item()
        if "int8 floor" in outputs:
            floor = outputs["int8 floor"][:, a.prompt :] == outputs["lmlab int8"][:, a.prompt :]
            agree[f"int8 floor vs lmlab int8, batch {batch}"] = floor.float().mean().item()
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
    if dtype != torch.float32 or a.int8 or a.fp16 or llms or onnx or a.prompt_lookup:
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


def llama_cpp_models(hf_folder: str, a: argparse.Namespace) -> dict:
    """llama.cpp models of the same weights, one per GGUF type in a.llama_cpp."""
    import gzip
    import pathlib

    import llama_cpp

    from lmlab.data.corpus import demo_corpus
    from lmlab.export_gguf import write_gguf
    from lmlab.tokenizer import train_tokenizer

    folder = pathlib.Path(hf_folder)
    docs = gzip.open(demo_corpus("kjv"), "rt").read()[:300_000].split("\n\n")
    train_tokenizer("bpe", docs, min(1000, a.vocab)).save(folder)
    out = {}
    for q in a.llama_cpp:
        path = folder / f"{q}.gguf"
        write_gguf(folder, path, q)
        out[q] = llama_cpp.Llama(
            model_path=str(path), n_ctx=a.prompt + a.new, n_threads=torch.get_num_threads(), verbose=False
        )
    return out


def onnx_decoders(hf_folder: str) -> dict:
    """ONNX Runtime greedy loops (lmlab.export_onnx.OnnxDecoder) over the same weights, float32 and int8."""
    import pathlib

    from lmlab.export_onnx import OnnxDecoder, write_onnx

    out = pathlib.Path(hf_folder) / "onnx"
    write_onnx(hf_folder, out, quantize="int8")
    threads = torch.get_num_threads()
    return {
        "ONNX Runtime float32": OnnxDecoder(out, threads=threads),
        "ONNX Runtime int8": OnnxDecoder(out, int8=True, threads=threads),
    }


def llama_cpp_batch_generate(llm, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding of B sequences at once in llama.cpp: the B prompts in one llama_decode (sequence
    ids 0..B-1), then one llama_decode of B tokens per step, through llama-cpp-python's ctypes binding of
    llama.h (its high-level API decodes one sequence). The context is made once per model and batch
    size, and its memory cleared before each call."""

    import llama_cpp
    import numpy as np

    B, T = ids.shape
    key = ("batch_ctx", B)
    if key not in llm.__dict__:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = B * (T + new)
        params.n_batch = params.n_ubatch = max(B * T, 512)
        params.n_seq_max = B
        params.n_threads = params.n_threads_batch = torch.get_num_threads()
        params.type_k = params.type_v = 0  # a float32 KV cache, as the batch-1 path uses
        ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        llm.__dict__[key] = (ctx, llama_cpp.llama_batch_init(B * T, 0, 1))
    ctx, batch = llm.__dict__[key]
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    n_vocab = llm.n_vocab()

    def decode(rows: list[list[int]], start: int) -> np.ndarray:
        n = 0
        for s, row in enumerate(rows):
            for j, token in enumerate(row):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, start + j, 1
                batch.seq_id[n][0], batch.logits[n] = s, j == len(row) - 1
                n += 1
        batch.n_tokens = n
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        last = [sum(len(r) for r in rows[: s + 1]) - 1 for s in range(len(rows))]
        return np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)) for i in last])

    tokens = decode(ids.tolist(), 0).argmax(-1)
    made = [tokens]
    for step in range(1, new):
        tokens = decode([[int(t)] for t in tokens], T + step - 1).argmax(-1)
        made.append(tokens)
    return torch.cat([ids, torch.from_numpy(np.stack(made, 1)).long()], dim=1)


def llama_cpp_generate(llm, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding of one sequence in llama.cpp: prompt, then `new` tokens (EOS not honoured)."""
    prompt = ids[0].tolist()
    made = []
    llm.reset()
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        made.append(token)
        if len(made) == new:
            break
    return torch.tensor([prompt + made])


@torch.no_grad()
def int8_floor(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding of a quantized GPT-2-shaped lmlab model, written out op by op (see --floor)."""
    import torch.nn.functional as F

    linear = torch.ops.quantized.linear_dynamic.default._op
    stack, cfg = model.decoder, model.config
    B, T = ids.shape
    H, D, C = cfg.n_heads, cfg.dim_head, cfg.d_model
    out = model(ids, use_cache=True)  # the prompt through lmlab itself
    K = [ids.new_zeros(B, H, T + new, D, dtype=torch.float32) for _ in stack.layers]
    V = [torch.zeros_like(k) for k in K]
    for i, layer in enumerate(out.past_key_values.layers):
        K[i][:, :, :T], V[i][:, :, :T] = layer.k[:, :, :T], layer.v[:, :, :T]
    tok = out.logits[:, -1].argmax(-1)
    seq = [ids, tok[:, None]]
    for pos in range(T, T + new - 1):
        x = model.tok_embed.weight[tok] + stack.pos_embed.weight[pos]  # (B, C)
        for i, b in enumerate(stack.layers):
            h = F.layer_norm(x, (C,), b.attn_norm.weight, b.attn_norm.bias, cfg.norm_eps)
            q, k, v = linear(h, b.attn.qkv._packed, True).view(B, 3, H, D).unbind(1)
            K[i][:, :, pos], V[i][:, :, pos] = k, v
            y = F.scaled_dot_product_attention(q[:, :, None], K[i][:, :, : pos + 1], V[i][:, :, : pos + 1])
            x = x + linear(y.view(B, C), b.attn.out._packed, True)
            h = F.layer_norm(x, (C,), b.ffn_norm.weight, b.ffn_norm.bias, cfg.norm_eps)
            x = x + linear(F.gelu(linear(h, b.ffn.up._packed, True), approximate="tanh"), b.ffn.down._packed, True)
        x = F.layer_norm(x, (C,), stack.final_norm.weight, stack.final_norm.bias, cfg.norm_eps)
        tok = linear(x, model.lm_head.packed._packed, True).argmax(-1)
        seq.append(tok[:, None])
    return torch.cat(seq, dim=1)


if __name__ == "__main__":
    main()
