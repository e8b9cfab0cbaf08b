"""Metrics equal their references: seqeval for entities, scikit-learn / scipy for the rest, and the
SQuAD evaluation script's behaviour on hand-made cases."""

from __future__ import annotations

import random

import pytest

from lmlab import metrics

seqeval = pytest.importorskip("seqeval.metrics")
sklearn_metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


def _random_tags(rng: random.Random, n: int, scheme: str) -> list[str]:
    prefixes = "BIO" if scheme == "BIO" else "BIOES"
    return [
        p if p == "O" else f"{p}-{rng.choice(['PER', 'LOC', 'ORG'])}" for p in (rng.choice(prefixes) for _ in range(n))
    ]


@pytest.mark.parametrize("scheme", ["BIO", "IOBES"])
def test_entity_scores_equal_seqeval_on_random_tag_soup(scheme):
    rng = random.Random(0)
    for _ in range(200):  # random sequences hit every odd transition (I after O, E after B of another type ...)
        gold = [_random_tags(rng, rng.randint(1, 12), scheme) for _ in range(rng.randint(1, 4))]
        pred = [[t if rng.random() < 0.6 else rng.choice(s) for t in s] for s in gold]
        ours = metrics.entity_scores(gold, pred)
        assert ours["precision"] == pytest.approx(seqeval.precision_score(gold, pred, zero_division=0))
        assert ours["recall"] == pytest.approx(seqeval.recall_score(gold, pred, zero_division=0))
        assert ours["f1"] == pytest.approx(seqeval.f1_score(gold, pred, zero_division=0))


def test_entities_of_a_hand_example():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "B-ORG", "I-PER"]
    assert metrics.entities(tags) == [("PER", 0, 1), ("LOC", 3, 4), ("ORG", 5, 5), ("ORG", 6, 6), ("PER", 7, 7)]
    assert metrics.entities(["S-LOC", "B-PER", "E-PER", "E-PER"]) == [("LOC", 0, 0), ("PER", 1, 2), ("PER", 3, 3)]


def test_classification_and_regression_metrics_equal_scikit_learn_and_scipy():
    rng = random.Random(1)
    for n_classes in (2, 3, 5):
        gold = [rng.randrange(n_classes) for _ in range(300)]
        pred = [g if rng.random() < 0.7 else rng.randrange(n_classes) for g in gold]
        assert metrics.accuracy(gold, pred) == pytest.approx(sklearn_metrics.accuracy_score(gold, pred))
        assert metrics.macro_f1(gold, pred) == pytest.approx(sklearn_metrics.f1_score(gold, pred, average="macro"))
        assert metrics.matthews_corrcoef(gold, pred) == pytest.approx(sklearn_metrics.matthews_corrcoef(gold, pred))
    x = [rng.random() for _ in range(100)]
    y = [round(a + rng.gauss(0, 0.3), 1) for a in x]  # rounding makes ties
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    with pytest.raises(ValueError, match="2 gold labels but 3"):
        metrics.accuracy([1, 2], [1, 2, 3])


def test_squad_normalisation_and_scores_by_hand():
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.exact_match("the Eiffel tower.", ["Eiffel Tower"]) == 1.0
    assert metrics.exact_match("Eiffel", ["Eiffel Tower", "Paris"]) == 0.0
    # F1 is the best over the gold answers: "in Paris, France" vs "Paris" -> p 1/3, r 1 -> 0.5
    assert metrics.token_f1("in Paris, France", ["the city of Paris", "Paris"]) == pytest.approx(0.5)
    assert metrics.token_f1("an apple a day", ["a day"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    # SQuAD v2: an unanswerable question (no gold answers) scores only the empty prediction
    assert metrics.exact_match("", []) == 1.0 and metrics.token_f1("", []) == 1.0
    assert metrics.exact_match("Paris", []) == 0.0 and metrics.token_f1("Paris", []) == 0.0
    assert metrics.token_f1("", ["Paris"]) == 0.0
    scores = metrics.squad_scores({"q1": "Paris", "q2": ""}, {"q1": ["paris"], "q2": [], "q3": ["x"]})
    assert scores == {"exact_match": pytest.approx(200 / 3), "f1": pytest.approx(200 / 3), "total": 3}
