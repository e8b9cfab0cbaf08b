"""Malformed requests against `lmlab serve`: bodies mutated from valid OpenAI requests (fields
dropped, given other JSON types and values, bytes flipped or cut) and random bytes, sent to every
endpoint a decoder serves. Every answer must be a 4xx with OpenAI's error JSON (or a 200 for a
body that is still valid), never a 5xx, and /health must stay 200.

    python -m tests.reliability server --requests 10000
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

VALID = {
    "/v1/completions": {"model": "tiny", "prompt": "in the beginning", "max_tokens": 4, "temperature": 0},
    "/v1/chat/completions": {
        "model": "tiny",
        "messages": [{"role": "user", "content": "who made the earth?"}],
        "max_tokens": 4,
    },
    "/v1/embeddings": {"model": "tiny", "input": "in the beginning"},
}
ODD = [None, True, False, 0, -1, 1, 2**63, -(2**63), 1e308, -1e-308, float("nan"), "", "x", "\x00", "\ud800", [], [1], {}, {"a": 1}, "9" * 400]  # fmt: skip


def folder(work: Path) -> Path:
    """A tiny GPT with a tokenizer and a chat template, saved for the server."""
    import torch

    import lmlab
    from lmlab.tokenizer import train_tokenizer

    tok = train_tokenizer("bpe", ["in the beginning god created the heaven and the earth"] * 30, 300)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    cfg = lmlab.preset(
        "gpt2-tiny", vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=64,
        **tok.model_ids(),
    )  # fmt: skip
    torch.manual_seed(0)
    out = work / "tiny"
    lmlab.save(lmlab.Model(cfg), out)
    tok.save(out)
    return out


def _mutate_json(rng: random.Random, body: Any, depth: int = 0) -> Any:
    if isinstance(body, dict) and body:
        body = dict(body)
        key = rng.choice(list(body))
        action = rng.random()
        if action < 0.2:
            del body[key]
        elif action < 0.35:
            body[rng.choice(["n", "stop", "logprobs", "echo", "top_p", "seed", "stream", "suffix", "user", "x" * 50])] = rng.choice(ODD)  # fmt: skip
        elif action < 0.75 or depth > 2:
            body[key] = rng.choice(ODD)
        else:
            body[key] = _mutate_json(rng, body[key], depth + 1)
        return body
    if isinstance(body, list) and body:
        body = list(body)
        i = rng.randrange(len(body))
        body[i] = _mutate_json(rng, body[i], depth + 1) if rng.random() < 0.5 else rng.choice(ODD)
        if rng.random() < 0.2:
            body *= rng.choice([0, 2, 50])
        return body
    return rng.choice(ODD)


def body(rng: random.Random, path: str) -> bytes:
    """One malformed (or, by chance, still valid) request body for `path`."""
    kind = rng.random()
    if kind < 0.6:  # JSON with wrong fields
        value = VALID[path]
        for _ in range(rng.randint(1, 3)):
            value = _mutate_json(rng, value)
        return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")
    raw = json.dumps(VALID[path]).encode()
    if kind < 0.8:  # bytes flipped, cut or inserted
        raw = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(raw))
            op = rng.random()
            if op < 0.4:
                raw[i] ^= 1 << rng.randrange(8)
            elif op < 0.7:
                del raw[i:]
                if not raw:
                    break
            else:
                raw[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        return bytes(raw)
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))


@contextlib.contextmanager
def serving(work: Path, protocol: Any = None, **settings: Any) -> Iterator[Any]:
    """An httpx client of `lmlab serve` (uvicorn in a thread) on the tiny GPT, once /health is 200;
    `settings` go to ServeConfig; `protocol`: uvicorn's HTTP protocol class (default: its choice)."""
    import httpx
    import uvicorn

    from lmlab.serve.app import ServeConfig, create_app
    from lmlab.serve.connections import uvicorn_config

    app = create_app(ServeConfig(model=str(folder(work)), name="tiny", dtype="float32", **settings), load_now=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn_config(
        app, "127.0.0.1", port, app.state.lmlab_config.header_timeout, protocol, log_level="critical"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            client.served = app  # the app behind it, for tests that reach into its state
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.lmlab.engine.stop()


def campaign(requests: int, seed: int = 0) -> dict[str, Any]:
    import httpx

    rng = random.Random(seed)
    statuses: dict[str, int] = {}
    defects: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, serving(Path(tmp)) as client:
        started = time.perf_counter()
        for i in range(requests):
            path = rng.choice(list(VALID))
            data = body(rng, path)
            headers = {"content-type": rng.choice(["application/json"] * 9 + ["text/plain"])}
            try:
                r = client.post(path, content=data, headers=headers)
            except httpx.HTTPError as e:
                defects.setdefault(f"transport error: {type(e).__name__}", data[:200].decode("latin-1"))
                continue
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code >= 500:
                defects.setdefault(f"{r.status_code} on {path}: {r.text[:200]}", data[:200].decode("latin-1"))
            elif r.status_code >= 400:
                try:
                    err = r.json()["error"]
                    assert isinstance(err["message"], str) and err["message"]
                except Exception:  # noqa: BLE001
                    problem = f"{r.status_code} without OpenAI's error JSON on {path}: {r.text[:120]}"
                    defects.setdefault(problem, data[:200].decode("latin-1"))
            if i % 500 == 0 and client.get("/health").status_code != 200:
                defects.setdefault("/health stopped answering 200", "")
        seconds = time.perf_counter() - started
        healthy = client.get("/health").status_code == 200
    return {
        "requests": requests,
        "statuses": dict(sorted(statuses.items())),
        "healthy_after": healthy,
        "seconds": round(seconds, 1),
        "defects": [{"problem": k, "body": v} for k, v in defects.items()],
    }
