"""A static decode graph through torch.compile against lmlab's eager decoding: the issue's lever, measured.

The step runs over a KV cache preallocated for the whole run (keys and values written in place at
the step's position, the unfilled slots masked out), so every step has the same shapes and compiles
once (`torch.compile(dynamic=False)`, inductor with its C++ wrapper and weight freezing). The prompt
goes through lmlab eagerly; then both decode greedily the same number of tokens from the same weights
(float32, float16 weights, int8); the share of equal tokens is printed. New tokens per second,
median of the repeats, alternating in one process. The script also prints how often dynamo breaks
the step's graph.

    python bench/static_decode.py                 # the 6-layer, 512-wide GPT, batch 1, 128 new tokens
    python bench/static_decode.py --batch 8 --repeats 5
    python bench/static_decode.py --llama-cpp f32 f16 q8_0   # and llama.cpp in the same run

fbgemm's packed weights (fp16, int8) reach the compiler as one opaque op each (`lmlab::packed_linear`,
lmlab.quantize), so those steps compile whole too.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from common import environment


class StaticKV:
    """One layer's keys and values for the whole run; `append` writes at `pos` and returns the lot."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v, self.length, self.pos = k, v, 0, torch.tensor([0])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, self.pos, k)
        self.v.index_copy_(2, self.pos, v)
        return self.k, self.v


class StaticCache:
    seen = 0  # read only for relative-position bias and multi-token queries; a decode step has neither

    def __init__(self, model, batch: int, capacity: int) -> None:
        c = model.config
        shape = (batch, c.kv_heads, capacity, c.dim_head)
        self.layers, self.cross = [StaticKV(torch.zeros(shape), torch.zeros(shape)) for _ in range(c.n_layers)], []


def decode_static(model, step, cache: StaticCache, ids: torch.Tensor, new: int) -> torch.Tensor:
    from lmlab.model.attention import KVCache

    B, T = ids.shape
    capacity = cache.layers[0].k.shape[2]
    with torch.no_grad():
        kv = KVCache(model.config.n_layers)
        out = model(ids, use_cache=True, past_key_values=kv)
        for s, layer in zip(cache.layers, kv.layers):
            s.k[:, :, :T], s.v[:, :, :T] = layer.k[:, :, :T], layer.v[:, :, :T]
        token = out.logits[:, -1].argmax(-1)
        made = [token]
        mask = torch.zeros(B, capacity, dtype=torch.long)
        mask[:, :T] = 1
        for p in range(T, T + new - 1):
            mask[:, p] = 1
            pos = torch.tensor([p])
            for s in cache.layers:
                s.pos = pos
            token = step(token[:, None], pos.expand(B, 1), mask)[:, -1].argmax(-1)
            made.append(token)
    return torch.cat([ids, torch.stack(made, 1)], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-cpp", nargs="*", default=[], metavar="Q", help="also llama.cpp at these GGUF types")
    a = ap.parse_args()
    a.vocab = 8192
    import torch._inductor.config as inductor
    import transformers

    import lmlab
    from lmlab.quantize import quantize_fp16, quantize_int8

    torch._dynamo.config.cache_size_limit = 64  # one compiled step per weight kind, each with its own guards
    inductor.cpp_wrapper = True
    inductor.freezing = True
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=8192, n_embd=512, n_layer=6, n_head=8, n_positions=a.prompt + a.new)
    with tempfile.TemporaryDirectory() as d:
        transformers.GPT2LMHeadModel(hf_cfg).eval().save_pretrained(d)
        base = lmlab.load(d).eval()
        llms = {}
        if a.llama_cpp:
            from generate import llama_cpp_batch_generate, llama_cpp_generate, llama_cpp_models

            llms = llama_cpp_models(d, a)
    ids = torch.randint(1, 8192, (a.batch, a.prompt))
    runs, breaks = {}, {}
    for name, quantize in (("float32", None), ("fp16 weights", quantize_fp16), ("int8", quantize_int8)):
        model = copy.deepcopy(base)
        if quantize:
            quantize(model)
        cache = StaticCache(model, a.batch, a.prompt + a.new)

        def fn(token, pos, mask, model=model, cache=cache):
            return model(token, attention_mask=mask, position_ids=pos, past_key_values=cache).logits

        mask = torch.ones(a.batch, a.prompt + a.new, dtype=torch.long)
        breaks[name] = torch._dynamo.explain(fn)(ids[:, :1], torch.tensor([[a.prompt]]).expand(a.batch, 1), mask)
        step = torch.compile(fn, dynamic=False)
        runs[f"{name} eager"] = lambda m=model: m.generate(ids, max_new_tokens=a.new, eos_token_id=-1)
        runs[f"{name} static, compiled"] = lambda m=model, s=step, c=cache: decode_static(m, s, c, ids, a.new)
    for q, llm in llms.items():
        if a.batch == 1:
            runs[f"llama.cpp {q}"] = lambda llm=llm: llama_cpp_generate(llm, ids, a.new)
        else:
            runs[f"llama.cpp {q}"] = lambda llm=llm: llama_cpp_batch_generate(llm, ids, a.new)
    t = time.perf_counter()
    outputs = {k: f() for k, f in runs.items()}
    warm = time.perf_counter() - t
    agree = {
        name: (outputs[f"{name} static, compiled"] == outputs[f"{name} eager"])[:, a.prompt :].float().mean().item()
        for name in breaks
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(a.repeats):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    print(
        f"\ngreedy decoding, GPT-2 shape (6 layers, 512 wide, vocabulary 8192), batch {a.batch}, {a.prompt}-token "
        f"prompt, {a.new} new tokens, median of {a.repeats}; warm-up with compilation {warm:.0f} s"
    )
    print(environment())
    print(
        "| weights | eager new tokens/s | static compiled | ratio | graph breaks in a step | tokens equal |\n"
        "|---|---|---|---|---|---|"
    )
    for name, ex in breaks.items():
        eager, static = (
            a.batch * a.new / statistics.median(times[f"{name} {k}"]) for k in ("eager", "static, compiled")
        )
        print(
            f"| {name} | {eager:.1f} | {static:.1f} | {static / eager:.2f}x | {ex.graph_break_count} | "
            f"{agree[name]:.0%} |"
        )
    for q in llms:
        rate = a.batch * a.new / statistics.median(times[f"llama.cpp {q}"])
        same = (outputs[f"llama.cpp {q}"] == outputs["float32 eager"])[:, a.prompt :].float().mean().item()
        print(f"llama.cpp {q}: {rate:.1f} new tokens/s, {same:.0%} of tokens equal to lmlab float32's")


if __name__ == "__main__":
    main()
