"""`lmlab serve`, driven by the official openai client: completions, chat, streaming, embeddings, n,
stop, seed, logprobs; temperature 0 gives exactly what lmlab.generate gives, alone and batched with
other requests; bad requests get OpenAI's error JSON with the right status; a dropped stream frees its slot."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import lmlab  # noqa: E402
from lmlab.generate import complete, generate  # noqa: E402
from lmlab.serve.app import ServeConfig, create_app  # noqa: E402
from lmlab.serve.connections import uvicorn_config  # noqa: E402
from lmlab.tokenizer import load_tokenizer  # noqa: E402

PROMPTS = [
    "the lord said",
    "and the king of the city went down to the river and",
    "Moses",
    "water stone field house the",
    "let my people go into the land of Egypt and the",
    "a good land",
    "the people of the land said unto moses",
    "river",
]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class Server:
    """uvicorn in a thread on a free port, for one model folder."""

    def __init__(self, folder, **kw) -> None:
        kw.setdefault("dtype", "float32")  # the references are float32 models (a bf16 server: its own test)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(ServeConfig(model=str(folder), name="tiny", **kw))
        config = uvicorn_config(
            self.app, "127.0.0.1", self.port, self.app.state.lmlab_config.header_timeout, log_level="error"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the server did not become healthy: {httpx.get(self.url + '/health').text}")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=kw.get("api_key") or "none", max_retries=0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def chat_folder(source, folder):
    """A copy of the model folder `source` whose tokenizer carries TEMPLATE as its chat template."""
    shutil.copytree(source, folder)
    tok = load_tokenizer(folder)
    tok.chat_template = TEMPLATE
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def gpt(tiny_pretrained, tmp_path_factory):
    folder = chat_folder(tiny_pretrained["gpt"], tmp_path_factory.mktemp("serve") / "gpt")
    server = Server(folder, max_batch=8)
    yield server, lmlab.load(folder).eval(), load_tokenizer(folder)
    server.close()


def _alone(model, tok, prompt, **kw):
    return complete(model, tok, prompt, **kw)[0]


def test_greedy_completions_equal_lmlab_generate_alone_and_batched_with_seven_others(gpt):
    server, model, tok = gpt
    want = {p: _alone(model, tok, p, max_new_tokens=12) for p in PROMPTS}
    one = server.client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert one.choices[0].text == want[PROMPTS[1]].text
    assert one.usage.prompt_tokens == want[PROMPTS[1]].prompt_tokens
    assert one.usage.completion_tokens == len(want[PROMPTS[1]].tokens)

    def ask(p):
        r = server.client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason

    for _ in range(2):  # 8 concurrent requests of different lengths share the decode batch
        with ThreadPoolExecutor(8) as pool:
            got = dict(zip(PROMPTS, pool.map(ask, PROMPTS)))
        for p in PROMPTS:
            assert got[p][0] == want[p].text, p
            assert got[p][1] == ("length" if want[p].finish_reason == "length" else "stop")
    # a list of prompts is one request with a choice per prompt
    r = server.client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=12, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [want[p].text for p in PROMPTS[:3]]


def test_streaming_gives_the_same_text_as_one_answer(gpt):
    server, model, tok = gpt
    want = _alone(model, tok, PROMPTS[4], max_new_tokens=16).text
    pieces, reasons = [], []
    for chunk in server.client.completions.create(
        model="tiny", prompt=PROMPTS[4], max_tokens=16, temperature=0, stream=True
    ):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == want and len(pieces) > 3
    assert reasons[-1] in ("length", "stop") and all(r is None for r in reasons[:-1])


def test_sampling_with_a_seed_is_reproducible_and_equals_generate(gpt):
    server, model, tok = gpt
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0.9, top_p=1.0, seed=7)
    a = server.client.completions.create(n=3, **kw)
    b = server.client.completions.create(n=3, **kw)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # choice j samples with seed + j
    ids = torch.tensor([tok.encode(PROMPTS[0], add_special_tokens=False)])
    for j in range(2):
        out = generate(model, ids, max_new_tokens=10, do_sample=True, temperature=0.9, seed=7 + j, tokenizer=tok)
        new = out[0, ids.shape[1] :].tolist()
        eos = model.config.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        assert texts[j] == tok.decode(new)


def test_stop_strings_end_the_text_before_them(gpt):
    server, model, tok = gpt
    full = _alone(model, tok, PROMPTS[1], max_new_tokens=16).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip() and stop in full
    r = server.client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in server.client.completions.create(
            model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop], stream=True
        )
    )
    assert streamed == full[: full.index(stop)]
    # include_stop_str_in_output (vLLM's name): the text keeps the stop string, as lmlab.generate's does
    kept = _alone(model, tok, PROMPTS[1], max_new_tokens=16, stop_strings=[stop]).text
    assert kept == full[: full.index(stop) + len(stop)]
    for stream in (False, True):
        r = server.client.completions.create(
            model="tiny",
            prompt=PROMPTS[1],
            max_tokens=16,
            temperature=0,
            stop=[stop],
            stream=stream,
            extra_body={"include_stop_str_in_output": True},
        )
        text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        assert text == kept, stream


def test_penalties_top_k_and_min_p_decode_as_lmlab_generate_does(gpt):
    """The server's sampling settings are lmlab.generation's: repetition penalty greedy equals generate's;
    seeded sampling with top_k / min_p / presence / frequency penalties equals the sampler run by hand."""
    from lmlab.generation.sampling import SamplingParams, next_tokens

    server, model, tok = gpt
    ids = torch.tensor([tok.encode(PROMPTS[1], add_special_tokens=False)])
    want = generate(model, ids, max_new_tokens=12, repetition_penalty=1.8, eos_token_id=-1)[0, ids.shape[1] :]
    r = server.client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0, extra_body={"repetition_penalty": 1.8}
    )
    plain = server.client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    eos = model.config.eos_token_id
    new = want.tolist()
    new = new[: new.index(eos)] if eos in new else new
    assert r.choices[0].text == tok.decode(new) != plain.choices[0].text
    extra = {"top_k": 20, "min_p": 0.02, "presence_penalty": 0.7, "frequency_penalty": 0.4}
    r = server.client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0.8, seed=5, extra_body=extra
    )
    params = SamplingParams(temperature=0.8, seed=5, top_k=20, min_p=0.02, presence_penalty=0.7, frequency_penalty=0.4)
    gen, seq, counts = params.generator(), ids[0].tolist(), torch.zeros(1, model.config.vocab_size)
    out = []
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([seq])).logits[:, -1]
            t = int(next_tokens(logits, [params], [gen], counts=counts)[0])
            if t == eos:
                break
            out.append(t)
            seq.append(t)
            counts[0, t] += 1
    assert r.choices[0].text == tok.decode(out)


def test_logprobs_and_prompt_scoring_with_echo(gpt):
    server, model, tok = gpt
    ids = torch.tensor([tok.encode(PROMPTS[3], add_special_tokens=False)])
    res = generate(model, ids, max_new_tokens=6, return_dict_in_generate=True, output_logprobs=True, tokenizer=tok)
    r = server.client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert np.allclose(lp.token_logprobs, res.logprobs[0][: len(lp.token_logprobs)], atol=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert all(max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    # echo + logprobs + max_tokens 0: the prompt's own log-probabilities (how lm-eval scores through an API)
    e = server.client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=0, echo=True, logprobs=0)
    with torch.no_grad():
        want = torch.log_softmax(model(ids).logits[0].float(), -1)
    expect = [want[t, ids[0, t + 1]].item() for t in range(ids.shape[1] - 1)]
    got = e.choices[0].logprobs.token_logprobs
    assert got[0] is None and np.allclose(got[1:], expect, atol=1e-4)
    assert e.choices[0].text == PROMPTS[3]


def test_chat_completions_through_the_template_streamed_and_whole(gpt):
    server, model, tok = gpt
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the lord said"}]
    prompt = "system: be brief\nuser: the lord said\nassistant:"
    want = _alone(model, tok, prompt, max_new_tokens=10).text
    r = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    chunks = list(
        server.client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    lp = server.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)


def test_embeddings_float_and_base64(gpt):
    server, model, tok = gpt
    r = server.client.embeddings.create(model="tiny", input=["the lord said", "a good land"])
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (2, model.config.d_model) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    with torch.no_grad():
        h = model(torch.tensor([tok.encode("the lord said")])).last_hidden_state[0].mean(0)
    assert np.allclose(vecs[0], torch.nn.functional.normalize(h, dim=-1).numpy(), atol=1e-5)
    raw = httpx.post(
        server.url + "/v1/embeddings", json={"model": "tiny", "input": "a good land", "encoding_format": "base64"}
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype=np.float32)
    assert np.allclose(decoded, vecs[1], atol=1e-6)


def _post(server, path, body, **kw):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, **kw)


def test_bad_requests_get_openai_errors_with_the_right_status(gpt):
    server, model, _ = gpt
    ctx = model.config.max_seq_len
    cases = [
        ("{not json", 400, None),
        ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": ctx + 5}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": ""}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "n": 99}, 400, "n"),
        ({"model": "tiny", "prompt": "the " * (ctx + 10)}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"prompt": "x"}, 400, "model"),
    ]
    for body, status, param in cases:
        r = _post(server, "/v1/completions", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] and err["param"] == param, (body, err)
    too_long = _post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": ctx + 5}).json()
    assert str(ctx) in too_long["error"]["message"]
    long_prompt = _post(server, "/v1/completions", {"model": "tiny", "prompt": "the " * (ctx + 10)}).json()
    assert f"context is {ctx} tokens" in long_prompt["error"]["message"]
    big = _post(server, "/v1/completions", {"model": "tiny", "prompt": "x" * (2 << 20)})
    assert big.status_code == 413 and "bytes" in big.json()["error"]["message"]
    chunked = httpx.post(  # no content-length: refused as it arrives, before it is read whole
        server.url + "/v1/completions",
        content=iter([b"x" * (1 << 19)] * 4),
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 413 and chunked.json()["error"]["type"]
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="other", prompt="x")
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_fields_lmlab_does_not_implement_are_refused_naming_them(gpt):
    """Accepting logit_bias or audio and answering as if they were not there would lie to the client."""
    server, _, _ = gpt
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path, body, field in (
        ("/v1/chat/completions", {**chat, "modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_object", "x": 1}}, "response_format.x"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 100}}, "logit_bias"),
        ("/v1/embeddings", {"model": "tiny", "input": "x", "truncate": True}, "truncate"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "x", "audio": {}}]}, None),
    ):
        r = _post(server, path, body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == field or field is None and "audio" in err["param"], err
        assert "does not implement this field" in err["message"], err
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        server.client.completions.create(model="tiny", prompt="hi", logit_bias={"5": 100})
    # what lmlab does take, user included, still answers
    ok = _post(server, "/v1/chat/completions", {**chat, "user": "someone", "seed": 1, "temperature": 0})
    assert ok.status_code == 200, ok.text


@pytest.fixture(scope="module")
def long_gpt(tiny_pretrained, tmp_path_factory):
    """The tiny GPT with a context of 1,024: a stream long enough to drop half-way."""
    from conftest import tiny_config

    folder = tmp_path_factory.mktemp("serve") / "long"
    tok = load_tokenizer(tiny_pretrained["gpt"])
    cfg = tiny_config("gpt2-tiny", tok)
    cfg.max_seq_len = 1024
    torch.manual_seed(0)
    lmlab.Model(cfg).save_pretrained(folder)
    tok.save(folder)
    return folder


def _engine_stat(server, kind):
    text = httpx.get(server.url + "/metrics", headers={"authorization": "Bearer sekret"}).text
    line = next(x for x in text.splitlines() if x.startswith(f'lmlab_engine_requests{{kind="{kind}"}}'))
    return float(line.split()[-1])


def test_a_dropped_stream_frees_its_slot(long_gpt):
    server = Server(long_gpt)
    try:
        body = {"model": "tiny", "prompt": "the", "max_tokens": 1000, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.time() + 10
        while _engine_stat(server, "cancelled") < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert _engine_stat(server, "cancelled") == 1 and _engine_stat(server, "finished") == 0
        assert _engine_stat(server, "generated_tokens") < 1000  # it left the batch half-way
        text = httpx.get(server.url + "/metrics").text
        assert "lmlab_batch_size 0.0" in text and "lmlab_time_to_first_token_seconds_count 1.0" in text
    finally:
        server.close()


def test_the_queue_is_bounded_and_first_come_first_served(tiny_pretrained):
    from lmlab.serve.engine import Engine, QueueFull, Request, Sampling

    model, tok = lmlab.load(tiny_pretrained["gpt"]), load_tokenizer(tiny_pretrained["gpt"])
    engine = Engine(model, tok, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    order = []
    for i in range(2):
        engine.submit(Request([5, 6], Sampling(max_tokens=2, temperature=0), lambda d, i=i: order.append(i)))
    with pytest.raises(QueueFull):
        engine.submit(Request([5], Sampling(max_tokens=2), lambda d: None))
    engine.start()
    deadline = time.time() + 10
    while engine.stats()["finished"] < 2 and time.time() < deadline:
        time.sleep(0.01)
    engine.stop()
    assert order == [0, 0, 1, 1]  # one slot: the first request finishes before the second starts


def test_work_beside_generation_runs_on_the_engine_thread(tiny_pretrained):
    """Engine.call runs the embedding / encoder endpoints' model work on the engine's own thread, between
    steps, while requests decode (one thread runs the model); its errors go back to the caller; a stopped
    engine refuses it."""
    from lmlab.serve.engine import Engine, EngineStopped, Request, Sampling

    model, tok = lmlab.load(tiny_pretrained["gpt"]), load_tokenizer(tiny_pretrained["gpt"])
    engine = Engine(model, tok, max_batch=2).start()
    try:
        done = []
        engine.submit(Request([5, 6], Sampling(max_tokens=20, temperature=0), done.append))
        where = engine.call(lambda: (threading.current_thread().name, torch.is_inference_mode_enabled()))
        assert where.result(timeout=10) == ("lmlab-engine", True)
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0).result(timeout=10)
        deadline = time.time() + 10
        while not (done and done[-1].finish_reason) and time.time() < deadline:
            time.sleep(0.01)
        assert done[-1].finish_reason == "length"  # the request it ran beside went on to the end
    finally:
        engine.stop()
    with pytest.raises(EngineStopped):
        engine.call(lambda: None)


def test_api_key_queue_limit_and_health(long_gpt):
    server = Server(long_gpt, api_key="sekret", max_batch=1, max_queue=1)
    try:
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="x")
        assert server.client.completions.create(model="tiny", prompt="the", max_tokens=2).choices
        assert httpx.get(server.url + "/health").json()["status"] == "ok"  # health needs no key
        # one running, one waiting: a third request is refused with 429 and Retry-After. The engine is
        # slowed to 20 steps a second and never stops at an end-of-sequence id, so the first stays running
        state = server.app.state.lmlab
        state.stop_ids = []
        step = state.engine._decode_step

        def slow_step():
            time.sleep(0.05)
            step()

        state.engine._decode_step = slow_step
        head = {"authorization": "Bearer sekret"}
        body = {"model": "tiny", "prompt": "the", "max_tokens": 1000, "stream": True, "temperature": 0}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=head) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection
            assert next(lines).startswith("data: ")
            with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=head) as second:
                assert second.status_code == 200
                third = httpx.post(server.url + "/v1/completions", json=body, headers=head)
                assert third.status_code == 429 and third.headers["retry-after"]
                assert third.json()["error"]["type"] == "rate_limit_error"
    finally:
        server.close()


def test_loading_and_a_failed_load_answer_503(tmp_path):
    from fastapi.testclient import TestClient

    app = create_app(ServeConfig(model=str(tmp_path / "missing")))
    c = TestClient(app)  # outside `with`, no lifespan: the load never starts
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = c.post("/v1/completions", json={"model": "missing", "prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] and "loading" in r.json()["error"]["message"]
    with TestClient(app) as c:  # the lifespan starts the load, which fails
        deadline = time.time() + 10
        while c.get("/health").json()["status"] == "loading" and time.time() < deadline:
            time.sleep(0.05)
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error" and "missing" in r.json()["error"]


@pytest.mark.parametrize("name", ["t5", "prefix"])
def test_encoder_decoders_and_prefix_lms_batch_like_generate(tiny_pretrained, name):
    folder = tiny_pretrained[name]
    model, tok = lmlab.load(folder).eval(), load_tokenizer(folder)
    want = {p: _alone(model, tok, p, max_new_tokens=8).text for p in PROMPTS}
    server = Server(folder, max_batch=8)
    try:

        def ask(p):
            return server.client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text

        with ThreadPoolExecutor(8) as pool:
            got = dict(zip(PROMPTS, pool.map(ask, PROMPTS)))
        assert got == want
    finally:
        server.close()


def test_an_encoder_serves_embeddings_and_refuses_generation(tiny_pretrained):
    server = Server(tiny_pretrained["bert"])
    try:
        r = _post(server, "/v1/completions", {"model": "tiny", "prompt": "the lord"})
        assert r.status_code == 400 and "encoder" in r.json()["error"]["message"]
        assert "decoder" in r.json()["error"]["message"]
        e = server.client.embeddings.create(model="tiny", input="the lord said")
        assert len(e.data[0].embedding) == 64
    finally:
        server.close()


def test_the_playground_streams_an_answer_in_headless_chromium(gpt, tmp_path):
    """Debian's chromium (through selenium) opens /, types a prompt and sees the streamed answer."""
    from conftest import headless_chromium

    server, model, tok = gpt
    want = _alone(model, tok, PROMPTS[0], max_new_tokens=12).text
    browser = headless_chromium()  # skips without selenium or chromium
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda b: b.find_element("id", "model").text.startswith("tiny"))
        for field, value in (("max_tokens", "12"), ("temperature", "0")):
            box = browser.find_element("id", field)
            box.clear()
            box.send_keys(value)
        browser.find_element("id", "prompt").send_keys(PROMPTS[0])
        browser.find_element("id", "send").click()
        wait.until(lambda b: b.find_element("id", "status").text.startswith("done"))
        turn = browser.find_element("css selector", "#log .turn").text
        assert turn == f"completion:{PROMPTS[0]}{want}" or turn == f"completion: {PROMPTS[0]}{want}"
        assert browser.save_screenshot(str(tmp_path / "playground.png"))
    finally:
        browser.quit()


def test_encoder_task_endpoints_answer_as_lmlab_predict(tiny_pretrained, tmp_path):
    """Fill-mask on a pre-trained encoder; classification, token classification and extractive QA on
    fine-tuned encoder folders: the same answers as `lmlab predict` on the same inputs."""
    from test_finetune import _conll, _squad, _sst_like

    from lmlab.finetune import finetune, predict
    from lmlab.generate import fill_mask
    from lmlab.settings import FinetuneConfig

    bert = tiny_pretrained["bert"]
    server = Server(bert)
    try:
        r = _post(server, "/v1/fill-mask", {"model": "tiny", "input": "the lord [MASK] unto moses", "top_k": 3})
        model, tok = lmlab.load(bert).eval(), load_tokenizer(bert)
        want = fill_mask(model, tok, "the lord [MASK] unto moses", top_k=3)[0]
        got = r.json()["data"][0]["masks"][0]
        assert [c["token"] for c in got] == [t for t, _ in want]
        assert np.allclose([c["probability"] for c in got], [p for _, p in want], atol=1e-6)
        for path in ("/v1/classify", "/v1/token-classify"):
            r = _post(server, path, {"model": "tiny", "input": "the lord"})
            assert r.status_code == 400 and "not fine-tuned" in r.json()["error"]["message"]
        r = _post(server, "/v1/fill-mask", {"model": "tiny", "input": "no mask here"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    finally:
        server.close()
    files = {
        "classify": _sst_like(tmp_path / "train.tsv", 64, 0),
        "ner": _conll(tmp_path / "train.conll", 32, 0),
        "qa": _squad(tmp_path / "train.json", 32, 0),
    }
    for task, train in files.items():
        out = tmp_path / task
        finetune(
            FinetuneConfig(task=task, model=str(bert), train=str(train), out=str(out), epochs=1, lr=1e-3, max_len=48)
        )
        want = predict(str(out), str(train))[:4]
        server = Server(out)
        try:
            if task == "classify":
                texts = [line.split("\t")[0] for line in train.read_text().splitlines()[1:5]]
                got = _post(server, "/v1/classify", {"model": "tiny", "input": texts}).json()["data"]
                assert [g["label"] for g in got] == [w["label"] for w in want]
                for g, w in zip(got, want):
                    assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)
            elif task == "ner":
                texts = [" ".join(w["tokens"]) for w in want]
                got = _post(server, "/v1/token-classify", {"model": "tiny", "input": texts}).json()["data"]
                assert [g["tags"] for g in got] == [w["tags"] for w in want]
            else:
                paragraphs = json.loads(train.read_text())["data"][0]["paragraphs"][:4]
                items = [{"question": p["qas"][0]["question"], "context": p["context"]} for p in paragraphs]
                got = _post(server, "/v1/question-answering", {"model": "tiny", "input": items}).json()["data"]
                assert [g["answer"] for g in got] == [w["answer"] for w in want]
            r = _post(server, "/v1/fill-mask", {"model": "tiny", "input": "the [MASK]"})
            assert r.status_code == 400 and "masked-LM head" in r.json()["error"]["message"]
        finally:
            server.close()


def test_int8_serving_answers_as_the_int8_model_does_and_says_so(tiny_pretrained):
    from lmlab.quantize import int8_engine, quantize_int8

    if int8_engine() is None:
        pytest.skip("torch has no int8 engine on this machine")
    folder = tiny_pretrained["gpt"]
    model, tok = lmlab.load(folder).eval(), load_tokenizer(folder)
    quantize_int8(model)
    server = Server(folder, quantize="int8")
    try:
        assert httpx.get(server.url + "/health").json()["decoding"]["quantize"] == "int8"
        for p in PROMPTS[:3]:  # one at a time: int8 activations are scaled per batch (see the README)
            r = server.client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0)
            assert r.choices[0].text == _alone(model, tok, p, max_new_tokens=10).text
    finally:
        server.close()


def test_a_thousand_requests_at_32_way_concurrency(gpt):
    """No error, every response complete, memory bounded, the batch empty afterwards."""
    import resource

    server, model, tok = gpt

    def ask(i):
        r = server.client.completions.create(
            model="tiny", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=8 + i % 9, temperature=0
        )
        c = r.choices[0]
        return (
            c.finish_reason in ("length", "stop")
            and r.usage.completion_tokens >= 1
            and (c.finish_reason == "stop" or r.usage.completion_tokens == 8 + i % 9)
        )

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(ask, range(64)))  # warm-up: allocator pools and caches reach their size
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        done = list(pool.map(ask, range(1000)))
    assert all(done)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grown_mb < 200, grown_mb
    stats = server.app.state.lmlab.engine.stats()
    assert stats["batch"] == 0 and stats["queue"] == 0


def test_waiting_prompts_are_prefilled_together_and_answer_as_alone(tiny_pretrained):
    from lmlab.serve.engine import Engine, Request, Sampling

    folder = tiny_pretrained["gpt"]
    model, tok = lmlab.load(folder).eval(), load_tokenizer(folder)
    engine = Engine(model, tok, max_batch=8)  # not started: the prompts wait together
    passes = []
    together = engine._prefill_together
    engine._prefill_together = lambda group: passes.append(len(group)) or together(group)
    texts = {i: [] for i in range(5)}
    done = threading.Event()
    finished = []

    def emit(i):
        def f(delta):
            texts[i].append(delta.text)
            if delta.finish_reason is not None:
                finished.append(i)
                if len(finished) == 5:
                    done.set()

        return f

    sampling = Sampling(max_tokens=10, temperature=0, stop_ids=[model.config.eos_token_id])
    for i, p in enumerate(PROMPTS[:5]):
        engine.submit(Request(tok.encode(p, add_special_tokens=False), sampling, emit(i)))
    engine.start()
    assert done.wait(30)
    engine.stop()
    assert passes == [5]  # one padded pass for the five prompts
    for i, p in enumerate(PROMPTS[:5]):
        assert "".join(texts[i]) == _alone(model, tok, p, max_new_tokens=10).text, p


def test_a_bfloat16_server_answers_as_lmlab_generate_in_bfloat16(tiny_pretrained):
    """`--dtype bfloat16` (auto's choice on CPUs with AMX / AVX-512-bf16): at temperature 0 a request
    served alone gets what lmlab.generate returns on the same model in bf16. (Batched, a bf16 GEMM of
    8 rows may round a row differently from a GEMM of one: see the README.)"""
    folder = tiny_pretrained["gpt"]
    model, tok = lmlab.load(folder, dtype=torch.bfloat16).eval(), load_tokenizer(folder)
    server = Server(folder, dtype="bfloat16", max_batch=8)
    try:
        assert httpx.get(server.url + "/health").json()["decoding"]["dtype"] == "bfloat16"
        for p in PROMPTS[:4]:
            r = server.client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
            assert r.choices[0].text == _alone(model, tok, p, max_new_tokens=12).text, p
    finally:
        server.close()
