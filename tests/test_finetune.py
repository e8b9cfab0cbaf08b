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


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_classification_learns_the_planted_word_and_predicts(family, tiny_pretrained, tmp_path):
    train, dev = _sst_like(tmp_path / "train.tsv", 300, 0), _sst_like(tmp_path / "dev.tsv", 100, 1)
    out = tmp_path / "cls"
    result = finetune(FinetuneConfig(task="classify", model=str(tiny_pretrained[family]), train=str(train),
                                     eval=str(dev), out=str(out), epochs=3, lr=2e-3, batch_size=16, max_len=32))
    assert result["eval"]["accuracy"] >= 0.9 and {"macro_f1", "mcc", "loss"} <= set(result["eval"])
    assert json.loads((out / "eval_results.json").read_text())["eval"]["accuracy"] == result["eval"]["accuracy"]
    model = lmlab.load(out)
    assert model.config.heads == ("classify",) and model.config.labels == ["0", "1"]
    assert model.config.classifier_pooling == ("cls" if family == "bert" else "last")
    preds = predict(str(out), str(dev))
    assert len(preds) == 100 and all(p["label"] in ("0", "1") for p in preds)
    gold = [line.split("\t")[1] for line in dev.read_text().splitlines()[1:]]
    assert sum(p["label"] == g for p, g in zip(preds, gold)) / 100 == pytest.approx(result["eval"]["accuracy"])


def test_ner_learns_names_and_places(tiny_pretrained, tmp_path):
    train, dev = _conll(tmp_path / "train.conll", 200, 0), _conll(tmp_path / "dev.conll", 60, 1)
    out = tmp_path / "ner"
    assert main(["finetune", "--task", "ner", "--model", str(tiny_pretrained["bert"]), "--train", str(train), "--eval",
                 str(dev), "--out", str(out), "--epochs", "3", "--lr", "3e-3", "--max-len", "32"]) == 0
    result = json.loads((out / "eval_results.json").read_text())
    assert result["eval"]["f1"] >= 0.9 and result["labels"] == ["B-LOC", "B-PER", "O"]
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
        finetune(FinetuneConfig(task="classify", model=str(tiny_pretrained["bert"]), train=str(train), eval=str(dev),
                                out=str(tmp_path / "x"), epochs=1, max_len=32))
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
        paragraphs.append({"context": context, "qas": [{"id": f"q{k}", "question": "where did Moses go ?",
                                                          "answers": answers, "is_impossible": not answers}]})
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def test_qa_learns_to_point_at_the_answer_across_windows(tiny_pretrained, tmp_path):
    train, dev = _squad(tmp_path / "train.json", 300, 0, 0.2), _squad(tmp_path / "dev.json", 60, 1, 0.2)
    out = tmp_path / "qa"
    result = finetune(FinetuneConfig(task="qa", model=str(tiny_pretrained["bert"]), train=str(train), eval=str(dev),
                                     out=str(out), epochs=4, lr=3e-3, batch_size=16, max_len=24, doc_stride=8))
    assert result["eval"]["exact_match"] >= 80 and result["eval"]["f1"] >= result["eval"]["exact_match"]
    preds = {p["id"]: p["answer"] for p in predict(str(out), str(dev))}
    gold = {q["id"]: [a["text"] for a in q["answers"]] for p in json.loads(dev.read_text())["data"][0]["paragraphs"]
            for q in p["qas"]}
    from lmlab import metrics

    assert metrics.squad_scores(preds, gold)["exact_match"] == pytest.approx(result["eval"]["exact_match"])


def test_squad_answer_that_does_not_match_its_offset_is_refused(tmp_path):
    from lmlab.finetune import read_squad

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "Moses went to Egypt", "qas": [
        {"id": "q7", "question": "where?", "answers": [{"text": "Egypt", "answer_start": 3}]}]}]}]}))
    with pytest.raises(lmlab.LmlabError, match=r"question q7: answer 'Egypt' does not match the context at offset 3"):
        read_squad(bad)


def test_few_shot_scoring_sums_choice_log_probabilities(tiny_pretrained, tmp_path, capsys):
    """The score of a choice is the sum of its tokens' log-probabilities after the prompt (checked against
    a direct forward pass), and `lmlab eval --task` reports accuracy against chance."""
    import torch.nn.functional as F

    from lmlab.fewshot import choice_logprobs, evaluate_task
    from lmlab.tokenizer import load_tokenizer

    folder = str(tiny_pretrained["gpt"])
    model, tok = lmlab.load(folder), load_tokenizer(folder)
    prompt, choices = "the lord said unto", [" Moses", " the land"]
    got = choice_logprobs(model, tok, prompt, choices)
    for choice, score in zip(choices, got):
        ctx, cont = tok.encode(prompt, add_special_tokens=False), tok.encode(choice, add_special_tokens=False)
        x = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = F.log_softmax(model(input_ids=x).logits[0].float(), -1)
        assert score == pytest.approx(sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)), abs=1e-4)
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"query": f"q{i}: the", "choices": [" land", " river", " king"],
                                          "gold": i % 3}) for i in range(12)))
    r = evaluate_task(folder, str(task), shots=2)
    assert r["questions"] == 12 and r["chance"] == pytest.approx(1 / 3) and 0 <= r["accuracy"] <= 1
    assert main(["eval", "--model", folder, "--task", str(task), "--shots", "1", "--limit", "4"]) == 0
    assert "1-shot, 4 questions" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "x", "choices": ["a", "b"], "gold": "c"}\n')
    with pytest.raises(lmlab.LmlabError, match=r"bad.jsonl:1: gold 'c' is not one of the choices"):
        evaluate_task(folder, str(bad))
