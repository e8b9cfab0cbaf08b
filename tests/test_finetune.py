"""Fine-tuning: classification (GLUE-style TSV) and NER (CoNLL) on tiny models learn a planted signal;
predictions come back as JSONL; bad files fail with file and line."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import TINY_WORDS as WORDS

import lmlab
from lmlab.cli import main
from lmlab.finetune import FinetuneConfig, finetune, predict, read_table


def _sst_like(path, n, seed):
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choices(WORDS, k=6)
        words.insert(rng.randrange(7), "good" if label else "bad")  # the planted signal
        lines.append(" ".join(words) + f"\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _conll(path, n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        for w in rng.choices(WORDS + ["Moses", "Aaron", "Egypt"], k=8):
            tag = "B-PER" if w in ("Moses", "Aaron") else ("B-LOC" if w == "Egypt" else "O")
            out.append(f"{w} X {tag}")
        out.append("")
    path.write_text("\n".join(out))
    return path


@pytest.mark.parametrize("family", ["bert", "gpt", "t5", "prefix"])
def test_classification_learns_the_planted_word_and_predicts(family, tiny_pretrained, tmp_path):
    train, dev = _sst_like(tmp_path / "train.tsv", 300, 0), _sst_like(tmp_path / "dev.tsv", 100, 1)
    out = tmp_path / "cls"
    result = finetune(
        FinetuneConfig(
            task="classify",
            model=str(tiny_pretrained[family]),
            train=str(train),
            eval=str(dev),
            out=str(out),
            epochs=3,
            lr=2e-3,
            batch_size=16,
            max_len=32,
        )
    )
    assert result["eval"]["accuracy"] >= 0.9 and {"macro_f1", "mcc", "loss"} <= set(result["eval"])
    assert json.loads((out / "eval_results.json").read_text())["eval"]["accuracy"] == result["eval"]["accuracy"]
    model = lmlab.load(out)
    assert model.config.heads == ("classify",) and model.config.labels == ["0", "1"]
    assert model.config.classifier_pooling == ("cls" if family == "bert" else "last")
    preds = predict(str(out), str(dev))
    assert len(preds) == 100 and all(p["label"] in ("0", "1") for p in preds)
    gold = [line.split("\t")[1] for line in dev.read_text().splitlines()[1:]]
    assert sum(p["label"] == g for p, g in zip(preds, gold)) / 100 == pytest.approx(result["eval"]["accuracy"])


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_ner_learns_names_and_places(family, tiny_pretrained, tmp_path):
    train, dev = _conll(tmp_path / "train.conll", 200, 0), _conll(tmp_path / "dev.conll", 60, 1)
    out = tmp_path / "ner"
    assert (
        main(
            [
                "finetune",
                "--task",
                "ner",
                "--model",
                str(tiny_pretrained[family]),
                "--train",
                str(train),
                "--eval",
                str(dev),
                "--out",
                str(out),
                "--epochs",
                "3",
                "--lr",
                "3e-3",
                "--max-len",
                "32",
            ]
        )
        == 0
    )
    result = json.loads((out / "eval_results.json").read_text())
    assert result["eval"]["f1"] >= 0.9 and result["labels"] == ["B-LOC", "B-PER", "O"]
    evidence = result["eval"]["evidence"]  # per sentence: 2 x true positives over predicted + gold entities
    assert len(evidence["ids"]) == 60 and sum(evidence["num"]) / sum(evidence["den"]) == pytest.approx(
        result["eval"]["f1"]
    )
    assert main(["predict", "--model", str(out), "--data", str(dev), "--out", str(tmp_path / "p.jsonl")]) == 0
    first = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert len(first["tokens"]) == len(first["tags"]) == 8


def test_bad_files_name_file_and_line(tiny_pretrained, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine text\t1\nthree\tcolumns\there\n")
    with pytest.raises(lmlab.LmlabError, match=r"bad.tsv:3: 3 columns, but the header has 2"):
        read_table(bad)
    train = _sst_like(tmp_path / "train.tsv", 40, 0)
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\nthe land\t7\n")
    with pytest.raises(lmlab.LmlabError, match=r"dev.tsv:2: label '7' is not one of the training labels"):
        finetune(
            FinetuneConfig(
                task="classify",
                model=str(tiny_pretrained["bert"]),
                train=str(train),
                eval=str(dev),
                out=str(tmp_path / "x"),
                epochs=1,
                max_len=32,
            )
        )
    assert main(["predict", "--model", str(tiny_pretrained["bert"]), "--data", str(dev)]) == 2


def _squad(path, n, seed, impossible=0.0):
    rng = random.Random(seed)
    paragraphs = []
    for k in range(n):
        filler = " ".join(rng.choices(WORDS, k=rng.randint(3, 20)))
        place = rng.choice(["Egypt", "Canaan", "Jordan", "Bethel"])
        if rng.random() < impossible:
            context, answers = f"{filler} . Moses stayed home . {filler}", []
        else:
            context = f"{filler} . Moses went to {place} . {filler}"
            answers = [{"text": place, "answer_start": context.index(" to ") + 4}]
        paragraphs.append(
            {
                "context": context,
                "qas": [
                    {
                        "id": f"q{k}",
                        "question": "where did Moses go ?",
                        "answers": answers,
                        "is_impossible": not answers,
                    }
                ],
            }
        )
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_qa_learns_to_point_at_the_answer_across_windows(family, tiny_pretrained, tmp_path):
    train, dev = _squad(tmp_path / "train.json", 300, 0, 0.2), _squad(tmp_path / "dev.json", 60, 1, 0.2)
    out = tmp_path / "qa"
    # the tiny T5's Unigram vocabulary is nearly character-level: longer windows for the same text.
    # T5 at lr 3e-3 sits on an edge (exact match 70-100 over 3 inits x 2 seeds, 26.7 on an Intel Xeon);
    # at 1e-3 all six runs reached 100 (docs/benchmarks.md, "T5 extractive QA")
    max_len, stride, lr = (24, 8, 3e-3) if family == "bert" else (64, 16, 1e-3)
    result = finetune(
        FinetuneConfig(
            task="qa",
            model=str(tiny_pretrained[family]),
            train=str(train),
            eval=str(dev),
            out=str(out),
            epochs=4 if family == "bert" else 8,
            lr=lr,
            batch_size=16,
            max_len=max_len,
            doc_stride=stride,
        )
    )
    assert result["eval"]["exact_match"] >= 80 and result["eval"]["f1"] >= result["eval"]["exact_match"]
    preds = {p["id"]: p["answer"] for p in predict(str(out), str(dev))}
    gold = {
        q["id"]: [a["text"] for a in q["answers"]]
        for p in json.loads(dev.read_text())["data"][0]["paragraphs"]
        for q in p["qas"]
    }
    from lmlab import metrics

    assert metrics.squad_scores(preds, gold)["exact_match"] == pytest.approx(result["eval"]["exact_match"])


def test_squad_answer_that_does_not_match_its_offset_is_refused(tmp_path):
    from lmlab.tasks.qa import read_squad

    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "data": [
                    {
                        "paragraphs": [
                            {
                                "context": "Moses went to Egypt",
                                "qas": [
                                    {
                                        "id": "q7",
                                        "question": "where?",
                                        "answers": [{"text": "Egypt", "answer_start": 3}],
                                    }
                                ],
                            }
                        ]
                    }
                ]
            }
        )
    )
    with pytest.raises(lmlab.LmlabError, match=r"question q7: answer 'Egypt' does not match the context at offset 3"):
        read_squad(bad)


def test_few_shot_scoring_sums_choice_log_probabilities(tiny_pretrained, tmp_path, capsys):
    """The score of a choice is the summed log-probability of its continuation tokens (target delimiter
    " " + choice, encoded jointly with the prompt as lm-eval does), checked against a direct forward
    pass; `lmlab eval --task` reports accuracy against chance."""
    import torch.nn.functional as F

    from lmlab.fewshot import choice_logprobs, encode_pair, evaluate_task
    from lmlab.tokenizer import load_tokenizer

    folder = str(tiny_pretrained["gpt"])
    model, tok = lmlab.load(folder), load_tokenizer(folder)
    prompt, choices = "the lord said unto", ["Moses", "the land"]
    got = choice_logprobs(model, tok, prompt, choices)
    for choice, score in zip(choices, got):
        ctx, cont = encode_pair(tok, prompt, " " + choice)
        x = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = F.log_softmax(model(input_ids=x).logits[0].float(), -1)
        assert score == pytest.approx(sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)), abs=1e-4)
    task = tmp_path / "task.jsonl"
    task.write_text(
        "\n".join(
            json.dumps({"query": f"q{i}: the", "choices": ["land", "river", "king"], "gold": i % 3}) for i in range(12)
        )
    )
    r = evaluate_task(folder, str(task), shots=2)
    assert r["questions"] == 12 and r["chance"] == pytest.approx(1 / 3) and 0 <= r["accuracy"] <= 1
    assert main(["eval", "--model", folder, "--task", str(task), "--shots", "1", "--limit", "4"]) == 0
    assert "1-shot, 4 questions" in " ".join(capsys.readouterr().out.split())  # at any terminal width
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "x", "choices": ["a", "b"], "gold": "c"}\n')
    with pytest.raises(lmlab.LmlabError, match=r"bad.jsonl:1: gold 'c' is not one of the choices"):
        evaluate_task(folder, str(bad))


def test_pairs_are_encoded_as_lm_eval_encodes_them(tiny_pretrained):
    """lm-eval's _encode_pair: a context's trailing spaces move onto the continuation and the pair is
    encoded jointly, so 'were ' + 'thy' gives the tokens of ' thy', not ' ' then 'thy'; an empty
    context is the end-of-text token alone."""
    from lmlab.fewshot import encode_pair
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_pretrained["gpt"])
    ctx, cont = encode_pair(tok, "the lord said ", "unto")
    assert ctx == tok.encode("the lord said", add_special_tokens=False)
    assert ctx + cont == tok.encode("the lord said unto", add_special_tokens=False)
    assert tok.token(cont[0]).startswith("Ġ")  # the space travelled with the word
    naive = tok.encode("the lord said ", add_special_tokens=False)
    assert naive != ctx  # encoded apart, the trailing space is a token of its own (what lmlab did before)
    assert encode_pair(tok, "", "unto") == ([tok.bos_id], tok.encode("unto", add_special_tokens=False))


def test_long_requests_keep_lm_evals_window():
    """(context + continuation)[-(max_len + 1):][:-1]: max_len tokens in, the continuation never cut."""
    from lmlab.fewshot import window

    w = window(list(range(10)), [10, 11, 12], max_len=8)
    assert w.inputs == list(range(4, 12))  # the last 9 of 0..12, all but the last
    w = window(list(range(20)), [20, 21, 22], max_len=8)
    assert w.inputs == list(range(14, 22))
    assert w.context_in_inputs == 6  # 14..19: the context tokens the model still reads
    w = window([1, 2], [3], max_len=8)
    assert w.inputs == [1, 2] and w.context_in_inputs == 2  # short requests are not cut
    with pytest.raises(lmlab.LmlabError, match="does not fit"):
        window([1, 2], list(range(9)), max_len=8)


def test_acc_norm_divides_by_the_choice_without_the_delimiter(monkeypatch):
    """acc picks the best summed log-likelihood; acc_norm the best per character of the choice alone
    (lm-eval's completion_len = len(choice)), here a case where counting the delimiter flips it."""
    import lmlab.fewshot as fs

    scores = {" ab": -2.0, " abcdef": -5.0}
    monkeypatch.setattr(fs, "loglikelihood", lambda model, tok, ctx, cont, form="span": scores[cont])

    class Stub:
        class config:
            class spec:
                has_decoder = True

    items = [{"query": "q", "choices": ["ab", "abcdef"], "gold": 1}] * 2
    r = fs.score_items(Stub(), None, items)
    assert r["accuracy"] == 0.0  # -2 beats -5
    assert r["accuracy_norm"] == 1.0  # -5/6 beats -2/2 (with the space: -2/3 would beat -5/7)
    assert fs.fewshot_prompt([{"query": "q1", "choices": ["a", "b"], "gold": 1}], "q2") == "q1 b\n\nq2"


def test_every_family_scores_multiple_choice(tiny_pretrained, tmp_path):
    """Decoders, prefix-LMs, encoder-decoders (the span after a sentinel) and encoders
    (pseudo-log-likelihood) all give finite choice scores; the method is named."""
    from lmlab.fewshot import evaluate_task

    task = tmp_path / "task.jsonl"
    task.write_text(
        "\n".join(
            json.dumps({"query": f"q{i}: the", "choices": ["land", "river", "king"], "gold": i % 3}) for i in range(6)
        )
    )
    for name in ("gpt", "prefix", "t5", "bert"):
        r = evaluate_task(str(tiny_pretrained[name]), str(task), shots=1)
        assert r["questions"] == 6 and 0 <= r["accuracy"] <= 1
        assert r["method"] == ("pseudo-log-likelihood" if name == "bert" else "log-likelihood")


# ---- the real formats, as tiny fixtures -----------------------------------------------------------
FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def test_glue_files_are_read_as_they_come():
    from lmlab.tasks.classify import is_regression

    sst, cols, label = read_table(FIXTURES / "sst2_tiny.tsv")
    assert cols == ["sentence"] and label == "label" and [e.label for e in sst] == ["1", "0", "1"]
    mrpc, cols, label = read_table(FIXTURES / "mrpc_tiny.tsv")
    assert cols == ["#1 String", "#2 String"] and label == "Quality"
    assert mrpc[0].texts == ["The river rose after the storm .", "After the storm the river rose ."]
    sts, cols, label = read_table(FIXTURES / "stsb_tiny.tsv")
    assert cols == ["sentence1", "sentence2"] and label == "score" and is_regression([e.label for e in sts])


def test_conll_and_squad_fixtures(tiny_pretrained):
    from lmlab.io import load
    from lmlab.tasks.ner import encode_tagging, read_conll
    from lmlab.tasks.qa import encode_qa, read_squad
    from lmlab.tokenizer import load_tokenizer

    sentences = read_conll(FIXTURES / "conll2003_tiny.txt")
    assert [s.words for s in sentences][1] == ["The", "Holy", "Council", "met"]
    assert sentences[0].label == ["B-PER", "O", "O", "B-LOC", "I-LOC", "O"]
    model, tok = load(tiny_pretrained["bert"]), load_tokenizer(tiny_pretrained["bert"])
    rows, firsts = encode_tagging(
        sentences,
        tok,
        model.config,
        32,
        {t: i for i, t in enumerate(["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "O"])},
    )
    labelled = [int((r["labels"] != -100).sum()) for r in rows]
    assert labelled == [6, 4]  # one label per word, on its first sub-word
    assert all(rows[k]["labels"][p] != -100 for k in range(2) for p in firsts[k])
    qa = read_squad(FIXTURES / "squad_v2_tiny.json")
    assert qa[0].answers[0] == ("into the Dead Sea", 29) and qa[1].impossible and qa[1].answers == []
    windows, meta = encode_qa(qa, tok, model.config, max_len=32, doc_stride=8)
    assert len([m for m in meta if m["example"] == 0]) > 1  # a long context becomes overlapping windows
    for row, m in zip(windows, meta):
        s, e = row["start_positions"], row["end_positions"]
        if s:  # a window holding the answer points at its tokens; the text is recovered through the offsets
            text = qa[m["example"]].context[m["offsets"][s - m["first"]][0] : m["offsets"][e - m["first"]][1]]
            assert text.lower() == "into the dead sea"
    assert any(row["start_positions"] > 0 for row in windows)  # some window does hold the answer
    assert all(row["start_positions"] == 0 for row, m in zip(windows, meta) if m["example"] == 1)


def test_classification_pooling_can_be_chosen(tiny_pretrained):
    from lmlab.finetune import task_model

    base = lmlab.load(tiny_pretrained["bert"])
    default = task_model(base, "classify", ["a", "b"])
    assert default.config.classifier_pooling == "cls" and default.pooler is not None
    mean = task_model(base, "classify", ["a", "b"], pooling="mean")
    assert mean.config.classifier_pooling == "mean" and mean.pooler is None
    x = torch.randint(5, 50, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        h = mean(input_ids=x, attention_mask=mask).last_hidden_state
        expected = torch.stack([h[0].mean(0), h[1, :4].mean(0)])
        assert torch.allclose(mean(input_ids=x, attention_mask=mask).logits, mean.classifier(expected), atol=1e-5)


def test_a_task_head_beside_a_vocabulary_head_is_refused():
    """The classifier and the LM head would both write `logits`: a config with both is refused."""
    with pytest.raises(lmlab.ConfigError, match="a task head .classify. writes the same logits"):
        lmlab.preset("gpt2-tiny", heads=("lm", "classify"))
    with pytest.raises(lmlab.ConfigError, match="at most one task head"):
        lmlab.preset("bert-tiny", heads=("tag", "span"), pooler=False)


def test_every_registered_task_names_its_head_and_formats():
    from lmlab.tasks import TASK_NAMES, all_tasks

    tasks = all_tasks()
    assert set(TASK_NAMES) == set(tasks) == {"classify", "ner", "qa", "seq2seq", "chat"}
    assert {t.head for t in tasks.values()} == {"classify", "tag", "span", "lm"} and all(
        t.formats for t in tasks.values()
    )
