"""Serving throughput and latency: `lmlab serve` against `transformers serve` (one request at a time,
and with its `--continuous-batching`), on the same model folder and the same prompts.

The model is the GPT-2-shaped one of bench/generate.py (6 layers, 512 wide; random weights) with a
byte-level BPE trained on the demo corpus, saved once in transformers' layout, which both servers
load. Each server runs alone (a subprocess, started, measured, stopped), then the next. The clients
are threads streaming `POST /v1/completions` (temperature 0, `max_tokens` new tokens) for real KJV
verses as prompts; per request: time to first token (first non-empty text chunk), inter-token latency
(gaps between chunks) and the tokens generated (the text re-tokenized with the model's tokenizer, the
same count for every server). Throughput = all generated tokens / wall time of the level.

`transformers serve` needs accelerate: `pip install -e ".[serve,bench]"`.

    python bench/serve.py                                   # 1, 8 and 32 clients, 32 requests each, 64 new tokens
    python bench/serve.py --servers lmlab lmlab-1-at-a-time --concurrency 8 --requests 16
    python bench/serve.py --servers lmlab lmlab-int8 --concurrency 1 8 32      # int8 linear layers too

Beside each lmlab server, the raw decoding loop it runs on (lmlab.generate, greedy, the same folder
loaded as `lmlab serve` loads it, in the server's precision) decodes the same prompts in batches of
each concurrency level, in this process, alternating with the server's runs (the server idle
meanwhile); each level runs --repeats times and reports the median tokens/s and the median ratio of
the server to the loop.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import environment

SERVERS = ("lmlab", "lmlab-1-at-a-time", "lmlab-int8", "transformers", "transformers-cb")


def build(folder: Path, vocab: int) -> None:
    import torch
    import transformers

    from lmlab.data.corpus import demo_corpus
    from lmlab.tokenizer import train_tokenizer

    text = gzip.open(demo_corpus("kjv"), "rt", encoding="utf-8").read().splitlines()
    tok = train_tokenizer("bpe", [t for t in text if t.strip()][:20000], vocab)
    eos = tok.eos_id if tok.eos_id is not None else 0
    cfg = transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_embd=512, n_layer=6, n_head=8, n_positions=512, bos_token_id=eos, eos_token_id=eos
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    tok.save(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, folder: Path, port: int, max_batch: int, threads: int | None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if kind.startswith("lmlab"):
        cmd = [sys.executable, "-m", "lmlab", "serve", "--model", str(folder), "--port", str(port)]
        cmd += ["--max-batch", "1" if kind == "lmlab-1-at-a-time" else str(max_batch), "--max-queue", "1024"]
        if threads:
            cmd += ["--threads", str(threads)]
        if kind == "lmlab-int8":
            cmd += ["--quantize", "int8"]
    else:
        cmd = ["transformers", "serve", str(folder), "--port", str(port), "--device", "cpu"]
        cmd += ["--continuous-batching"] if kind == "transformers-cb" else []
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, proc: subprocess.Popen, folder: Path, timeout: float = 180) -> str:
    """The model id to send, once the server's /health answers 200 (transformers serve's /v1/models
    scans the hub cache and fails offline; it takes the folder's path as the id)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                r = httpx.get(url + "/v1/models", timeout=30)
                if r.status_code == 200 and r.json().get("data"):
                    return r.json()["data"][0]["id"]
                return str(folder)
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become ready in {timeout} s")


def one(url: str, model: str, prompt: str, new: int, out: list, tok) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps, text = [], ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            piece = "".join(c.get("text") or "" for c in choices)
            if piece:
                stamps.append(time.perf_counter())
                text += piece
    tokens = len(tok.encode(text, add_special_tokens=False))
    out.append(
        {
            "prompt": prompt,
            "text": text,
            "ttft": stamps[0] - t0 if stamps else None,
            "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": tokens,
        }
    )


def level(url: str, model: str, prompts: list[str], clients: int, new: int, tok) -> dict:
    results: list[dict] = []
    queue = list(prompts)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                p = queue.pop(0)
            one(url, model, p, new, results, tok)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    gaps = sorted(g for r in results for g in r["gaps"])

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3 if xs else float("nan")

    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": pct(ttft, 0.5),
        "ttft_p99_ms": pct(ttft, 0.99),
        "itl_p50_ms": pct(gaps, 0.5),
        "itl_p99_ms": pct(gaps, 0.99),
        "mean_tokens": statistics.mean(r["tokens"] for r in results),
        "texts": {r["prompt"]: r["text"] for r in results},
    }


def raw_model(folder: Path, quantize: str) -> tuple:
    import lmlab
    from lmlab.tokenizer import load_tokenizer

    return lmlab.load(str(folder), dtype="auto", quantize=quantize).eval(), load_tokenizer(folder)


def raw_loop(model, tok, prompts: list[str], batch: int, new: int) -> dict:
    """Tokens/s of lmlab.generate on the prompts, `batch` at a time (left-padded), greedy, `new` tokens:
    the decoding loop under the server, without the server."""
    from lmlab.generate import complete

    complete(model, tok, prompts[:batch], max_new_tokens=8)  # warm-up
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        for c in complete(model, tok, prompts[i : i + batch], max_new_tokens=new):
            tokens += len(tok.encode(c.text, add_special_tokens=False))
    wall = time.perf_counter() - t0
    return {"batch": batch, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "why": model.decoding}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", nargs="+", choices=SERVERS, default=[s for s in SERVERS if s != "lmlab-int8"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--new", type=int, default=64, help="max_tokens of every request")
    ap.add_argument("--max-batch", type=int, default=32, help="lmlab serve --max-batch")
    ap.add_argument("--threads", type=int, default=None, help="lmlab serve --threads (default: its own)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each level (medians reported)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    from lmlab.data.corpus import demo_corpus
    from lmlab.tokenizer import load_tokenizer

    verses = [v for v in gzip.open(demo_corpus("kjv"), "rt", encoding="utf-8").read().splitlines()[-3000:] if v]
    prompts = [verses[i * 37 % len(verses)] for i in range(a.requests)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "gpt"
        build(folder, a.vocab)
        tok = load_tokenizer(folder)
        for kind in a.servers:
            raw = None  # the loop under an lmlab server, timed in this process between its levels
            if kind in ("lmlab", "lmlab-int8") and a.threads:
                import torch

                torch.set_num_threads(a.threads)
            if kind in ("lmlab", "lmlab-int8"):
                raw = raw_model(folder, "int8" if kind == "lmlab-int8" else "none")
            port = free_port()
            proc = start(kind, folder, port, a.max_batch, a.threads)
            url = f"http://127.0.0.1:{port}"
            try:
                model = wait_ready(url, proc, folder)
                level(url, model, prompts[:2], 1, 8, tok)  # warm-up
                for clients in a.concurrency:
                    runs, loops = [], []
                    for _ in range(a.repeats):  # the server's level, then the raw loop, alternating
                        runs.append(level(url, model, prompts, clients, a.new, tok))
                        if raw is not None:
                            loops.append(raw_loop(*raw, prompts, clients, a.new)["tokens_per_s"])
                    r = {"server": kind, **sorted(runs, key=lambda x: x["tokens_per_s"])[len(runs) // 2]}
                    r["all_tokens_per_s"] = [x["tokens_per_s"] for x in runs]
                    if loops:
                        r["raw_tokens_per_s"] = statistics.median(loops)
                        r["ratios"] = [x["tokens_per_s"] / y for x, y in zip(runs, loops)]
                    rows.append(r)
                    print(json.dumps({k: v for k, v in r.items() if k != "texts"}), flush=True)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print(f"\nstreamed /v1/completions, {a.requests} requests per level, max_tokens {a.new}, temperature 0")
    print(environment())
    first = rows[0]["texts"] if rows else {}
    print(f"same text as {rows[0]['server']} at {rows[0]['clients']} client(s), per prompt (greedy)" if rows else "")
    print(
        "| server | clients | tokens/s | TTFT p50 / p99 ms | inter-token p50 / p99 ms | tokens per request | same text "
        "| raw loop at that batch, tokens/s | server / raw loop (median) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = sum(first.get(p) == t for p, t in r["texts"].items()) / max(1, len(r["texts"]))
        raw = r.get("raw_tokens_per_s")
        ratio = f"{raw:,.1f} | {statistics.median(r['ratios']):.2f}" if raw else " | "
        print(
            f"| {r['server']} | {r['clients']} | {r['tokens_per_s']:,.1f} | {r['ttft_p50_ms']:.0f} / "
            f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['mean_tokens']:.1f} | {same:.0%} "
            f"| {ratio} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
