"""Evaluation metrics of the fine-tuning tasks, written out so that each is checkable by eye.

- classification: accuracy, macro-F1, Matthews correlation (multi-class, Gorodkin's R_K);
- regression: Pearson and Spearman correlation (ties get average ranks);
- tagging: entity-level precision / recall / F1 over BIO or IOBES tags, chunked exactly as
  `seqeval` does in its default mode (an I- after O, or after another type, opens an entity);
- extractive QA: SQuAD's exact match and token F1 with the official answer normalisation
  (lower case, no punctuation, no articles a / an / the, single spaces), maximised over the gold
  answers; for SQuAD v2 an unanswerable question scores 1 only for an empty prediction;
- generation (seq2seq): corpus BLEU and chrF from sacreBLEU (with their signatures, so a score can be
  compared with a published one), ROUGE-1 / 2 / L / Lsum F-measures from Google's rouge-score (the
  mean over examples, in %), and exact match after stripping white space. rougeLsum scores a summary
  sentence by sentence, and rouge-score finds the sentences only at newlines: a text without
  newlines is split into sentences first (`sentences`), so a one-line multi-sentence summary is not
  scored as one long sentence. sacrebleu and rouge-score come with the `seq2seq` extra.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Iterable, Sequence
from typing import Any


# ---- classification and regression ---------------------------------------------------------------
def accuracy(gold: Sequence, pred: Sequence) -> float:
    _same_length(gold, pred)
    return sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1)


def macro_f1(gold: Sequence, pred: Sequence) -> float:
    """Unweighted mean of per-class F1 over the classes seen in gold or predictions."""
    _same_length(gold, pred)
    scores = []
    for c in sorted(set(gold) | set(pred), key=str):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(len(scores), 1)


def matthews_corrcoef(gold: Sequence, pred: Sequence) -> float:
    """Gorodkin's multi-class MCC (equal to the binary formula for two classes); 0 when undefined."""
    _same_length(gold, pred)
    n = len(gold)
    classes = sorted(set(gold) | set(pred), key=str)
    t = collections.Counter(gold)
    p = collections.Counter(pred)
    correct = sum(g == q for g, q in zip(gold, pred))
    cov_tp = correct * n - sum(t[c] * p[c] for c in classes)
    cov_pp = n * n - sum(p[c] ** 2 for c in classes)
    cov_tt = n * n - sum(t[c] ** 2 for c in classes)
    return cov_tp / math.sqrt(cov_pp * cov_tt) if cov_pp and cov_tt else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    _same_length(x, y)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else 0.0


def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share the average of their ranks
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(x), _ranks(y))


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} gold labels but {len(b)} predictions")


# ---- tagging ------------------------------------------------------------------------------------
def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '_')."""
    return tag[0], (tag[1:].split("-", maxsplit=1)[-1] or "_")


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        prev_tag in ("E", "S")
        or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
        or (prev_tag not in ("O", ".") and prev_type != type_)
    )


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        tag in ("B", "S")
        or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
        or (tag not in ("O", ".") and prev_type != type_)
    )


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of every entity in one tag sequence (BIO or IOBES), as seqeval chunks them."""
    chunks, prev_tag, prev_type, begin = [], "O", "", 0
    for i, t in enumerate(list(tags) + ["O"]):
        tag, type_ = _split_tag(t)
        if _ends(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 over entities (an entity counts when type and span both match)."""
    _same_length(gold, pred)
    g_set, p_set = set(), set()
    for k, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {k}: {len(g)} gold tags but {len(p)} predicted")
        g_set |= {(k, *e) for e in entities(g)}
        p_set |= {(k, *e) for e in entities(p)}
    tp = len(g_set & p_set)
    precision = tp / len(p_set) if p_set else 0.0
    recall = tp / len(g_set) if g_set else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_evidence(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity F1 as a ratio of per-sentence sums: 2 x true positives over predicted + gold entities,
    so resampling sentences and summing gives the micro F1 of the resample (lmlab compare's intervals)."""
    num, den = [], []
    for g, p in zip(gold, pred):
        g_set, p_set = set(entities(g)), set(entities(p))
        num.append(2.0 * len(g_set & p_set))
        den.append(float(len(g_set) + len(p_set)))
    return evidence("f1", range(len(gold)), num, den)


def evidence(
    metric: str, ids: Iterable[Any], num: Sequence[float], den: Sequence[float] | None = None
) -> dict[str, Any]:
    """A metric as per-example numerators and denominators (the metric is sum(num) / sum(den); den
    defaults to 1 per example), keyed by example id: what a paired bootstrap resamples."""
    ids = [str(i) for i in ids]
    den = list(den) if den is not None else [1.0] * len(ids)
    if not len(ids) == len(num) == len(den):
        raise ValueError(f"{metric}: {len(ids)} ids, {len(num)} numerators and {len(den)} denominators")
    return {"metric": metric, "ids": ids, "num": [float(x) for x in num], "den": [float(x) for x in den]}


# ---- extractive QA --------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and articles, collapse white space."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    if not golds:  # SQuAD v2: unanswerable
        return float(normalize_answer(prediction) == "")
    return max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    if not golds:
        return float(normalize_answer(prediction) == "")

    def f1(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        if not p or not g:  # as the v2 script: both empty is a match, one empty is not
            return float(p == g)
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(f1(prediction, g) for g in golds)


def squad_scores(predictions: dict[str, str], golds: dict[str, list[str]]) -> dict[str, float]:
    """Mean EM and F1 (in %) over the gold question ids; a missing prediction scores 0 (as the script)."""
    if not golds:
        raise ValueError("no gold answers to score against")
    em = sum(exact_match(predictions[q], g) if q in predictions else 0.0 for q, g in golds.items())
    f1 = sum(token_f1(predictions[q], g) if q in predictions else 0.0 for q, g in golds.items())
    return {"exact_match": 100 * em / len(golds), "f1": 100 * f1 / len(golds), "total": len(golds)}


# ---- generation ------------------------------------------------------------------------------------
# a sentence ends at . ! ? (or one of them then a closing quote / bracket) before white space and a
# character that is not a lower-case letter ("Why?" he asked. stays one sentence)
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[^\sa-z])")


def sentences(text: str) -> list[str]:
    """The sentences of a summary for rougeLsum: its lines when it has several, else the pieces after
    sentence-final . ! ? (and a closing quote or bracket) followed by white space and anything but a
    lower-case letter."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return lines
    text = lines[0] if lines else ""
    return [piece.strip() for piece in _SENTENCE_END.split(text) if piece.strip()]


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"seq2seq metrics need {module.split('.')[0]}: pip install 'lmlab[seq2seq]' (sacrebleu, rouge-score)"
        ) from None


def sentence_chrf(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """sacreBLEU's chrF of each prediction against its reference (in %)."""
    _same_length(references, predictions)
    chrf = _need("sacrebleu").metrics.CHRF()
    return [chrf.sentence_score(str(p), [str(r)]).score for p, r in zip(predictions, references)]


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """BLEU, chrF, ROUGE-1/2/L/Lsum and exact match (all in %) of predictions against one reference each,
    with sacreBLEU's signatures."""
    _same_length(references, predictions)
    if not references:
        raise ValueError("no references to score against")
    sacrebleu = _need("sacrebleu")
    rouge_scorer = _need("rouge_score.rouge_scorer")
    preds, refs = [str(p) for p in predictions], [str(r) for r in references]
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    out: dict[str, Any] = {
        "bleu": bleu.corpus_score(preds, [refs]).score,
        "chrf": chrf.corpus_score(preds, [refs]).score,
    }
    types = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for p, r in zip(preds, refs):
        scores = scorer.score("\n".join(sentences(r)), "\n".join(sentences(p)))  # (target, prediction)
        for t in types:
            totals[t] += scores[t].fmeasure
    out.update({t: 100 * totals[t] / len(refs) for t in types})
    out["exact_match"] = 100 * sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(refs)
    out["bleu_signature"] = str(bleu.get_signature())
    out["chrf_signature"] = str(chrf.get_signature())
    return out
