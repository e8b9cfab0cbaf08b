"""Trivial baselines, per example, on the very examples the contenders are scored on.

A contender has learned something only where it beats what needs no learning: every metric of a
comparison has its baselines here, as lmlab.metrics.evidence records keyed like the contenders' own,
so a paired bootstrap (lmlab.compare.stats) compares each contender with them example by example.

- held-out bits per byte: a Kneser-Ney trigram of the training split (lmlab.compare.measure)
- masked-token accuracy: always the training split's most frequent token (the unigram baseline)
- multiple choice: chance, 1 / the number of choices
- classification: the majority class of the training file
- tagging: each word's most frequent tag in the training file (O for unseen words), the classic
  memorisation baseline of CoNLL
- seq2seq: the source copied as the output (sentence chrF)
- extractive QA: the first capitalised word of the context that does not start a sentence (names are
  what Nave's questions ask for), else the context's first word
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

from lmlab import metrics


def chance(questions: list[dict[str, Any]]) -> dict[str, Any]:
    return metrics.evidence("accuracy", range(len(questions)), [1 / len(q["choices"]) for q in questions])


def majority_class(train: str, evaluation: str) -> dict[str, Any]:
    from lmlab.tasks.classify import read_table

    train_rows, cols, label = read_table(train)
    common = Counter(str(ex.label) for ex in train_rows).most_common(1)[0][0]
    eval_rows, _, _ = read_table(evaluation, cols, label)
    return metrics.evidence("accuracy", range(len(eval_rows)), [float(str(ex.label) == common) for ex in eval_rows])


def word_tags(train: str, evaluation: str) -> dict[str, Any]:
    from lmlab.tasks.ner import read_conll

    seen: dict[str, Counter[str]] = defaultdict(Counter)
    for ex in read_conll(train):
        for w, t in zip(ex.words, ex.label):
            seen[w][t] += 1
    best = {w: c.most_common(1)[0][0] for w, c in seen.items()}
    gold, pred = [], []
    for ex in read_conll(evaluation):
        gold.append(list(ex.label))
        tags = [best.get(w, "O") for w in ex.words]
        # an I- tag the memorised word carries alone opens no entity of its own in seqeval: make it B-
        pred.append(
            [("B-" + t[2:]) if t.startswith("I-") and (i == 0 or tags[i - 1] == "O") else t for i, t in enumerate(tags)]
        )
    return metrics.entity_evidence(gold, pred)


_WORD = re.compile(r"[^\W\d_][\w'-]*")


def capitalised_word(context: str) -> str:
    """The first capitalised word of `context` that does not open a sentence; else its first word."""
    words = list(_WORD.finditer(context))
    for k, m in enumerate(words[1:], 1):
        before = context[words[k - 1].end() : m.start()]
        if m.group()[0].isupper() and not re.search(r"[.!?;:]", before):
            return m.group()
    return words[0].group() if words else ""


def qa_heuristic(evaluation: str) -> dict[str, Any]:
    from lmlab.tasks.qa import read_squad

    examples = read_squad(evaluation)
    f1 = [100 * metrics.token_f1(capitalised_word(ex.context), [a for a, _ in ex.answers]) for ex in examples]
    return metrics.evidence("f1", [ex.id for ex in examples], f1)


def copy_source(evaluation: str) -> dict[str, Any]:
    from lmlab.tasks.seq2seq import read_pairs

    pairs = read_pairs(evaluation)
    chrf = metrics.sentence_chrf([p.source for p in pairs], [p.target for p in pairs])
    return metrics.evidence("chrf", [p.where.rsplit(":", 1)[-1] for p in pairs], chrf)


# task kind -> (the metric it is judged by, its baselines: name -> builder(task spec))
TASK_BASELINES: dict[str, tuple[str, dict[str, Any]]] = {
    "classify": ("accuracy", {"majority class": lambda t: majority_class(t["train"], t["eval"])}),
    "ner": ("f1", {"most frequent tag per word": lambda t: word_tags(t["train"], t["eval"])}),
    "qa": ("f1", {"first capitalised non-initial word": lambda t: qa_heuristic(t["eval"])}),
    "seq2seq": ("chrf", {"copy the source": lambda t: copy_source(t["eval"])}),
}


def task_baselines(task: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> evidence of every baseline of a fine-tuning task (none for a kind without one)."""
    _, builders = TASK_BASELINES.get(task["task"], ("", {}))
    return {name: build(task) for name, build in builders.items()}
