"""lm-evaluation-harness against `lmlab serve`, unchanged: its `local-completions` model with the
exported folder's tokenizer and with the server's own (the remote-tokenizer path it probes for), for a
multiple-choice task scored by log-likelihood and a generate_until task, beside its own Hugging Face
backend on the same exported folder and beside `lmlab.generate`."""

from __future__ import annotations

import gzip
import json
import os
import random

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")
pytest.importorskip("aiohttp")

from conftest import random_decoder  # noqa: E402
from test_serve import Server  # noqa: E402

import lmlab  # noqa: E402
from lmlab.generate import complete  # noqa: E402
from lmlab.tokenizer import load_tokenizer  # noqa: E402

MC_YAML = """task: lmlab_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""
GEN_YAML = """task: lmlab_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: [".", ";"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tiny_pretrained, tmp_path_factory):
    """A random decoder exported in Hugging Face format, served; the two tasks written as JSONL + YAML."""
    root = tmp_path_factory.mktemp("lm-eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["HF_DATASETS_CACHE"] = str(root / "datasets-cache")
    folder = root / "gpt-hf"
    tok = load_tokenizer(tiny_pretrained["gpt"])
    random_decoder(tok, folder, 256, seed=0, format="hf")
    from lmlab.data.corpus import demo_corpus

    lines = [ln.split() for ln in gzip.open(demo_corpus("kjv"), "rt").read().splitlines()[:400] if len(ln.split()) > 12]
    rng = random.Random(0)
    mc, gen = [], []
    for i, words in enumerate(lines[:40]):
        others = rng.sample([w for j, w in enumerate(lines) if j != i], 3)
        choices = [" ".join(words[6:10])] + [" ".join(o[6:10]) for o in others]
        order = rng.sample(range(4), 4)
        mc.append({"query": " ".join(words[:6]), "choices": [choices[k] for k in order], "gold": order.index(0)})
    for words in lines[40:52]:
        gen.append({"prompt": " ".join(words[:8]), "target": " ".join(words[8:10])})
    tasks = root / "tasks"
    tasks.mkdir()
    for name, rows, yaml in (("mc", mc, MC_YAML), ("gen", gen, GEN_YAML)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(yaml.format(path=tasks / f"{name}.jsonl"))
    server = Server(folder, max_batch=8)
    yield server, folder, tasks, gen
    server.close()


def _run(model: str, model_args: str, tasks) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["lmlab_mc", "lmlab_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        device="cpu",
        batch_size=1,
    )


def _choice_lls(res: dict) -> np.ndarray:
    samples = sorted(res["samples"]["lmlab_mc"], key=lambda s: s["doc_id"])
    return np.array([[r[0][0] for r in s["resps"]] for s in samples])


def _generations(res: dict) -> list[str]:
    return [s["filtered_resps"][0] for s in sorted(res["samples"]["lmlab_gen"], key=lambda s: s["doc_id"])]


def test_lm_eval_through_lmlab_serve_matches_its_hf_backend_and_lmlab_generate(setup):
    server, folder, tasks, gen = setup
    url = f"{server.url}/v1/completions"
    common = f"model=tiny,base_url={url},max_length=256,num_concurrent=1,max_retries=1"
    with_folder = _run("local-completions", f"{common},tokenizer={folder},tokenizer_backend=huggingface", tasks)
    remote = _run("local-completions", common, tasks)  # no tokenizer: lm-eval probes /tokenizer_info, /tokenize
    hf = _run("hf", f"pretrained={folder},tokenizer={folder},dtype=float32", tasks)

    want = _choice_lls(hf)
    assert want.shape == (40, 4) and np.isfinite(want).all()
    for res in (with_folder, remote):
        np.testing.assert_allclose(_choice_lls(res), want, atol=1e-4)
        assert res["results"]["lmlab_mc"]["acc,none"] == hf["results"]["lmlab_mc"]["acc,none"]

    model, tok = lmlab.load(folder).eval(), load_tokenizer(folder)
    expect = []
    for doc in gen:
        text = complete(model, tok, doc["prompt"], max_new_tokens=12, stop_strings=[".", ";"])[0].text
        expect.append(min((text.split(s)[0] for s in (".", ";")), key=len))
    assert _generations(with_folder) == expect
    assert _generations(remote) == expect
    assert any(expect), expect  # not all empty: the comparison says something


def test_the_tokenizer_endpoints_answer_as_vllm_does(setup):
    server, folder, _, _ = setup
    import httpx

    tok = load_tokenizer(folder)
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 256
    text = "And the LORD said unto Moses, 你好"
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode(text, add_special_tokens=False) and r["count"] == len(r["tokens"])
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == text
    assert httpx.post(server.url + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()[
        "tokens"
    ] == [tok.eos_id]
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(server.url + "/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "x"}]})
    assert both.status_code == 400
