"""A count-based baseline: a trigram model with interpolated Kneser-Ney smoothing (Chen & Goodman 1998:
absolute discount D=0.75 at every order, continuation counts below the top order, a uniform floor).
What a Transformer learns beyond it is what the counts alone cannot give."""

from __future__ import annotations

import math

import numpy as np


class KneserNeyTrigram:
    """Estimated from one token stream over a vocabulary of `vocab` ids."""

    def __init__(self, tokens: np.ndarray, vocab: int, discount: float = 0.75) -> None:
        self.V, self.D = vocab, discount
        t = tokens.astype(np.int64)
        tri = np.unique((t[:-2] * vocab + t[1:-1]) * vocab + t[2:], return_counts=True)
        self.tri = dict(zip(tri[0].tolist(), tri[1].tolist()))
        # context (u, v) -> total count and number of distinct followers
        ctx = tri[0] // vocab
        self.ctx_count = _sum_by(ctx, tri[1])
        self.ctx_types = _sum_by(ctx, np.ones_like(tri[1]))
        # bigram continuation counts: N1+(., v, w) = distinct u before (v, w)
        vw = np.unique(tri[0] % (vocab * vocab), return_counts=True)
        self.bi_cont = dict(zip(vw[0].tolist(), vw[1].tolist()))
        v_of = vw[0] // vocab
        self.mid_total = _sum_by(v_of, vw[1])  # N1+(., v, .)
        self.mid_types = _sum_by(v_of, np.ones_like(vw[1]))  # distinct w after v
        # unigram continuation counts: N1+(., w) = distinct v before w
        w_bi = np.unique(vw[0])
        uni = np.bincount(w_bi % vocab, minlength=vocab).astype(np.float64)
        self.uni_total = uni.sum()
        types = (uni > 0).sum()
        self.p1 = np.maximum(uni - discount, 0) / self.uni_total + discount * types / self.uni_total / vocab

    def prob(self, u: int | None, v: int | None, w: int) -> float:
        V, D = self.V, self.D
        p = float(self.p1[w])
        if v is not None and v in self.mid_total:
            total = self.mid_total[v]
            p = (max(self.bi_cont.get(v * V + w, 0) - D, 0) + D * self.mid_types[v] * p) / total
        if u is not None and v is not None:
            key = u * V + v
            if key in self.ctx_count:
                total = self.ctx_count[key]
                p = (max(self.tri.get(key * V + w, 0) - D, 0) + D * self.ctx_types[key] * p) / total
        return p

    def logprob(self, u: int | None, v: int | None, w: int) -> float:
        """Natural log of P(w | u v)."""
        return math.log(self.prob(u, v, w))

    def perplexity(self, windows: list[np.ndarray]) -> tuple[float, int]:
        nll, n = 0.0, 0
        for win in windows:
            w = win.tolist()
            for t in range(1, len(w)):
                nll -= math.log(self.prob(w[t - 2] if t >= 2 else None, w[t - 1], w[t]))
                n += 1
        return math.exp(nll / n), n


def _sum_by(keys: np.ndarray, values: np.ndarray) -> dict[int, int]:
    uniq, inverse = np.unique(keys, return_inverse=True)
    return dict(zip(uniq.tolist(), np.bincount(inverse, weights=values).astype(np.int64).tolist()))
