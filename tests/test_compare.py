"""The comparison lab: contenders, FLOPs, measurements, the whole run with its report, resume and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import lmlab
from lmlab.cli import main
from lmlab.compare import CompareConfig
from lmlab.compare.contenders import Contender, batch_tokens, contenders, model_config, train_flops_per_step
from lmlab.compare.report import _strip_timings

TINY = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=32, vocab_size=600, batch_size=8, warmup_steps=4)


@pytest.fixture(scope="module")
def shared_tok(tmp_path_factory):
    from conftest import tiny_text

    from lmlab.tokenizer import train_shared_tokenizer

    tok = train_shared_tokenizer(tiny_text(), 600)
    folder = tmp_path_factory.mktemp("shared-tok")
    tok.save(folder)
    return folder


def test_the_shared_tokenizer_holds_every_familys_special_tokens(shared_tok):
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_tok)
    for role in ("pad", "cls", "sep", "mask", "bos", "eos"):
        assert tok.id_of(role) is not None, role
    assert len(tok.sentinel_ids) == 100 and tok.kind == "bpe"
    assert tok.encode("the lord", add_special_tokens=True) == tok.encode("the lord", add_special_tokens=False)


def test_contenders_share_one_body_and_differ_by_family(shared_tok):
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_tok)
    cc = CompareConfig(moe=["switch", "deepseekmoe"], moe_families=["decoder", "encoder"], **TINY)
    cs = contenders(cc)
    assert [c.name for c in cs] == [
        "encoder",
        "encoder+switch",
        "encoder+deepseekmoe",
        "decoder",
        "decoder+switch",
        "decoder+deepseekmoe",
        "encoder-decoder",
        "prefix-lm",
    ]
    cfgs = {c.name: model_config(cc, c, tok) for c in cs}
    for cfg in cfgs.values():
        assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.position, cfg.norm_placement, cfg.vocab_size) == (
            32,
            2,
            2,
            "rope",
            "pre",
            tok.vocab_size,
        )
    assert cfgs["encoder"].heads == ("mlm",) and cfgs["decoder"].heads == ("lm",)
    assert cfgs["decoder+switch"].ffn == "moe" and cfgs["decoder+switch"].moe_top_k == 1
    assert cfgs["decoder+deepseekmoe"].moe_d_ff == 16  # a quarter of d_ff: finer experts
    assert cfgs["encoder-decoder"].decoder_layers == 2 and cfgs["encoder-decoder"].spec.seq2seq


def test_a_decoders_flops_match_the_parameter_count_formula(shared_tok):
    """For a causal LM every position is read by the decoder and scored by the head, so the count per
    token equals lmlab.info's 3 x forward (2 x matmul weights + 4 x layers x T x d_attn)."""
    from lmlab.info import model_stats, stack_matmul_weights
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_tok)
    cc = CompareConfig(families=["decoder"], moe=["none"], **TINY)
    cfg = model_config(cc, contenders(cc)[0], tok)
    B, T = 4, 32
    batch = {"input_ids": np.full((B, T), 7), "labels": np.full((B, T), 7)}
    tokens = batch_tokens(batch, cfg, tok.pad_id)
    assert tokens["decoder"] == B * T and tokens["head"] == B * T and tokens["encoder"] == 0
    flops = train_flops_per_step(cfg, stack_matmul_weights(cfg, T), tokens)
    assert flops / (B * T) == pytest.approx(model_stats(cfg, T).train_flops_per_token, rel=1e-9)


def test_an_encoder_decoder_counts_each_stack_for_its_own_tokens(shared_tok):
    from lmlab.info import stack_matmul_weights
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_tok)
    cc = CompareConfig(families=["encoder-decoder"], moe=["none"], **TINY)
    cfg = model_config(cc, contenders(cc)[0], tok)
    labels = np.full((2, 10), -100)
    labels[:, :6] = 5  # 6 target tokens per example
    batch = {"input_ids": np.full((2, 32), 7), "attention_mask": np.ones((2, 32), int), "labels": labels}
    tokens = batch_tokens(batch, cfg, tok.pad_id)
    assert (tokens["encoder"], tokens["decoder"], tokens["head"]) == (64, 12, 12)
    w = stack_matmul_weights(cfg, 32)
    assert w["decoder"] > w["encoder"]  # the decoder's blocks carry cross-attention too
    assert tokens["attention"] == 2 * (2 * 32**2) + 2 * 2 * (6**2 + 6 * 32)  # 2 layers in each stack


def _evidence(values, seeds=1, noise=0.0, seed=0):
    """lmlab.metrics.evidence records, one per seed, of per-example 0/1 or real values."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(seeds):
        v = np.asarray(values, float) + rng.normal(0, noise, len(values)) * (noise > 0)
        out.append(
            {"metric": "accuracy", "ids": [str(i) for i in range(len(v))], "num": v.tolist(), "den": [1.0] * len(v)}
        )
    return out


def test_the_same_contender_twice_is_a_tie_and_a_crippled_one_is_undetermined():
    from lmlab.compare.stats import Evidence, Side, judge

    rng = np.random.default_rng(0)
    n = 400
    baseline = Evidence.of_seeds(_evidence(np.full(n, 0.25)))  # chance on 4 choices
    learned = (rng.random(n) < 0.6).astype(float)  # right on 60% of the questions
    a = Evidence.of_seeds(_evidence(learned, seeds=3, noise=0.05, seed=1))
    twin = Evidence.of_seeds(_evidence(learned, seeds=3, noise=0.05, seed=1))  # the same contender, renamed
    j = judge(Side("a", a, baseline, "chance"), Side("a-again", twin, baseline, "chance"), higher_is_better=True)
    assert j.verdict == "tie" and j.difference.low <= 0 <= j.difference.high
    # learning rate 0: answers at chance
    crippled = Evidence.of_seeds(_evidence((rng.random(n) < 0.25).astype(float), seeds=3))
    j = judge(Side("a", a, baseline, "chance"), Side("crippled", crippled, baseline, "chance"), True)
    assert j.verdict == "undetermined" and "crippled is not above its baseline (chance)" in j.reason
    assert "a is not" not in j.reason
    # a real difference between two contenders that both learned
    better = Evidence.of_seeds(_evidence((rng.random(n) < 0.8).astype(float), seeds=3))
    assert judge(Side("b", better, baseline, "chance"), Side("a", a, baseline, "chance"), True).verdict == "confirmed"
    assert (
        judge(Side("a", a, baseline, "chance"), Side("b", better, baseline, "chance"), True).verdict == "contradicted"
    )
    # lower is better (bits per byte): the baseline must be beaten downwards
    j = judge(Side("a", a, baseline, "x"), Side("b", better, baseline, "x"), higher_is_better=False)
    assert j.verdict == "undetermined"


def test_intervals_combine_examples_and_seeds():
    from lmlab.compare.stats import Evidence, interval

    rng = np.random.default_rng(0)
    values = (rng.random(400) < 0.5).astype(float)
    one = interval(Evidence.of_seeds(_evidence(values)))
    assert one.low < 0.5 < one.high and 0.07 < one.high - one.low < 0.13  # about 2 x 1.96 x sqrt(.25 / 400)
    # seeds that disagree widen the interval beyond what the examples alone give
    spread = [_evidence(values + shift)[0] for shift in (-0.1, 0.0, 0.1)]
    wide = interval(Evidence.of_seeds(spread))
    assert wide.high - wide.low > one.high - one.low + 0.05
    # a ratio metric: sums of numerators over sums of denominators (bits over bytes)
    ev = Evidence.of_seeds([{"metric": "bpb", "ids": ["0", "1"], "num": [10.0, 30.0], "den": [10.0, 10.0]}])
    assert ev.value == pytest.approx(2.0)


def test_generation_statistics():
    from lmlab.compare.measure import distinct_n, mutual_information, repetition_rate

    assert distinct_n([[1, 2, 3, 4]], 1) == 1.0 and distinct_n([[1, 1, 1, 1]], 1) == 0.25
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert repetition_rate([[1, 2, 3, 4, 1, 2, 3, 4]], 4) == pytest.approx(1 / 5)
    assert repetition_rate([[1, 2, 3, 4, 5, 6]], 4) == 0.0
    x = np.array([0, 1, 2, 3] * 50)
    assert mutual_information(x, x) == pytest.approx(2.0)  # H(X) for 4 equally likely values
    assert mutual_information(x, np.zeros_like(x)) == pytest.approx(0.0)


def test_second_half_scores_match_the_models_own_loss(tiny_pretrained):
    """A decoder's second-half nats are the per-token loss of labels on the second half."""
    from lmlab.compare.measure import second_half_nats
    from lmlab.families import IGNORE_INDEX
    from lmlab.tokenizer import load_tokenizer

    folder = tiny_pretrained["gpt"]
    model, tok = lmlab.load(folder).eval(), load_tokenizer(folder)
    win = np.arange(5, 37)
    nats = second_half_nats(model, tok, win)
    labels = torch.tensor(win)[None].clone()
    labels[:, :16] = IGNORE_INDEX
    with torch.no_grad():
        loss = model(input_ids=torch.tensor(win)[None], labels=labels).loss
    assert len(nats) == 16 and float(nats.mean()) == pytest.approx(float(loss), abs=1e-5)


# ---- the whole run -------------------------------------------------------------------------------
def _run(out: Path, **kw) -> dict:
    from lmlab.compare import compare

    settings = dict(TINY, out=str(out), eval_windows=8, questions=12, samples=2, max_task_examples=60)
    settings.update(kw)
    return compare(CompareConfig(**settings))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, kjv_lines):
    """Every family, a Switch MoE and its unbalanced twin, 2 seeds, a classification task of the user's."""
    out = tmp_path_factory.mktemp("compare")
    rows = [(v, "law" if i < 400 else "later") for i, v in enumerate(kjv_lines.read_text().splitlines())]
    task = out.parent / "sections.tsv"
    task.write_text("sentence\tlabel\n" + "\n".join(f"{t}\t{lab}" for t, lab in rows[::8]) + "\n")
    events = []
    from lmlab.compare import compare

    cc = CompareConfig(
        **TINY,
        out=str(out / "run"),
        data=[str(kjv_lines)],
        moe=["switch", "switch-nobalance"],
        seeds=2,
        budget="tokens",
        budget_value=12_000,
        tasks=[str(task)],
        eval_windows=8,
        questions=12,
        samples=2,
        max_task_examples=60,
        val_fraction=0.1,
        objectives=["encoder-decoder=span"],
    )
    summary = compare(cc, lambda kind, info: events.append((kind, info)))
    questions = (out / "run" / "questions.jsonl").read_text().splitlines()
    return {"out": out / "run", "summary": summary, "events": events, "cc": cc, "questions": questions}


def test_every_contender_gets_every_metric_that_applies(full_run):
    summary = full_run["summary"]
    names = [c["name"] for c in summary["contenders"]]
    assert names == [
        "encoder",
        "decoder",
        "decoder+switch",
        "decoder+switch-nobalance",
        "encoder-decoder",
        "encoder-decoder[span]",
        "prefix-lm",
    ]
    for c in summary["contenders"]:
        m, est = c["metrics"], c["estimates"]
        generative = c["family"] != "encoder"
        keys = ["fewshot_k3_acc_norm", "val_loss", "train_tokens_per_s", "peak_rss_mb"]
        keys += ["distinct_2", "repetition_4", "decode_tokens_per_s"] if generative else ["pll_bpb"]
        keys += ["load_cv", "dropped"] if c["moe"] else []
        for k in keys:
            assert m[k] is not None and m[k]["n"] == 2 and math.isfinite(m[k]["std"]), (c["name"], k)
        measured = ["mc_k0", "mc_k3", "task:sections"] + (["bpb"] if generative else ["masked_accuracy"])
        for k in measured:
            e = est[k]
            assert e["seeds"] == 2 and e["low"] <= e["value"] <= e["high"], (c["name"], k)
            assert e["beats_baseline"] in (True, False)  # every one of these metrics has a baseline
        assert est["mc_k0"]["examples"] == len(full_run["questions"])
        assert ("bpb" in est) == generative and ("masked_accuracy" in est) != generative
        # bits per byte ranks only contenders trained to continue text
        assert est.get("bpb", {"ranked": True})["ranked"] == (c["objective"] != "span")
        assert c["train_flops"] == c["steps"] * c["flops_per_step"] > 0  # a tokens budget: FLOPs reported beside
        assert c["tokens_seen"] <= 12_000
    moe = next(c for c in summary["contenders"] if c["name"] == "decoder+switch")
    layer = moe["routing_seed0"]["layers"][0]
    assert len(layer["experts"]) == 8 and layer["mi_token_shuffled_bits"] >= 0
    assert 0 < summary["baselines"]["bpb"]["value"] < 8
    assert summary["baselines"]["mc_k0"]["value"] == pytest.approx(0.25)
    assert summary["baselines"]["task:sections"]["name"] == "majority class"


def test_the_report_states_why_a_metric_does_not_apply_and_computes_its_claims(full_run):
    out = full_run["out"]
    md = (out / "report.md").read_text()
    assert "n/a (an encoder cannot score text left to right)" in md and "n/a (not an encoder)" in md
    assert "trained for span, not for continuing text" in md
    claims = {}
    for c in full_run["summary"]["claims"]:
        claims.setdefault(c["claim"], []).append(c)
    assert set(claims) == {
        "understanding tasks favour the encoder",
        "generation favours the decoder",
        "encoder-decoders suit translation",
        "MoE reaches lower loss than dense at equal FLOPs",
        "load balancing lowers expert-load CV",
    }
    for rows in claims.values():
        for c in rows:
            assert c["verdict"] in ("confirmed", "contradicted", "tie", "undetermined", "not measured")
            if c["verdict"] in ("confirmed", "contradicted"):  # never from a contender below its baseline
                assert all(d["high"] < 0 or d["low"] > 0 for d in c["against_baseline"].values())
    (translation,) = claims["encoder-decoders suit translation"]
    assert translation["verdict"] == "not measured" and "seq2seq" in translation["why"]
    (generation,) = claims["generation favours the decoder"]
    assert generation["b"] in ("encoder-decoder", "prefix-lm")  # never the span-corruption contender
    assert claims["load balancing lowers expert-load CV"][0]["verdict"] != "not measured"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "http://" not in page and "https://" not in page
    saved = json.loads((out / "results.json").read_text())
    assert saved["machine"]["torch"] == torch.__version__ and saved["settings"]["seeds"] == 2


def test_rerunning_the_same_command_skips_what_is_finished(full_run):
    from lmlab.compare import compare

    events = []
    again = compare(full_run["cc"], lambda kind, info: events.append((kind, info)))
    units = [i for k, i in events if k == "unit"]
    assert units and all(i["status"] == "done (kept)" for i in units)
    assert _strip_timings(again) == _strip_timings(full_run["summary"])


def test_a_units_result_is_one_typed_record_shared_with_the_report(full_run):
    """Every unit's result.json reads back as a UnitResult and writes out unchanged; a field that does
    not fit the schema is named."""
    from lmlab.compare.results import Intrinsic, UnitResult

    paths = sorted(Path(full_run["cc"].out).glob("runs/*/seed*/result.json"))
    assert paths
    for path in paths:
        data = json.loads(path.read_text())
        r = UnitResult.from_dict(data, str(path))
        assert isinstance(r.intrinsic, Intrinsic) and r.to_dict() == data
        assert (r.intrinsic.bpb is None) == (r.samples is None)  # generative contenders: bits per byte and samples
        assert set(r.evidence) >= {"mc_k0", "mc_k3"} and r.pretrain.steps > 0
    bad = json.loads(paths[0].read_text())
    bad["pretrain"]["steps"] = "many"
    with pytest.raises(lmlab.ConfigError, match=r"result.json.pretrain.steps: expected int, got 'many'"):
        UnitResult.from_dict(bad, str(paths[0]))
    bad = {**json.loads(paths[0].read_text()), "bits": 1.0}
    with pytest.raises(lmlab.ConfigError, match="unknown field.* bits"):
        UnitResult.from_dict(bad, "r")
    del bad["bits"], bad["fewshot"]
    with pytest.raises(lmlab.ConfigError, match=r"r.fewshot: missing"):
        UnitResult.from_dict(bad, "r")


def test_the_same_command_twice_gives_the_same_results(tmp_path, kjv_lines):
    # every family: the encoder's masking and the prefix objectives' split points draw randomness
    kw = dict(data=[str(kjv_lines)], moe=["none"], seeds=1)
    kw["budget"] = "tokens"
    kw.update(budget_value=12_000, tasks=[], val_fraction=0.1)
    _run(tmp_path / "a", **kw)
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    shutil.rmtree(tmp_path / "a")  # nothing kept: every unit runs again
    _run(tmp_path / "a", **kw)
    second = json.loads((tmp_path / "a" / "results.json").read_text())
    assert _strip_timings(first) == _strip_timings(second)
    assert len(first["contenders"]) == 4 and first["contenders"][0]["runs"][0]["pretrain"]["curve"]  # losses too


def test_a_comparison_moved_to_another_folder_resumes_there(tmp_path, kjv_lines):
    """The fingerprint knows the task files by content: the built-in ones live in the output folder, which a
    user may move (to shared storage for --ray) and resume from."""
    rows = [f"{v}\t{'law' if i < 400 else 'later'}" for i, v in enumerate(kjv_lines.read_text().splitlines())][::8]
    task = tmp_path / "sections.tsv"
    task.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    kw = dict(data=[str(kjv_lines)], families=["decoder"], seeds=1, budget="tokens", budget_value=8_000)
    kw.update(tasks=[str(task)], val_fraction=0.1, max_task_examples=30)
    first = _run(tmp_path / "a", **kw)
    shutil.move(tmp_path / "a", tmp_path / "b")
    events = []
    from lmlab.compare import compare

    settings = dict(TINY, out=str(tmp_path / "b"), eval_windows=8, questions=12, samples=2, **kw)
    moved = compare(CompareConfig(**settings), lambda kind, info: events.append((kind, info)))
    assert [i["status"] for k, i in events if k == "unit"] == ["done (kept)"]
    assert moved["contenders"][0]["runs"] == first["contenders"][0]["runs"]


def test_contenders_that_learned_nothing_get_no_verdict(tmp_path, kjv_lines):
    """Learning rate ~0: every contender stays at its initialisation, and no claim is confirmed or
    contradicted; the generation claim names the decoder as not above its baseline."""
    summary = _run(
        tmp_path,
        data=[str(kjv_lines)],
        families=["decoder", "prefix-lm"],
        moe=["none"],
        seeds=1,
        lr=1e-9,  # the trainer refuses 0: this one learns nothing either
        budget="tokens",
        budget_value=6_000,
        tasks=[],
        val_fraction=0.1,
    )
    verdicts = {c["claim"]: c for c in summary["claims"]}
    generation = verdicts["generation favours the decoder"]
    assert generation["verdict"] == "undetermined"
    assert "decoder is not above its baseline (Kneser-Ney trigram)" in generation["why"]
    assert all(c["verdict"] in ("undetermined", "not measured") for c in summary["claims"])
    for c in summary["contenders"]:
        assert c["estimates"]["bpb"]["beats_baseline"] is False
        assert c["estimates"]["mc_k0"]["beats_baseline"] is False


def test_the_html_report_escapes_what_it_shows(full_run):
    from lmlab.compare.report import to_html

    summary = dict(full_run["summary"], notes=["<script>alert(1)</script>"])
    page = to_html(summary, {})
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_report_renders_in_headless_chromium(full_run, tmp_path):
    """Every image of report.html loads in Debian's chromium (through selenium); a screenshot is taken."""
    from conftest import headless_chromium

    browser = headless_chromium()
    try:
        browser.get((full_run["out"] / "report.html").resolve().as_uri())
        images = browser.find_elements("tag name", "img")
        assert len(images) == 2
        for img in images:
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
        assert "Claims" in browser.find_element("tag name", "body").text
        assert browser.save_screenshot(str(tmp_path / "report.png"))
    finally:
        browser.quit()


# ---- bad input -----------------------------------------------------------------------------------
def test_unknown_families_and_variants_are_refused(tmp_path):
    with pytest.raises(lmlab.LmlabError, match="unknown family 'gpt'"):
        _run(tmp_path, families=["gpt"])
    with pytest.raises(lmlab.LmlabError, match="unknown MoE variant 'mixture'"):
        _run(tmp_path, moe=["mixture"])
    assert main(["compare", "--out", str(tmp_path), "--budget", "parsecs", "3"]) == 2


def test_a_budget_too_small_names_the_smallest_useful_one(tmp_path, kjv_lines):
    with pytest.raises(lmlab.LmlabError, match=r"the smallest useful budget is [0-9.e+]+ training FLOPs"):
        _run(tmp_path, data=[str(kjv_lines)], budget="flops", budget_value=1e6, val_fraction=0.1)


def test_a_corpus_too_small_for_the_held_out_split_is_a_clear_error(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("\n".join(f"line {i} of a very small corpus" for i in range(40)) + "\n")
    with pytest.raises(lmlab.LmlabError, match="held-out split .* is smaller than"):
        _run(tmp_path / "out", data=[str(small)], vocab_size=400)


def test_a_task_a_family_cannot_do_is_skipped_with_the_reason(tmp_path, kjv_lines):
    pairs = tmp_path / "pairs.jsonl"
    lines = kjv_lines.read_text().splitlines()[:120]
    pairs.write_text("".join(json.dumps({"source": a, "target": a.upper()}) + "\n" for a in lines))
    summary = _run(
        tmp_path / "out",
        data=[str(kjv_lines)],
        families=["encoder", "decoder"],
        moe=["none"],
        seeds=1,
        budget="tokens",
        budget_value=12_000,
        tasks=[str(pairs)],
        val_fraction=0.1,
    )
    enc = next(c for c in summary["contenders"] if c["name"] == "encoder")
    assert enc["tasks"]["pairs"] == {"skipped": "encoder models cannot be fine-tuned for seq2seq"}
    dec = next(c for c in summary["contenders"] if c["name"] == "decoder")
    assert "chrf" in dec["tasks"]["pairs"] and "bleu" in dec["tasks"]["pairs"]
    assert "skipped: encoder models cannot be fine-tuned for seq2seq" in (tmp_path / "out" / "report.md").read_text()


def test_the_builtin_tasks_are_real_read_by_the_task_readers_and_limited(tmp_path):
    from lmlab.compare.lab import build_tasks
    from lmlab.tasks.classify import read_table
    from lmlab.tasks.ner import read_conll
    from lmlab.tasks.qa import read_squad

    cc = CompareConfig(out=str(tmp_path), max_task_examples=50)
    tasks, notes = build_tasks(cc, tmp_path, builtin_corpus="kjv")
    assert [(t["name"], t["task"]) for t in tasks] == [
        ("kjv-sections", "classify"),
        ("kjv-italics", "ner"),
        ("nave-qa", "qa"),
    ] and not notes
    by = {t["name"]: t for t in tasks}
    assert len(read_table(by["kjv-sections"]["train"])[0]) == 50
    train, test = read_conll(by["kjv-italics"]["train"]), read_conll(by["kjv-italics"]["eval"])
    assert len(train) == 50 and len(test) == 800  # eval is never cut
    tags = [t for ex in test for t in ex.label]
    assert set(tags) == {"O", "B-ADDED", "I-ADDED"} and 0.01 < tags.count("B-ADDED") / len(tags) < 0.1
    # "and darkness *was* upon the face of the deep" is the kind of word the translators supplied
    full = read_conll(by["kjv-italics"]["train_full"])
    added = [w.lower() for ex in full for w, t in zip(ex.words, ex.label) if t == "B-ADDED"]
    assert {"was", "is", "are"} & set(added)
    qa = read_squad(by["nave-qa"]["eval"])
    assert len(read_squad(by["nave-qa"]["train"])) == 50 and len(qa) > 400
    for ex in qa:
        ((text, start),) = ex.answers
        assert ex.context[start : start + len(text)] == text and text[0].isupper()
    # the verse names more than one person or place: the first capitalised name is often not the answer
    assert sum(ex.context.split(" ")[0] != ex.answers[0][0] for ex in qa) > len(qa) / 2
    # another corpus: the built-in tasks are left out, with the reason
    tasks, notes = build_tasks(cc, tmp_path / "other", builtin_corpus=None)
    assert tasks == [] and "built-in corpora" in notes[0]


def test_understanding_claims_cover_every_classification_tagging_and_qa_task():
    from lmlab.compare.report import Evidences, claims

    rng = np.random.default_rng(0)

    def ev(p, n=300):  # per-example 0/1 outcomes, right with probability p, two seeds
        return [_evidence((rng.random(n) < p).astype(float))[0] for _ in range(2)]

    def row(family, tasks):
        runs = [{"evidence": {f"task:{t}": e[s] for t, e in tasks.items()}} for s in range(2)]
        return {"name": family, "family": family, "moe": None, "dense_twin": None, "objective": "x"}, runs

    base = {f"task:{t}": {"majority class": _evidence(np.full(300, 0.3))[0]} for t in "ctq"}
    summary = {
        "tasks": [{"name": "c", "task": "classify"}, {"name": "t", "task": "ner"}, {"name": "q", "task": "qa"}],
        "contenders": [],
    }
    for family, tasks in (
        ("encoder", {"c": ev(0.8), "t": ev(0.6), "q": ev(0.3)}),
        ("decoder", {"c": ev(0.5), "t": ev(0.6), "q": ev(0.7)}),
    ):
        c, runs = row(family, tasks)
        summary["contenders"].append({**c, "runs": runs, "default_objective": True, "language_model": True})
    rows = [c for c in claims(summary, Evidences(summary["contenders"], base, summary["tasks"]))]
    assert [(c.metric.split()[0], c.verdict) for c in rows if c.claim.startswith("understanding")] == [
        ("c", "confirmed"),
        ("t", "tie"),
        ("q", "undetermined"),  # the encoder is at the baseline's 0.3
    ]


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_compare_nproc_pretrains_each_contender_on_two_processes_as_on_one(tmp_path, kjv_lines, parallel):
    """`--nproc 2`: every unit pre-trains under torchrun with the same global batch, so the curves are
    one process's (a Switch MoE's load balancing counts both ranks' tokens); rank 0 then measures."""
    from lmlab.compare.launch import unit_command

    moe = ["switch"] if parallel == "fsdp" else ["none"]  # the two-process MoE runs of test_distributed cover ddp's
    kw = dict(data=[str(kjv_lines)], families=["decoder"], moe=moe, seeds=1, budget="tokens")
    kw.update(budget_value=8_000, tasks=[], val_fraction=0.1, precision="fp32")  # see test_distributed._config
    one = _run(tmp_path / "one", **kw)
    two = _run(tmp_path / "two", nproc=2, parallel=parallel, **kw)
    assert [c["name"] for c in two["contenders"]] == ["decoder"] + ["decoder+switch"] * (parallel == "fsdp")
    for a, b in zip(one["contenders"], two["contenders"]):
        ra, rb = a["runs"][0], b["runs"][0]
        assert rb["pretrain"]["processes"] == 2 and rb["pretrain"]["parallel"] == parallel
        assert ra["pretrain"]["processes"] == 1
        assert ra["pretrain"]["precision"] == rb["pretrain"]["precision"] == "fp32"  # as asked, on any CPU
        losses_a = [row[-1] for row in ra["pretrain"]["curve"]]
        losses_b = [row[-1] for row in rb["pretrain"]["curve"]]
        assert len(losses_b) == len(losses_a) >= 2
        assert losses_b == pytest.approx(losses_a, abs=1e-5, rel=0)
        assert rb["intrinsic"]["bpb"] == pytest.approx(ra["intrinsic"]["bpb"], abs=1e-4)
    log = (tmp_path / "two" / "runs" / "decoder" / "seed0" / "unit.log").read_text()
    assert "Traceback" not in log
    spec = json.loads((tmp_path / "two" / "runs" / "decoder" / "seed0" / "spec.json").read_text())
    command = unit_command(spec, Path("spec.json"))
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def test_compare_nproc_must_divide_the_batch():
    with pytest.raises(lmlab.errors.ConfigError, match="--batch-size 8 .* does not divide among --nproc 3"):
        CompareConfig(nproc=3, **TINY).validate()


def test_compile_is_on_off_or_auto_and_auto_needs_a_compiler(monkeypatch):
    import shutil

    from lmlab.runtime import can_compile

    with pytest.raises(lmlab.errors.ConfigError, match="--compile 'yes' is unknown; expected auto, on or off"):
        CompareConfig(compile="yes", **TINY).validate()
    from lmlab.compare.unit import compiles
    from lmlab.data.objectives import BertMLMNSP, CausalLM, PrefixSeq2Seq, RobertaMLM

    monkeypatch.setattr(shutil, "which", lambda name: None)  # the path without a C++ compiler
    assert not can_compile("cpu") and can_compile("cuda")
    assert not compiles("auto", CausalLM, "cpu") and compiles("on", CausalLM, "cpu")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    assert can_compile("cpu")
    # auto: where the compiled step wins, objectives that label most positions; masked LMs run eager
    assert compiles("auto", CausalLM, "cpu") and compiles("auto", PrefixSeq2Seq, "cpu")
    assert not compiles("auto", RobertaMLM, "cpu") and not compiles("auto", BertMLMNSP, "cpu")
    assert not compiles("off", CausalLM, "cpu")


def test_questions_are_cut_at_words_or_at_characters_where_a_script_has_no_spaces():
    from lmlab.compare.measure import text_units

    units = [u.group() for u in text_units("兰叶春葳蕤，桂华秋皎洁。And God said, Let")]
    assert units[:6] == ["兰", "叶", "春", "葳", "蕤", "，"] and units[-4:] == ["And", "God", "said,", "Let"]


@pytest.mark.slow  # 40 s; the Chinese tokenizer and units are tested above, the measurements on kjv
def test_compare_runs_on_the_builtin_chinese_corpus_with_every_measurement(tmp_path):
    """`lmlab compare --data zh`: questions cut at characters, the zh-poets task, every estimate."""
    summary = _run(
        tmp_path / "zh",
        data=["zh"],
        quick=True,
        families=["encoder", "decoder"],
        moe=["none"],
        seeds=1,
        budget="tokens",
        budget_value=8_000,
        questions=400,
        eval_windows=64,
        seq_len=48,
        vocab_size=1200,
    )
    questions = [json.loads(q) for q in (tmp_path / "zh" / "questions.jsonl").read_text().splitlines()]
    assert len(questions) >= 100 and all(len(q["choices"]) == 4 for q in questions)
    assert all(" " not in q["choices"][q["gold"]] for q in questions[:20])  # Chinese: no words to cut at
    assert [t["name"] for t in summary["tasks"]] == ["zh-poets"]
    for c in summary["contenders"]:
        keys = {"mc_k0", "mc_k3", "task:zh-poets", "bpb" if c["family"] == "decoder" else "masked_accuracy"}
        assert keys <= set(c["estimates"]), c["name"]
    assert summary["baselines"]["task:zh-poets"]["name"] == "majority class"


def test_an_encoder_decoder_is_scored_in_the_form_of_its_objective(shared_tok):
    """prefix-seq2seq: the encoder reads the context and </s>, the decoder continues it; the summed
    log-likelihood is minus the model's own loss on that example, and differs from the span form."""
    from lmlab.fewshot import loglikelihood
    from lmlab.model import Model
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_tok)
    cc = CompareConfig(**TINY)
    torch.manual_seed(0)
    model = Model(model_config(cc, Contender("encoder-decoder", "encoder-decoder", None, "prefix-seq2seq"), tok)).eval()
    context, continuation = "In the beginning God created", " the heaven and the earth"
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(continuation, add_special_tokens=False)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ctx + [tok.eos_id]]), labels=torch.tensor([cont])).loss
    got = loglikelihood(model, tok, context, continuation, seq2seq_form="prefix")
    assert got == pytest.approx(-float(loss) * len(cont), rel=1e-4)
    assert loglikelihood(model, tok, context, continuation, seq2seq_form="span") != pytest.approx(got, rel=1e-3)


# ---- profiles and plans --------------------------------------------------------------------------------------
def test_a_profile_sets_shapes_and_budget_under_what_is_given(tmp_path):
    from lmlab.compare.settings import PROFILES

    gpu = CompareConfig.from_dict({"profile": "gpu", "seeds": 1})
    assert (gpu.d_model, gpu.n_layers, gpu.n_heads, gpu.d_ff, gpu.seq_len) == (768, 12, 12, 3072, 1024)
    assert gpu.budget_value == 6e16 and gpu.seeds == 1  # the given setting stands over the profile's
    cluster = CompareConfig.from_dict({"profile": "cluster"})
    assert cluster.budget_value == 10 * gpu.budget_value and cluster.d_model == gpu.d_model
    assert CompareConfig.from_dict({"profile": "cpu"}).to_dict() == {**CompareConfig().to_dict(), "profile": "cpu"}
    assert gpu.fingerprint() != CompareConfig().fingerprint()
    for p in PROFILES.values():
        assert p.machine and p.wall_time and p.settles
    with pytest.raises(lmlab.ConfigError, match="profile 'tpu' is unknown"):
        CompareConfig.from_dict({"profile": "tpu"})
    with pytest.raises(SystemExit):  # argparse's choices
        main(["compare", "--profile", "tpu"])


def test_plan_only_prints_each_contenders_steps_and_trains_nothing(tmp_path, kjv_lines, capsys):
    out = tmp_path / "plan"
    flags = [
        "--out",
        str(out),
        "--data",
        str(kjv_lines),
        "--profile",
        "gpu",
        "--n-layers",
        "2",
        "--vocab-size",
        "600",
        "--val-fraction",
        "0.5",
    ]
    assert (
        main(["compare", *flags, "--families", "decoder", "encoder", "--budget", "flops", "1e14", "--plan-only"]) == 0
    )
    plan = json.loads((out / "plan.json").read_text())
    assert [r["contender"] for r in plan["plan"]] == ["decoder", "encoder"]
    for r in plan["plan"]:
        assert r["steps"] == int(1e14 // r["flops_per_step"]) and r["train_flops"] <= 1e14
        assert r["passes"] == pytest.approx(r["tokens"] / plan["train_tokens"])
        assert r["tokens"] == r["steps"] * 32 * 1024  # the gpu profile's batch of 32 windows of 1,024
    assert not (out / "runs").exists() and not (out / "results.json").exists()
    printed = capsys.readouterr().out
    assert str(out / "plan.json") in printed.replace("\n", "") and f"{plan['plan'][0]['steps']:,}" in printed
