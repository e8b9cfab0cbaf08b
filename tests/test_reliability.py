"""Crash safety: runs killed with SIGKILL resume to the uninterrupted run's weights (a small subset of
`python -m tests.reliability crash`), checkpoints carry checksums and a bad one is skipped, a full disk
leaves the previous checkpoint, and the defects the campaign found stay fixed."""

from __future__ import annotations

import contextlib
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability import crash, fuzz, hostile, server

import lmlab
from lmlab.errors import CheckpointError
from lmlab.pretrain import PretrainConfig, pretrain
from lmlab.train.checkpoint import verify_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The crash campaign's corpus, tokenizer and settings, for 8 steps (checkpoints at 4 and 8)."""
    return crash.prepare(tmp_path_factory.mktemp("reliability"), steps=8)


def _pc(base, out, **train) -> PretrainConfig:
    d = json.loads(json.dumps(base))
    d["out"], d["resume"] = str(out), True
    d["train"].update(train)
    return PretrainConfig.from_dict(d)


def _steps(run: Path) -> list[int]:
    return [
        r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"
    ]


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_runs_killed_in_steps_evaluations_and_checkpoint_writes_resume_to_the_same_weights(tmp_path, processes):
    r = crash.campaign(tmp_path, kills=3, processes=processes, steps=12, per_trial=3, seed=1)
    assert r["failures"] == []
    assert r["kills"] == 3 and r["weights_equal"] == r["trials"] == 1
    aimed = [k["aimed"] for t in r["trial_records"] for k in t["kills"]]
    assert aimed == ["step", "eval", "save"]


@pytest.mark.slow  # 30 s; the streamed resume is checked in tests/test_streaming.py by default
def test_streaming_runs_killed_anywhere_resume_to_the_same_weights(tmp_path):
    r = crash.campaign(tmp_path, kills=3, processes=1, steps=12, per_trial=3, seed=1, stream=True)
    assert r["failures"] == [] and r["stream"]
    assert r["kills"] == 3 and r["weights_equal"] == r["trials"] == 1


def test_a_corrupted_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, base):
    pretrain(_pc(base, tmp_path / "whole"))
    run = tmp_path / "run"
    pretrain(_pc(base, run, max_steps=8))  # checkpoints at steps 4 and 8
    ckpts = run / "checkpoints"
    weights = ckpts / "step-00000008" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: its SHA-256 differs from the manifest's"):
        verify_checkpoint(ckpts / "step-00000008")
    with pytest.raises(CheckpointError, match=r"model.safetensors: its SHA-256 differs"):
        lmlab.load(ckpts / "step-00000008")  # loading a checkpoint as a model checks it too
    notes = []
    summary = pretrain(
        _pc(base, run, max_steps=8), lambda kind, info: notes.append(info["text"]) if kind == "note" else 0
    )
    assert summary["resumed"] and summary["steps"] == 8
    assert any("skipping checkpoint step-00000008" in n and "model.safetensors" in n for n in notes), notes
    assert "resuming from step-00000004, the newest good checkpoint" in notes
    assert crash.differing(run, tmp_path / "whole") == []  # steps 5-8 trained again, to the same weights
    assert _steps(run) == list(range(1, 9))


def test_a_truncated_or_missing_file_is_named_and_no_good_checkpoint_is_an_error(tmp_path, base):
    run = tmp_path / "run"
    pretrain(_pc(base, run))
    ckpts = run / "checkpoints"
    opt = ckpts / "step-00000008" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"optimizer.pt: 100 bytes, the manifest says \d+: truncated"):
        verify_checkpoint(ckpts / "step-00000008")
    (ckpts / "step-00000004" / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no good checkpoint: .*optimizer.pt: 100 bytes.*state.pt: missing"):
        pretrain(_pc(base, run, max_steps=10))


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, base):
    run = tmp_path / "run"
    pretrain(_pc(base, run, max_steps=4))
    size = (run / "checkpoints" / "step-00000004" / "optimizer.pt").stat().st_size
    config = tmp_path / "more.json"
    config.write_text(json.dumps(_pc(base, run, max_steps=8).to_dict()))
    code = (
        "import json, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size // 2}, {size // 2}))  # no file may grow that large\n"
        "from lmlab.pretrain import PretrainConfig, pretrain\n"
        "pretrain(PretrainConfig.from_dict(json.load(open(sys.argv[1]))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "CheckpointError: step 8: the checkpoint could not be written" in done.stderr, done.stderr[-2000:]
    assert f"may not write files over {size // 2:,} bytes (ulimit -f)" in done.stderr
    assert "MiB free there" in done.stderr and "step-00000004 is intact" in done.stderr
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000004"]  # no partial folder
    verify_checkpoint(ckpts / "step-00000004")
    assert pretrain(_pc(base, run, max_steps=8))["steps"] == 8  # with room again, it resumes


def test_metrics_of_a_run_killed_before_its_first_checkpoint_are_not_logged_twice(tmp_path, base):
    """Found by the crash campaign: a run killed before its first checkpoint started over, but its
    first life's records stayed in metrics.jsonl, so steps 1, 2 appeared twice."""
    run = tmp_path / "run"
    run.mkdir()
    stale = [{"step": s, "split": "train", "loss": 9.0} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale) + '{"step": 3, "spl')
    pretrain(_pc(base, run, max_steps=3))
    assert _steps(run) == [1, 2, 3]
    assert all(r["loss"] != 9.0 for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()))


def test_a_metrics_line_torn_by_a_kill_does_not_stop_the_resume(tmp_path, base):
    """A kill in the middle of a metrics append leaves half a line; resuming dropped it only after
    reading it as JSON, and failed there."""
    run = tmp_path / "run"
    pretrain(_pc(base, run, max_steps=4))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "split": "tr')
    assert pretrain(_pc(base, run, max_steps=6))["steps"] == 6
    assert _steps(run) == list(range(1, 7))
    assert torch.load(run / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)["step"] == 6


@pytest.mark.parametrize("case", list(hostile.CASES))
def test_a_hostile_model_folder_is_refused_by_name_before_anything_runs(tmp_path, case):
    r = hostile.attack(tmp_path / "model", case)
    assert r["error_type"] == "CheckpointError", r
    assert r["refused"], f"{r['error']!r} does not match {hostile.CASES[case][1]!r}"
    assert not r["code_ran"]
    assert r["seconds"] < 5 and r["rss_growth_mb"] < 200  # refused before the sizes it names are allocated


@pytest.mark.parametrize("reader", list(fuzz.READERS))
def test_a_reader_fed_random_and_mutated_files_raises_only_lmlab_errors(reader):
    r = fuzz.campaign(reader, examples=40)
    assert r["defects"] == []
    assert r["examples"] == 40 and r["lmlab_errors"] > 0  # the inputs reached the reader's checks


@pytest.mark.parametrize(
    "reader",
    ["classification TSV", "classification CSV", "CoNLL", "SQuAD JSON", "seq2seq JSONL", "chat JSONL", "YAML config"],
)
def test_a_task_file_that_is_not_utf8_names_the_file_line_and_byte(tmp_path, reader):
    """Found by the fuzzer: these readers let UnicodeDecodeError out (the corpus reader did not)."""
    r = fuzz.READERS[reader]
    data = r.valid()
    cut = data.index(b"\n") + 1
    path = tmp_path / ("tokenizer.json" if r.read is fuzz._tokenizer else f"input{r.suffix}")
    path.write_bytes(data[:cut] + b"\xff" + data[cut:])
    with pytest.raises(
        lmlab.LmlabError, match=rf"{path.name}: line 2, byte offset {cut}: not valid UTF-8 \(byte 0xff\)"
    ):
        r.read(path)


def test_a_gzip_corpus_corrupted_inside_its_stream_is_a_data_error(tmp_path):
    """Found by the fuzzer: a gzip file whose compressed stream is damaged let zlib.error out."""
    from lmlab.data.corpus import read_documents
    from lmlab.errors import DataError

    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00j\xa5\x0fk\x02\xff\xff")  # the fuzzer's minimal input
    with pytest.raises(DataError, match=r"corpus.txt.gz: not a readable gzip file"):
        list(read_documents(path))


def test_a_yaml_config_whose_keys_are_not_text_is_a_config_error(tmp_path):
    """Found by the fuzzer: `&amily: decoder` (a YAML anchor) makes a key None, and sorting the names
    of the unknown settings raised TypeError."""
    from lmlab.errors import ConfigError
    from lmlab.settings import load_yaml

    path = tmp_path / "run.yaml"
    path.write_text("&amily: decoder\nseq_len: 64\n")
    with pytest.raises(ConfigError, match=r"run.yaml: setting names are text; found None"):
        PretrainConfig.from_dict(load_yaml(path), str(path))
    path.write_text("family: decoder\ntrain: 5\n")
    with pytest.raises(ConfigError, match=r"run.yaml: expected a mapping of train settings, found int"):
        PretrainConfig.from_dict(load_yaml(path), str(path))


def test_a_thousand_malformed_requests_get_4xx_and_the_server_stays_healthy():
    r = server.campaign(1000, seed=3)
    assert r["defects"] == [] and r["healthy_after"]
    assert set(r["statuses"]) <= {"200", "400", "404", "413", "422"} and r["statuses"]["400"] > 500


def test_requests_that_stopped_the_engine_or_broke_a_500_out_are_400s(tmp_path):
    """Found by the server campaign: a seed beyond what torch's generator takes (10**30) raised in the
    engine thread and stopped the engine, so every later request got 503; a lone surrogate ("\\ud800")
    in a prompt or an input was a 500."""
    with server.serving(tmp_path) as client:
        for seed in (10**30, "9" * 30, 1e30):  # pydantic takes "999..." and 1e30 as integers too
            r = client.post(
                "/v1/completions", json={"model": "tiny", "prompt": "in the", "max_tokens": 2, "seed": seed}
            )
            assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
            assert client.get("/health").status_code == 200
        for path, body in [
            ("/v1/completions", '{"model": "tiny", "prompt": "in \\ud800 the", "max_tokens": 2}'),
            ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),
            ("/v1/embeddings", '{"model": "tiny", "input": ["ok", "\\udfff"]}'),
        ]:
            r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, r.text)
            assert "not valid Unicode text" in r.json()["error"]["message"]
        ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "in the", "max_tokens": 2, "seed": 7})
        assert ok.status_code == 200 and client.get("/health").status_code == 200


def test_the_engine_refuses_a_seed_it_cannot_use_in_the_callers_thread(tiny_pretrained):
    """The engine behind the server: the same seed, given through the Python API, is refused by
    submit() instead of stopping the engine thread."""
    from lmlab.serve.engine import Engine, Request, Sampling
    from lmlab.tokenizer import load_tokenizer

    folder = tiny_pretrained["gpt"]
    model, tok = lmlab.load(folder).eval(), load_tokenizer(folder)
    engine = Engine(model, tok, max_batch=2).start()
    try:
        bad = Request(tok.encode("the", add_special_tokens=False), Sampling(max_tokens=2, seed=10**30), lambda d: None)
        with pytest.raises(ValueError, match="seed 1000000000000000000000000000000 cannot seed a generator"):
            engine.submit(bad)
        assert engine.alive
    finally:
        engine.stop()


def test_a_client_that_stalls_while_sending_its_body_gets_408(tmp_path):
    """A slow client (half a body, then nothing) is answered 408 after --read-timeout instead of
    holding its connection and a handler for ever; the server keeps answering others."""
    import socket as sockets
    import time

    with server.serving(tmp_path, read_timeout=1.0) as client:
        host, port = client.base_url.host, client.base_url.port
        with sockets.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n")
            s.sendall(b"content-length: 100\r\n\r\n" + b'{"model": "tiny", ')
            t0 = time.monotonic()
            answer = s.recv(4096).decode("latin-1")
            waited = time.monotonic() - t0
            while not answer.rstrip().endswith("}"):  # the body may come in a second packet
                more = s.recv(4096).decode("latin-1")
                if not more:
                    break
                answer += more
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "nothing for 1 s after 18 bytes" in answer
        assert 0.9 < waited < 5
        assert client.get("/health").status_code == 200


def test_the_server_binds_this_machine_only_and_answers_no_cross_origin_request_by_default(tmp_path):
    from lmlab.cli import build_parser

    assert build_parser().parse_args(["serve", "--model", "m"]).host == "127.0.0.1"
    with server.serving(tmp_path) as client:
        r = client.options(
            "/v1/completions", headers={"origin": "https://evil.example", "access-control-request-method": "POST"}
        )
        assert "access-control-allow-origin" not in r.headers
        r = client.get("/v1/models", headers={"origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_is_on_only_for_the_origins_asked_for(tmp_path):
    from lmlab.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "m", "--cors-origin", "https://app.example"])
    assert args.cors_origin == ["https://app.example"]
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
    with server.serving(tmp_path, cors_origins=["https://app.example"], api_key="sekret") as client:
        r = client.options("/v1/completions", headers={"origin": "https://app.example", **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = client.options("/v1/completions", headers={"origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in r.headers
        body = {"model": "tiny", "prompt": "in the", "max_tokens": 2}
        r = client.post("/v1/completions", json=body, headers={"origin": "https://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
        auth = {"origin": "https://app.example", "authorization": "Bearer sekret"}
        assert client.post("/v1/completions", json=body, headers=auth).status_code == 200


# ---- an engine that survives a request's failure --------------------------------------------------------
class _Die(BaseException):
    """Not an Exception: what stops the engine (as KeyboardInterrupt would)."""


def _poisoned(model, poison: int | None, when, error=RuntimeError):
    """Make model raise `error` on a call whose input ids hold `poison` (any, with None) and for which
    when(ids) holds."""
    forward = model.forward

    def wrapped(input_ids=None, *args, **kw):
        if input_ids is not None and when(input_ids) and (poison is None or bool((input_ids == poison).any())):
            raise error(f"poisoned input ({poison})")
        return forward(input_ids, *args, **kw)

    model.forward = wrapped
    return forward


def _run(engine, prompts, max_tokens=6, seeds=None):
    """Submit prompts (token id lists) and wait for each to end: {i: (text, finish_reason, error)}."""
    import threading

    from lmlab.serve.engine import Request, Sampling

    done, out = threading.Event(), {}

    def emit(i):
        def f(delta):
            text, _, _ = out.get(i, ("", None, None))
            out[i] = (text + delta.text, delta.finish_reason, delta.error)
            if delta.finish_reason is not None and len([v for v in out.values() if v[1]]) == len(prompts):
                done.set()

        return f

    for i, ids in enumerate(prompts):
        seed = None if seeds is None else seeds[i]
        sampling = Sampling(max_tokens=max_tokens, temperature=0 if seed is None else 1.0, seed=seed)
        engine.submit(Request(ids, sampling, emit(i)))
    if engine.thread is None:
        engine.start()
    assert done.wait(30), out
    return out


@pytest.fixture
def engine_parts(tiny_pretrained):
    from lmlab.tokenizer import load_tokenizer

    folder = tiny_pretrained["gpt"]
    return lmlab.load(folder).eval(), load_tokenizer(folder)


def test_a_prompt_that_fails_in_a_group_prefill_fails_alone_and_the_engine_goes_on(engine_parts):
    """Four waiting prompts are prefilled together; one makes the model raise. Before, the engine
    died: every request was told "error", the group's other rows never heard anything, and no
    later request was served. Now the group is retried one by one: only the poisoned request fails,
    with the reason, the others answer as they do alone, and the engine serves the next request."""
    from lmlab.serve.engine import Engine

    model, tok = engine_parts
    prompts = [[5, 6, 7], [8, 9, 10], [11, 99, 12], [13, 14]]
    alone = {i: _run(Engine(model, tok, max_batch=1), [p])[0] for i, p in enumerate(prompts) if i != 2}
    _poisoned(model, 99, lambda ids: ids.shape[1] > 1)
    engine = Engine(model, tok, max_batch=8)
    passes = []
    together = engine._prefill_together
    engine._prefill_together = lambda group: passes.append(len(group)) or together(group)
    try:
        out = _run(engine, prompts)
        assert passes == [4]  # they were tried together first
        assert out[2][1] == "error" and "prefilling the prompt: RuntimeError: poisoned input (99)" in out[2][2]
        assert {i: out[i] for i in alone} == alone
        assert engine.alive and engine.stats()["failed"] == 1
        assert _run(engine, [[5, 6, 7]]) == {0: alone[0]}
    finally:
        engine.stop()


def test_a_row_whose_sampling_fails_leaves_the_batch_and_the_others_go_on(engine_parts):
    from lmlab.serve.engine import Engine

    model, tok = engine_parts
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12]]
    alone = {i: _run(Engine(model, tok, max_batch=1), [p], seeds=[i + 1])[0] for i, p in enumerate(prompts)}
    engine = Engine(model, tok, max_batch=8)
    advance = engine._advance  # the per-row part of a step: the batch is sampled at once before it
    calls = []

    def failing(row, info):
        calls.append(row.req.sampling.seed)
        if row.req.sampling.seed == 2 and calls.count(2) == 3:  # the third token of the second request
            raise ValueError("probabilities do not sum to one")
        return advance(row, info)

    engine._advance = failing
    try:
        out = _run(engine, prompts, seeds=[1, 2, 3])
        assert out[1][1] == "error" and "sampling the next token: ValueError: probabilities" in out[1][2]
        assert out[0] == alone[0] and out[2] == alone[2]
        assert out[1][0] == alone[1][0][: len(out[1][0])]  # what it had sent before was right
        assert engine.alive and engine.stats()["failed"] == 1 and engine.stats()["batch"] == 0
    finally:
        engine.stop()


def test_a_decoding_step_that_fails_fails_its_rows_only_and_the_server_goes_on(tmp_path):
    """The batch's shared forward pass raises once (in a decoding step, which may have written part
    of the KV cache): the requests in that step get a 500 naming the failure, streamed or not, and
    the server is still healthy and answers the next request as before."""
    import openai

    with server.serving(tmp_path) as client:
        state = client.served.state.lmlab
        body = {"model": "tiny", "prompt": "in the", "max_tokens": 4, "temperature": 0}
        before = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        armed = [True]  # one failure, in the next decoding step

        def once(ids):
            return ids.shape[1] == 1 and bool(armed) and armed.pop()

        _poisoned(state.model, None, once)
        r = client.post("/v1/completions", json={**body, "prompt": "the the"})
        assert r.status_code == 500, r.text
        e = r.json()["error"]
        assert e["code"] == "engine_error" and "a decoding step of 1 request(s): RuntimeError: poisoned" in e["message"]
        assert client.get("/health").status_code == 200
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == before
        armed.append(True)  # the same failure in a stream: an error event, which OpenAI's client raises
        oc = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="a decoding step"):
            for _ in oc.completions.create(model="tiny", prompt="the the", max_tokens=4, temperature=0, stream=True):
                pass
        assert client.get("/health").status_code == 200
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_engine_that_dies_tells_every_request_it_holds_and_takes_no_more(engine_parts):
    """Before, the requests of a group being prefilled together when the engine died were never told
    (their clients waited for ever); and a request submitted after the death waited in the queue."""
    import threading

    from lmlab.serve.engine import Engine, EngineStopped, Request, Sampling

    model, tok = engine_parts
    _poisoned(model, 99, lambda ids: True, error=_Die)
    engine = Engine(model, tok, max_batch=2)  # two are prefilled together, the third waits
    told, done = {}, threading.Event()
    for i, ids in enumerate([[5, 99], [6, 7], [8, 9]]):

        def emit(delta, i=i):
            told[i] = (delta.finish_reason, delta.error)
            if len(told) == 3:
                done.set()

        engine.submit(Request(ids, Sampling(max_tokens=3, temperature=0), emit))
    engine.start()
    assert done.wait(10), told
    assert all(reason == "error" and "the engine stopped: _Die" in why for reason, why in told.values())
    engine.thread.join(5)
    assert not engine.alive
    with pytest.raises(EngineStopped):
        engine.submit(Request([5], Sampling(max_tokens=1), lambda d: None))


def test_stopping_the_engine_tells_the_requests_still_waiting(engine_parts):
    """Before, stop() left the rows running and the requests waiting without a last delta."""
    from lmlab.serve.engine import Engine, Request, Sampling

    model, tok = engine_parts
    engine = Engine(model, tok, max_batch=1)
    told = {0: [], 1: []}
    for i, ids in enumerate(([5, 6], [7, 8])):
        engine.submit(Request(ids, Sampling(max_tokens=50, temperature=0), lambda d, i=i: told[i].append(d)))
    engine.start()
    engine.stop()
    finals = {i: [d.finish_reason for d in ds if d.finish_reason] for i, ds in told.items()}
    assert all(len(f) == 1 for f in finals.values()), finals  # each request ends once, one way or another
    assert "error" in finals[1] and told[1][-1].error == "the engine was stopped"


# ---- slow headers (slowloris) ---------------------------------------------------------------------------
def _protocols():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    out = [pytest.param(H11Protocol, id="h11")]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        out.append(pytest.param(HttpToolsProtocol, id="httptools"))
    except ImportError:
        out.append(pytest.param(None, id="httptools", marks=pytest.mark.skip("httptools is not installed")))
    return out


def _until_closed(sock, limit: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    import time

    t0, got = time.monotonic(), b""
    sock.settimeout(limit)
    while True:
        more = sock.recv(4096)
        if not more:
            return got, time.monotonic() - t0
        got += more


@pytest.mark.parametrize("protocol", _protocols())
def test_connections_that_send_their_headers_too_slowly_are_cut_off(tmp_path, protocol):
    """Before, a connection left silent, or sending its headers a byte at a time, was held open for
    as long as its client liked (uvicorn times out only idle keep-alive connections). Now each has
    --header-timeout seconds (1 here) to send a request's headers: then a 408 and the connection
    is closed. A request whose headers were in time is not cut, however slowly its body comes (that
    is --read-timeout's business) or however long its answer takes."""
    import socket as sockets
    import threading
    import time

    with server.serving(tmp_path, protocol=protocol, header_timeout=1.0) as client:
        addr = (client.base_url.host, client.base_url.port)
        with sockets.create_connection(addr) as silent:  # opened, then nothing
            got, waited = _until_closed(silent)
            assert got == b"" and 0.9 < waited < 3

        def trickle(sock, data: bytes, every: float, stop: threading.Event) -> None:
            with contextlib.suppress(OSError):
                for b in data:
                    if stop.is_set():
                        return
                    sock.sendall(bytes([b]))
                    time.sleep(every)

        head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"x-pad-%d: y\r\n" % i for i in range(50)) + b"\r\n"
        with sockets.create_connection(addr) as slow:  # a byte every 0.05 s: 40 s for the whole headers
            stop = threading.Event()
            threading.Thread(target=trickle, args=(slow, head, 0.05, stop), daemon=True).start()
            got, waited = _until_closed(slow)
            stop.set()
            assert got.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in got, got
            assert 0.9 < waited < 3
        with sockets.create_connection(addr) as kept:  # kept alive: the clock starts again after the answer
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = kept.recv(4096)
            while b"\r\n\r\n" not in first or len(first.partition(b"\r\n\r\n")[2]) < int(
                first.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0
            ):
                first += kept.recv(4096)  # the whole first answer, headers and body
            assert first.startswith(b"HTTP/1.1 200"), first
            kept.sendall(b"GET /health HTTP/1.1\r\n")
            got, waited = _until_closed(kept)
            assert got.startswith(b"HTTP/1.1 408") and waited < 3
        with sockets.create_connection(addr) as ok:  # headers in two parts, 0.5 s apart, then a slow body
            body = json.dumps({"model": "tiny", "prompt": "in the", "max_tokens": 2, "temperature": 0}).encode()
            ok.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.5)
            ok.sendall(b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body))
            for i in range(0, len(body), len(body) // 3 + 1):  # 1.5 s for the body: past the header limit
                time.sleep(0.5)
                ok.sendall(body[i : i + len(body) // 3 + 1])
            answer = ok.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200"), answer
        assert client.get("/health").status_code == 200


def test_a_tiny_temperature_decodes_greedily_instead_of_failing(tmp_path, engine_parts):
    """Found by the stateful schemathesis run: temperature 3e-75 (the schema allows any number in
    [0, 2]) made logits / temperature overflow to inf, and sampling raised "probability tensor
    contains either inf, nan or element < 0": a 500 (before the engine survived such failures, the
    end of the engine). A temperature under 1e-5 now decodes greedily, in the server and in
    lmlab.generate (vLLM draws the same line)."""
    from lmlab.generate import generate

    model, _ = engine_parts
    ids = torch.tensor([[5, 6, 7]])
    greedy = generate(model, ids, max_new_tokens=6)
    assert torch.equal(generate(model, ids, max_new_tokens=6, do_sample=True, temperature=3e-75, seed=1), greedy)
    with server.serving(tmp_path) as client:
        body = {"model": "tiny", "prompt": "in the", "max_tokens": 6}
        want = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
        for t in (3.0682633754680706e-75, 1e-300, 5e-324):
            r = client.post("/v1/completions", json={**body, "temperature": t, "seed": 3})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (t, r.text)


def test_an_app_started_a_second_time_serves_again(tmp_path):
    """Found by the stateful run: an app whose lifespan ran twice (two test clients, one after the
    other) answered 503 "the engine has stopped" the second time, since the first shut-down had
    stopped the engine and nothing started it again."""
    from starlette.testclient import TestClient

    from lmlab.serve.app import ServeConfig, create_app

    app = create_app(ServeConfig(model=str(server.folder(tmp_path)), name="tiny", dtype="float32"), load_now=True)
    body = {"model": "tiny", "prompt": "in the", "max_tokens": 3, "temperature": 0}
    answers = []
    for _ in range(2):
        with TestClient(app) as client:
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            answers.append(r.json()["choices"][0]["text"])
    assert answers[0] == answers[1] and not app.state.lmlab.engine.alive  # stopped by the last shut-down


# ---- silent wrong results of the readers, found by the reference readers of tests/reliability/fuzz.py ----
def _write(tmp_path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_record_with_a_carriage_return_or_a_line_separator_inside_is_one_record(tmp_path):
    """Found by the fuzzer: the task readers split lines with str.splitlines, which also breaks at a
    lone "\\r" (JSON white space), U+0085, U+2028 (characters a JSON string may hold raw) and a
    vertical tab. A valid JSONL record was refused, and a CoNLL line split in two gave the tokens
    tags that were not theirs. Lines now end at "\\n" only."""
    from lmlab.tasks.classify import read_table
    from lmlab.tasks.ner import read_conll
    from lmlab.tasks.seq2seq import read_pairs

    pairs = _write(tmp_path, "p.jsonl", b'{"source": "thee",\r "target": "you\xe2\x80\xa8and \xc2\x85me"}\n')
    assert [(p.source, p.target) for p in read_pairs(pairs)] == [("thee", "you\u2028and \x85me")]
    table = _write(tmp_path, "t.jsonl", b'{\r"text": "the lord", "label": "holy"}\n')
    assert [(ex.texts, ex.label) for ex in read_table(table)[0]] == [(["the lord"], "holy")]
    conll = _write(tmp_path, "x.conll", b"the O\x0blord B-GOD\nin O\n")  # CoNLL-2003: token first, tag last
    assert [(ex.words, ex.label) for ex in read_conll(conll)] == [(["the", "in"], ["B-GOD", "O"])]


def test_a_utf8_byte_order_mark_is_not_part_of_the_text(tmp_path):
    """Found by the fuzzer: a file that starts with a byte-order mark (Windows editors write one) gave
    a first document starting with U+FEFF, a CoNLL first token with it, and a JSONL, TSV or SQuAD
    file was refused ("text" was not among the columns "\\ufefftext", ...)."""
    from lmlab.data.corpus import read_documents
    from lmlab.tasks.classify import read_table
    from lmlab.tasks.ner import read_conll

    bom = b"\xef\xbb\xbf"
    assert list(read_documents(_write(tmp_path, "c.txt", bom + b"in the beginning\n"))) == ["in the beginning"]
    assert list(read_documents(_write(tmp_path, "c.jsonl", bom + b'{"text": "a"}\n'))) == ["a"]
    assert list(read_documents(_write(tmp_path, "c.txt.gz", gzip.compress(bom + b"a\n")))) == ["a"]
    assert read_table(_write(tmp_path, "t.tsv", bom + b"text\tlabel\nthe lord\tholy\n"))[0][0].texts == ["the lord"]
    assert read_conll(_write(tmp_path, "x.conll", bom + b"the O\n"))[0].words == ["the"]


def test_malformed_csv_quoting_and_repeated_columns_are_refused_by_line(tmp_path):
    """Found by the fuzzer: Python's csv module, lenient by default, read `"the lord, the"king",holy`
    as the text `the lord, theking"`; a field with a quote opened and never closed swallowed the rest
    of the file into one text. Both are now errors naming the line. A header naming a column twice
    kept only the last of the two columns."""
    from lmlab.errors import DataError
    from lmlab.tasks.classify import read_table

    bad = _write(tmp_path, "a.csv", b'text,label\nthe field,land\n"the lord, the"king",holy\n')
    with pytest.raises(DataError, match=r"a.csv:3: not valid CSV .*quoted whole"):
        read_table(bad)
    with pytest.raises(DataError, match=r"b.csv:2: not valid CSV"):
        read_table(_write(tmp_path, "b.csv", b'text,label\n"the lord, the king,holy\nthe field,land\n'))
    with pytest.raises(DataError, match=r"c.csv:1: the header names 'text' more than once"):
        read_table(_write(tmp_path, "c.csv", b"text,text,label\na,b,c\n"))
    good = _write(tmp_path, "d.csv", b'text,label\n"the lord, the ""king""\nof kings",holy\nthe field,land\n')
    assert [ex.texts[0] for ex in read_table(good)[0]] == ['the lord, the "king"\nof kings', "the field"]


def test_json_values_of_the_wrong_type_are_refused_not_converted(tmp_path):
    """Found by reading the reference readers against lmlab's: a JSONL text of null became the text
    "None"; a SQuAD answer_start of -38 sliced the context from its end (and matched "God"), one of
    17.9 or true was taken as 17 or 1; a context that was a number was accepted. Each is now an error."""
    from lmlab.errors import DataError
    from lmlab.tasks.classify import read_table
    from lmlab.tasks.qa import read_squad

    with pytest.raises(DataError, match=r"t.jsonl:1: the 'text' column holds NoneType, expected text"):
        read_table(_write(tmp_path, "t.jsonl", b'{"text": null, "label": "holy"}\n'))
    for start in (-38, 17.9, True):
        squad = json.loads(json.dumps(fuzz.SQUAD))
        squad["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = start
        with pytest.raises(DataError, match=r"an answer needs a text and a character offset of 0 or more"):
            read_squad(_write(tmp_path, "s.json", json.dumps(squad).encode()))
    squad = json.loads(json.dumps(fuzz.SQUAD))
    squad["data"][0]["paragraphs"][0]["context"] = 17
    with pytest.raises(DataError, match=r"a context is int, expected text"):
        read_squad(_write(tmp_path, "s.json", json.dumps(squad).encode()))


def test_a_yaml_config_that_is_a_lone_value_is_refused_and_an_empty_one_is_the_defaults(tmp_path):
    """Found by the fuzzer: a config file holding ` 0.0` (or false, "", []) was read as an empty
    config, every setting its default."""
    from lmlab.errors import ConfigError
    from lmlab.settings import load_yaml

    for text in (" 0.0", "false", '""', "[]"):
        with pytest.raises(ConfigError, match=r"run.yaml: expected a mapping of settings"):
            load_yaml(_write(tmp_path, "run.yaml", text.encode()))
    assert load_yaml(_write(tmp_path, "run.yaml", b"# nothing yet\n")) == {}
