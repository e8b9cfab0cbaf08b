"""What constrained decoding costs per token: llguidance, xgrammar and outlines-core on lmlab's tokenizers.

The server's `response_format` (JSON object / JSON schema) goes through one of these libraries; this
bench is how lmlab picked it. For each tokenizer (lmlab's byte-level BPE trained on the built-in
corpus at 8,192 tokens, and at 32,768) and each JSON schema below, every library compiles the schema
once, then walks the tokens of a valid instance: per token it computes the mask of allowed next tokens,
applies it to a row of logits and consumes the token. Reported: the compile time, the median cost per
token (mask + apply + consume; and the library's mask alone) and the share of steps each library allowed the true next token (must be
1.0: the instance is valid). The libraries alternate within each repeat, one process, one thread.

    python bench/constrained.py
    python bench/constrained.py --vocab 8192 32768 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time

import torch
from common import environment

SCHEMAS = {
    "flat": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "admin": {"type": "boolean"}},
            "required": ["name", "age", "admin"],
        },
        {"name": "Moses son of Amram", "age": 120, "admin": True},
    ),
    "nested": (
        {
            "type": "object",
            "properties": {
                "book": {"enum": ["Genesis", "Exodus", "Leviticus", "Numbers"]},
                "verses": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"n": {"type": "integer"}, "text": {"type": "string"}},
                        "required": ["n", "text"],
                    },
                },
            },
            "required": ["book", "verses"],
        },
        {
            "book": "Exodus",
            "verses": [
                {"n": 1, "text": "Now these are the names of the children of Israel"},
                {"n": 2, "text": "Reuben, Simeon, Levi, and Judah"},
                {"n": 3, "text": "Issachar, Zebulun, and Benjamin"},
            ],
        },
    ),
    "any-object": ({"type": "object"}, {"a": [1, 2.5, None, "x y z"], "b": {"c": False, "d": "in the beginning"}}),
}


def lmlab_tokenizer(vocab: int):
    from lmlab.data.corpus import demo_corpus
    from lmlab.tokenizer import train_tokenizer

    lines = gzip.open(demo_corpus("kjv"), "rt").read().splitlines()
    return train_tokenizer("bpe", lines, vocab)


class Llguidance:
    name = "llguidance"

    def __init__(self, tok, n_vocab: int) -> None:
        import llguidance

        self.lib = llguidance
        self.tokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=n_vocab, eos_token=tok.eos_id)
        self.words = (n_vocab + 31) // 32

    def compile(self, schema: dict) -> object:
        g = self.lib.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
        )
        return self.lib.LLMatcher(self.tokenizer, g)

    def mask(self, m, out: torch.Tensor) -> None:
        m.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * 4)

    def consume(self, m, t: int) -> None:
        assert m.consume_token(t), m.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, n_vocab: int) -> None:
        import transformers
        import xgrammar

        self.lib = xgrammar
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend)
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=n_vocab, stop_token_ids=[tok.eos_id])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)

    def compile(self, schema: dict) -> object:
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        return self.lib.GrammarMatcher(compiled)

    def mask(self, m, out: torch.Tensor) -> None:
        m.fill_next_token_bitmask(out[None])

    def consume(self, m, t: int) -> None:
        assert m.accept_token(t)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, n_vocab: int) -> None:
        import outlines_core

        self.lib = outlines_core
        by_bytes: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            if i == tok.eos_id or i in tok.special_ids:
                continue
            by_bytes.setdefault(token_bytes(tok, i), []).append(i)
        self.vocab = outlines_core.Vocabulary(tok.eos_id, by_bytes)
        self.eos = tok.eos_id

    def compile(self, schema: dict) -> object:
        regex = self.lib.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.lib.Guide(self.lib.Index(regex, self.vocab))

    def mask(self, m, out: torch.Tensor) -> None:
        m.write_mask_into(out.data_ptr(), out.numel(), 4)

    def consume(self, m, t: int) -> None:
        if t != self.eos:  # the end token is allowed in a final state; the guide has no state after it
            m.advance(t, return_tokens=False)


def token_bytes(tok, i: int) -> bytes:
    """The bytes token i stands for in a byte-level BPE vocabulary."""
    return bytes(_UNICODE_TO_BYTE[c] for c in tok.backend.id_to_token(i))


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, inverted: the byte-level pre-tokenizer's alphabet."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_UNICODE_TO_BYTE = _byte_alphabet()


def apply_mask(logits: torch.Tensor, words: torch.Tensor) -> None:
    """As lmlab.generation.structured.Constraint.mask_ applies a mask (the same unpacking for every library)."""
    from lmlab.generation.structured import unpack_bitmask

    logits.masked_fill_(~unpack_bitmask(words, logits.shape[-1]), float("-inf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--libs", nargs="+", default=["llguidance", "xgrammar", "outlines-core"])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    classes = {c.name: c for c in (Llguidance, Xgrammar, OutlinesCore)}
    rows = []
    for vocab in args.vocab:
        tok = lmlab_tokenizer(vocab)
        n_vocab = tok.vocab_size
        libs = []
        for name in args.libs:
            t0 = time.perf_counter()
            libs.append(classes[name](tok, n_vocab))
            print(f"vocab {n_vocab}: {name} tokenizer set-up {time.perf_counter() - t0:.2f} s", flush=True)
        for sname, (schema, instance) in SCHEMAS.items():
            ids = tok.encode(json.dumps(instance, separators=(",", ":")), add_special_tokens=False)
            ids.append(tok.eos_id)
            per_lib = {lib.name: {"compile": [], "step": [], "mask": [], "ok": 0} for lib in libs}
            for _ in range(args.repeats):
                for lib in libs:
                    t0 = time.perf_counter()
                    try:
                        m = lib.compile(schema)
                    except Exception as e:  # noqa: BLE001  (a library that cannot take the schema: recorded)
                        per_lib[lib.name]["error"] = f"{type(e).__name__}: {e}"[:120]
                        continue
                    per_lib[lib.name]["compile"].append(time.perf_counter() - t0)
                    words = torch.zeros((n_vocab + 31) // 32, dtype=torch.int32)
                    logits = torch.randn(n_vocab)
                    ok, times, mask_times = 0, [], []
                    for t in ids:
                        row = logits.clone()
                        t0 = time.perf_counter()
                        lib.mask(m, words)
                        mask_times.append(time.perf_counter() - t0)
                        apply_mask(row, words)
                        allowed = bool(row[t] > float("-inf"))
                        if allowed:
                            lib.consume(m, t)
                        times.append(time.perf_counter() - t0)
                        ok += allowed
                        if not allowed:
                            break
                    per_lib[lib.name]["step"].append(statistics.median(times))
                    per_lib[lib.name]["mask"].append(statistics.median(mask_times))
                    per_lib[lib.name]["ok"] = ok / len(ids)
            for name, r in per_lib.items():
                row = {
                    "vocab": n_vocab,
                    "schema": sname,
                    "tokens": len(ids),
                    "library": name,
                    "compile_ms": 1e3 * statistics.median(r["compile"]) if r["compile"] else None,
                    "us_per_token": 1e6 * statistics.median(r["step"]) if r["step"] else None,
                    "us_mask": 1e6 * statistics.median(r["mask"]) if r["mask"] else None,
                    "allowed_share": r["ok"],
                    "error": r.get("error"),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(
        "| vocabulary | schema (tokens) | library | compile ms | us per token | of which the mask | true token allowed |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        c = "-" if r["compile_ms"] is None else f"{r['compile_ms']:.1f}"
        u = "-" if r["us_per_token"] is None else f"{r['us_per_token']:.0f} | {r['us_mask']:.0f}"
        name = r["library"] + (f" ({r['error']})" if r["error"] else "")
        print(f"| {r['vocab']} | {r['schema']} ({r['tokens']}) | {name} | {c} | {u} | {r['allowed_share']:.3f} |")
    print()
    print(environment(note="one thread"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
