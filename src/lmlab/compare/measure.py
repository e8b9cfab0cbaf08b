"""What a comparison measures on held-out text, for any family.

bits per byte (generative families): every held-out window of seq_len tokens is cut in half; the
    second half is scored given the first. A decoder reads the window causally, a prefix-LM with the
    first half as its bidirectional prefix, an encoder-decoder reads the first half in its encoder and
    predicts the second half with its decoder (trained with span corruption: as the span after a
    sentinel, a question it was not trained for, so it is reported but not ranked). Nats are summed over
    the second half's tokens and divided by ln 2 x the UTF-8 bytes of its text, so tokenizers of any
    kind would compare (here all contenders share one). Special tokens (document separators) are scored
    by nobody.
pseudo-log-likelihood bits per byte (encoders): each second-half token masked in turn, everything
    else visible (both halves): a different and easier question, so it is reported apart and never ranked.
masked-token accuracy (encoders): every 7th token of each held-out window masked at once, predicted;
    beside the unigram baseline (always the training split's most frequent token) on the same positions.
Kneser-Ney: a trigram model of the training split scores the same second halves (lmlab.ngram).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.metrics import evidence
from lmlab.ngram import KneserNeyTrigram

LN2 = math.log(2)
MASK_EVERY = 7


def windows(stream: np.ndarray, seq_len: int, n: int) -> list[np.ndarray]:
    """Up to n consecutive, non-overlapping windows of seq_len tokens from a held-out stream."""
    count = min(n, len(stream) // seq_len)
    return [np.asarray(stream[i * seq_len : (i + 1) * seq_len], dtype=np.int64) for i in range(count)]


def _scored(tok: Any, ids: np.ndarray) -> np.ndarray:
    specials = np.array(sorted(tok.special_ids), dtype=np.int64)
    return ~np.isin(ids, specials)


def _bytes(tok: Any, ids: np.ndarray) -> int:
    keep = ids[_scored(tok, ids)]
    return len(tok.decode(keep.tolist(), skip_special_tokens=True).encode("utf-8"))


@torch.no_grad()
def second_half_nats(model: Any, tok: Any, win: np.ndarray, objective: str | None = None) -> np.ndarray:
    """Per-token negative log-likelihood of the window's second half given its first half. An
    encoder-decoder is asked in the form of its objective: after span corruption, the second half is the
    span behind a sentinel; otherwise (prefix-seq2seq) it is the decoder's whole target."""
    cfg = model.config
    half = len(win) // 2
    first, second = win[:half].tolist(), win[half:].tolist()
    start = cfg.decoder_start_token_id
    if cfg.spec.seq2seq and objective == "span":
        sentinel = tok.sentinel_ids[0]
        enc = torch.tensor([first + [sentinel, tok.eos_id]])
        dec_in = torch.tensor([[start, sentinel] + second[:-1]])
        logits = model(input_ids=enc, decoder_input_ids=dec_in).logits[0, 1:].float()
    elif cfg.spec.seq2seq:
        enc = torch.tensor([first + [tok.eos_id]])
        dec_in = torch.tensor([[start] + second[:-1]])
        logits = model(input_ids=enc, decoder_input_ids=dec_in).logits[0].float()
    else:
        x = torch.tensor([win.tolist()])
        kw = {"prefix_lengths": torch.tensor([half])} if cfg.family == "prefix-lm" else {}
        logits = model(input_ids=x, **kw).logits[0, half - 1 : -1].float()  # position t predicts t+1
    logp = F.log_softmax(logits, -1)
    return -logp.gather(1, torch.tensor(second)[:, None])[:, 0].numpy()


@torch.no_grad()
def pseudo_second_half_nats(model: Any, tok: Any, win: np.ndarray, batch: int = 64) -> np.ndarray:
    """Each second-half token masked in turn (the rest visible): its negative log-likelihood."""
    body = win.tolist()[-(model.config.max_seq_len - 2) :]  # room for <s> and </s>: the first half gives way
    n_second = len(win) - len(win) // 2
    ids = torch.tensor([tok.cls_id] + body + [tok.sep_id])
    positions = torch.arange(len(ids) - 1 - n_second, len(ids) - 1)
    out = []
    for s in range(0, len(positions), batch):
        pos = positions[s : s + batch]
        x = ids.repeat(len(pos), 1)
        x[torch.arange(len(pos)), pos] = tok.mask_id
        logp = F.log_softmax(model(input_ids=x).logits[torch.arange(len(pos)), pos].float(), -1)
        out.append(-logp[torch.arange(len(pos)), ids[pos]])
    return torch.cat(out).numpy()


def bits_per_byte(tok: Any, wins: list[np.ndarray], nats_of) -> dict[str, Any]:
    """Bits per byte of the windows' second halves, and per window (bits, bytes): the evidence a paired
    bootstrap resamples."""
    bits, nbytes, tokens = [], [], 0
    for win in wins:
        second = win[len(win) // 2 :]
        keep = _scored(tok, second)
        bits.append(float(nats_of(win)[keep].sum()) / LN2)
        nbytes.append(_bytes(tok, second))
        tokens += int(keep.sum())
    total_bits, total_bytes = sum(bits), sum(nbytes)
    return {
        "bpb": total_bits / max(total_bytes, 1),
        "nats_per_token": total_bits * LN2 / max(tokens, 1),
        "tokens": tokens,
        "bytes": total_bytes,
        "evidence": evidence("bpb", range(len(wins)), bits, nbytes),
    }


def kneser_ney_bpb(tok: Any, train_stream: np.ndarray, wins: list[np.ndarray]) -> dict[str, float]:
    """A Kneser-Ney trigram of the training stream on the same second halves (contexts from the window)."""
    kn = KneserNeyTrigram(np.asarray(train_stream), tok.vocab_size)

    def nats(win: np.ndarray) -> np.ndarray:
        w, half = win.tolist(), len(win) // 2
        return np.array([-kn.logprob(w[t - 2], w[t - 1], w[t]) for t in range(half, len(w))])

    return bits_per_byte(tok, wins, nats)


def unigram_top(tok: Any, train_stream: np.ndarray) -> int:
    counts = np.bincount(np.asarray(train_stream, dtype=np.int64), minlength=tok.vocab_size)
    counts[sorted(tok.special_ids)] = 0
    return int(counts.argmax())


def masked_positions(tok: Any, win: np.ndarray, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's view of a window (<s> window </s>, cut to max_len) and the positions masked in it:
    every MASK_EVERY-th token from position 3, special tokens left alone."""
    ids = torch.tensor([tok.cls_id] + win.tolist()[: max_len - 2] + [tok.sep_id])
    pos = torch.arange(1 + 3, len(ids) - 1, MASK_EVERY)
    return ids, pos[torch.from_numpy(_scored(tok, ids[pos].numpy()))]


@torch.no_grad()
def masked_accuracy(model: Any, tok: Any, wins: list[np.ndarray], top_token: int) -> dict[str, Any]:
    """Every MASK_EVERY-th token masked at once, predicted with the rest visible; and the unigram
    baseline (always `top_token`) on the same positions."""
    right, base, n = [], [], []
    for win in wins:
        ids, pos = masked_positions(tok, win, model.config.max_seq_len)
        x = ids.clone()
        x[pos] = tok.mask_id
        pred = model(input_ids=x[None]).logits[0, pos].argmax(-1)
        right.append(int((pred == ids[pos]).sum()))
        base.append(int((ids[pos] == top_token).sum()))
        n.append(len(pos))
    total = max(sum(n), 1)
    return {
        "accuracy": sum(right) / total,
        "unigram_accuracy": sum(base) / total,
        "positions": sum(n),
        "evidence": evidence("accuracy", range(len(wins)), right, n),
    }


def unigram_evidence(tok: Any, wins: list[np.ndarray], top_token: int, max_len: int) -> dict[str, Any]:
    """The unigram baseline of masked_accuracy, per window, without a model."""
    hits, n = [], []
    for win in wins:
        ids, pos = masked_positions(tok, win, max_len)
        hits.append(int((ids[pos] == top_token).sum()))
        n.append(len(pos))
    return evidence("accuracy", range(len(wins)), hits, n)


# ---- multiple choice built from held-out text ----------------------------------------------------------
# scripts written without spaces between words: each character is a unit of its own (CJK ideographs and
# punctuation, kana, fullwidth forms, Thai, Lao, Myanmar, Khmer)
NO_SPACE = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u2e80-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0002fa1f"
)
UNIT = re.compile(f"[{NO_SPACE}]|[^\\s{NO_SPACE}]+")


def text_units(text: str) -> list[re.Match[str]]:
    """The units a text is cut at: words between spaces, and single characters of scripts without spaces."""
    return list(UNIT.finditer(text))


def build_questions(tok: Any, stream: np.ndarray, n: int, seed: int, query_tokens: int = 14, choice_tokens: int = 6):
    """Pick-the-true-continuation questions: a held-out passage of about `query_tokens` tokens, its true
    next `choice_tokens` or so and three continuations taken from other passages. Passages are cut in
    the text, at units (lmlab.compare.measure.text_units), so any script works: English at words,
    Chinese at characters."""
    rng = np.random.default_rng(seed)
    span = query_tokens + choice_tokens
    passages = []
    for s in range(0, len(stream) - span - 8, span + 8):
        ids = np.asarray(stream[s : s + span + 8], dtype=np.int64)
        if not _scored(tok, ids).all():
            continue
        text = tok.decode(ids.tolist())
        units = [u for u in text_units(text) if "\ufffd" not in u.group()][1:]  # the first may be cut
        if len(units) < 4:
            continue
        per_token = len(units) / len(ids)
        q = max(2, round(query_tokens * per_token))
        c = max(1, round(choice_tokens * per_token))
        if q + c >= len(units):
            continue
        query = text[units[0].start() : units[q].start()].strip()
        choice = text[units[q].start() : units[q + c].start()].strip()
        if query and choice:
            passages.append((query, choice))
    order = rng.permutation(len(passages))
    questions = []
    for i in order[:n]:
        query, right = passages[i]
        others = [passages[j][1] for j in rng.choice(len(passages), min(8, len(passages)), replace=False) if j != i]
        wrong = list(dict.fromkeys(o for o in others if o != right))[:3]
        if len(wrong) < 3:
            continue
        choices = wrong + [right]
        rng.shuffle(choices)
        questions.append({"query": query, "choices": choices, "gold": choices.index(right)})
    return questions


# ---- generation -----------------------------------------------------------------------------------------
def distinct_n(texts: list[list[int]], n: int) -> float:
    grams = [tuple(t[i : i + n]) for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def repetition_rate(texts: list[list[int]], n: int = 4) -> float:
    """Share of each continuation's n-grams that already occurred earlier in the same continuation."""
    repeated = total = 0
    for t in texts:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(t) - n + 1):
            g = tuple(t[i : i + n])
            repeated += g in seen
            total += 1
            seen.add(g)
    return repeated / max(total, 1)


@torch.no_grad()
def sample_continuations(
    model: Any, tok: Any, wins: list[np.ndarray], n: int, seed: int, new_tokens: int = 32, objective: str | None = None
):
    """Sampled continuations (top-k 40, temperature 0.8) of the first 16 tokens of n held-out windows;
    distinct-1/2, 4-gram repetition rate and decoding tokens/s. An encoder-decoder continues as its
    objective taught it (the span after a sentinel, or the rest after the prefix)."""
    cfg = model.config
    prompts = [w[:16].tolist() for w in wins[:n]]
    eos = [tok.eos_id]
    if cfg.spec.seq2seq and objective != "span":
        inputs = [p + [tok.eos_id] for p in prompts]
    elif cfg.spec.seq2seq:
        sentinels = tok.sentinel_ids
        inputs = [p + [sentinels[0], tok.eos_id] for p in prompts]
        eos = [tok.eos_id, sentinels[1]]
    else:
        inputs = prompts
    made, texts, generated, elapsed = [], [], 0, 0.0
    for i, ids in enumerate(inputs):
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        r = model.generate(
            x,
            max_new_tokens=new_tokens,
            do_sample=True,
            top_k=40,
            temperature=0.8,
            seed=seed * 1000 + i,
            eos_token_id=eos,
            return_dict_in_generate=True,
        )
        elapsed += time.perf_counter() - t0
        new = [t for t in r.tokens[0] if t not in tok.special_ids]
        generated += len(r.tokens[0])
        made.append(new)
        texts.append({"prompt": tok.decode(prompts[i]), "continuation": tok.decode(new)})
    return {
        "distinct_1": distinct_n(made, 1),
        "distinct_2": distinct_n(made, 2),
        "repetition_4": repetition_rate(made, 4),
        "decode_tokens_per_s": generated / max(elapsed, 1e-9),
        "samples": texts,
    }


@torch.no_grad()
def fill_mask_candidates(model: Any, tok: Any, sentences: list[tuple[str, str]], top_k: int = 5):
    """For (text with [MASK], the word it hides): the top candidates, as the encoder sees <s> text </s>."""
    out = []
    for text, answer in sentences:
        left, right = text.split("[MASK]", 1)
        ids = [tok.cls_id] + tok.encode(left.rstrip(), add_special_tokens=False)
        where = len(ids)
        ids += [tok.mask_id] + tok.encode(right, add_special_tokens=False) + [tok.sep_id]
        probs = F.softmax(model(input_ids=torch.tensor([ids])).logits[0, where].float(), -1)
        top = torch.topk(probs, top_k)
        cands = [(tok.decode([int(i)]).strip(), round(float(p), 4)) for p, i in zip(top.values, top.indices)]
        out.append({"text": text, "answer": answer, "candidates": cands})
    return out


# ---- routing ------------------------------------------------------------------------------------------------
def token_kind(text: str, frequent: frozenset[str]) -> str:
    """punctuation, number, frequent (among the most frequent tokens of the text routed: function words
    in English, particles in Chinese), capitalised, or other: defined for any script."""
    t = text.strip()
    if not t:
        return "space"
    if all(not c.isalnum() for c in t):
        return "punctuation"
    if any(c.isdigit() for c in t):
        return "number"
    if t.lower() in frequent:
        return "frequent"
    if t[0].isupper():
        return "capitalised"
    return "other"


def frequent_texts(texts: list[str], top: int = 32) -> frozenset[str]:
    """The `top` most frequent word-like token texts (lower-cased) of a text."""
    counts = Counter(t.strip().lower() for t in texts if any(c.isalpha() for c in t))
    return frozenset(t for t, _ in counts.most_common(top))


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """I(A; B) in bits from paired samples of two discrete variables."""
    n = len(a)
    joint = Counter(zip(a.tolist(), b.tolist()))
    pa, pb = Counter(a.tolist()), Counter(b.tolist())
    return sum(c / n * math.log2(c * n / (pa[x] * pb[y])) for (x, y), c in joint.items())


@torch.no_grad()
def routing_report(model: Any, tok: Any, wins: list[np.ndarray], seed: int, top: int = 6) -> dict[str, Any]:
    """Per MoE layer: each expert's most frequent tokens and token kinds, and how much the chosen expert
    tells about the token (mutual information, bits) against the same assignments shuffled across
    tokens (mean of 5 permutations): routing that follows the input shows I(token; expert) far above the
    shuffled control."""
    cfg = model.config
    ids = torch.tensor(np.stack(wins))
    if cfg.spec.seq2seq:
        out = model(input_ids=ids, decoder_input_ids=ids[:, :8])
    else:
        out = model(input_ids=ids)
    flat = ids.flatten().numpy()
    text = {int(i): tok.decode([int(i)]) for i in np.unique(flat)}
    frequent = frequent_texts([text[int(i)] for i in flat])
    kinds_of = {i: token_kind(t, frequent) for i, t in text.items()}
    kinds = np.array([kinds_of[int(i)] for i in flat])
    kind_ids = np.unique(kinds, return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    layers = []
    for rec in out.routing or []:
        w = rec.expert_weights()
        if w.shape[0] != len(flat):  # a decoder layer of an encoder-decoder read other tokens
            continue
        expert = w.argmax(-1).numpy()
        routed = w.sum(-1).numpy() > 0
        e, tokens, kk = expert[routed], flat[routed], kind_ids[routed]
        mi_tok, mi_kind = mutual_information(tokens, e), mutual_information(kk, e)
        shuffled_tok = float(np.mean([mutual_information(tokens, rng.permutation(e)) for _ in range(5)]))
        shuffled_kind = float(np.mean([mutual_information(kk, rng.permutation(e)) for _ in range(5)]))
        experts = []
        for x in range(w.shape[1]):
            mine = tokens[e == x]
            if len(mine) == 0:
                experts.append({"expert": x, "share": 0.0, "top_tokens": [], "kinds": {}})
                continue
            common = Counter(mine.tolist()).most_common(top)
            kind_counts = Counter(kinds[routed][e == x].tolist())
            experts.append(
                {
                    "expert": x,
                    "share": len(mine) / len(tokens),
                    "top_tokens": [text[t].strip() or repr(text[t]) for t, _ in common],
                    "kinds": {k: round(c / len(mine), 3) for k, c in kind_counts.most_common()},
                }
            )
        layers.append(
            {
                "layer": rec.layer,
                "mi_token_bits": mi_tok,
                "mi_token_shuffled_bits": shuffled_tok,
                "mi_kind_bits": mi_kind,
                "mi_kind_shuffled_bits": shuffled_kind,
                "experts": experts,
            }
        )
    return {"tokens": int(len(flat)), "layers": layers}
