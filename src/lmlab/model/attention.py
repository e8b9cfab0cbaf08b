"""Multi-head / grouped-query attention on SDPA, the three mask policies, and the KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config import ModelConfig
from lmlab.model.linear import Linear
from lmlab.model.positions import apply_rope


class LayerKV:
    """Keys and values of one attention layer, (B, H_kv, T, D), in buffers that grow by doubling.

    Appending into a preallocated buffer keeps decoding linear in the number of tokens, where
    re-concatenating the whole past at every step is quadratic.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            capacity = max(end, 2 * (0 if self.k is None else self.k.shape[2]), 16)
            new_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            new_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if self.k is not None:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        self.k.narrow(2, self.length, k.shape[2]).copy_(k)
        self.v.narrow(2, self.length, v.shape[2]).copy_(v)
        self.length = end
        return self.k.narrow(2, 0, end), self.v.narrow(2, 0, end)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search reorders its hypotheses this way)."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)

    def crop(self, length: int) -> None:
        """Forget every position from `length` on (speculative decoding drops the rejected draft)."""
        self.length = min(self.length, length)

    def pad(self, left: int = 0, right: int = 0) -> None:
        """Zeros on the time axis before and after the positions held (rows of unequal length joining
        one batch: the attention mask hides the padding)."""
        k, v = self.k[:, :, : self.length], self.v[:, :, : self.length]
        self.k, self.v = F.pad(k, (0, 0, left, right)), F.pad(v, (0, 0, left, right))
        self.length += left + right

    def join(self, other: LayerKV) -> None:
        """Append `other`'s rows after this layer's (both hold the same number of positions)."""
        self.k = torch.cat([self.k[:, :, : self.length], other.k[:, :, : other.length]], dim=0)
        self.v = torch.cat([self.v[:, :, : self.length], other.v[:, :, : other.length]], dim=0)

    def select(self, rows: torch.Tensor, start: int = 0) -> None:
        """Keep batch rows `rows` and the positions from `start` on (rows leaving a running batch)."""
        self.k = self.k[rows, :, start : self.length]
        self.v = self.v[rows, :, start : self.length]
        self.length -= start


class KVCache:
    """The cache of a whole model: self-attention per decoder layer, cross-attention per layer."""

    def __init__(self, n_layers: int, cross: bool = False) -> None:
        self.layers = [LayerKV() for _ in range(n_layers)]
        self.cross = [LayerKV() for _ in range(n_layers)] if cross else []

    @property
    def seen(self) -> int:
        """How many positions the cache already holds."""
        return self.layers[0].length if self.layers else 0

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self.layers + self.cross:
            layer.reorder(index)

    def crop(self, length: int) -> None:
        """Keep the first `length` positions of every self-attention layer (cross-attention keeps the
        encoder's, which do not grow)."""
        for layer in self.layers:
            layer.crop(length)

    def pad(self, left: int = 0, right: int = 0, cross: bool = False) -> None:
        """Pad every self-attention layer (or, with cross, every cross-attention layer) on the time axis."""
        for layer in self.cross if cross else self.layers:
            layer.pad(left, right)

    def join(self, other: KVCache) -> None:
        """Append `other`'s rows (the same positions, cross-attention too) after this cache's."""
        for a, b in zip(self.layers + self.cross, other.layers + other.cross):
            a.join(b)

    def select(self, rows: torch.Tensor, start: int = 0) -> None:
        """Keep batch rows `rows`, and the self-attention positions from `start` on."""
        for layer in self.layers:
            layer.select(rows, start)
        for layer in self.cross:
            layer.select(rows)


def build_mask(
    policy: str,
    q_len: int,
    k_len: int,
    past: int,
    key_padding: torch.Tensor | None,
    prefix_lengths: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    documents: tuple[torch.Tensor, torch.Tensor] | None = None,
    prefix_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """Mask for SDPA: (mask, is_causal). A bool mask is True where a query may attend.

    policy: "bidirectional" | "causal" | "prefix". key_padding: (B, k_len) True for real tokens.
    prefix_lengths: (B,) tokens of bidirectional prefix per example. bias: additive (1, H, q, k),
    T5's relative position bias; when given, the result is a float mask with the bias folded in.
    documents: (query documents (B, q_len), key documents (B, k_len)) of packed sequences: a query
    attends only within its own document (block-diagonal). prefix_mask: (B, k_len) True for the keys
    in a bidirectional prefix (one per packed document), which every query of that document sees.
    Returns mask None with is_causal=True when plain causal attention needs no mask (fast path).
    """
    device = key_padding.device if key_padding is not None else (bias.device if bias is not None else None)
    if documents is not None:
        device = documents[0].device
    allowed: torch.Tensor | None = None
    if policy != "bidirectional":
        plain = key_padding is None and bias is None and documents is None and past == 0 and q_len == k_len
        if policy == "causal" and plain:
            return None, True
        if not (policy == "causal" and q_len == 1):  # one new token may see every cached one
            q_pos = torch.arange(past, past + q_len, device=device)[:, None]
            k_pos = torch.arange(k_len, device=device)[None, :]
            allowed = (k_pos <= q_pos)[None]  # (1, q, k)
            if policy == "prefix" and prefix_lengths is not None:
                allowed = allowed | (k_pos[None] < prefix_lengths.to(device)[:, None, None])
            if policy == "prefix" and prefix_mask is not None:
                allowed = allowed | prefix_mask.bool()[:, None, :]
            allowed = allowed[:, None]  # (B or 1, 1, q, k)
    if documents is not None:
        same = (documents[0][:, :, None] == documents[1][:, None, :])[:, None]  # (B, 1, q, k)
        allowed = same if allowed is None else allowed & same
    if key_padding is not None:
        keys = key_padding.bool()[:, None, None, :]  # (B, 1, 1, k)
        allowed = keys if allowed is None else allowed & keys
        # A query that may see nothing (a left-pad position under a causal mask) would give NaN;
        # let it see everything instead. Its output is padding and is never read.
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    if bias is None:
        return allowed, False
    if allowed is None:
        return bias.to(dtype), False
    return bias.to(dtype).masked_fill(~allowed, torch.finfo(dtype).min), False


class Attention(nn.Module):
    """Self-attention (fused q/k/v projection) or cross-attention (q from x, k/v from memory)."""

    def __init__(self, cfg: ModelConfig, cross: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.dim_head
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.cross = cross
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        if cross:
            self.q = Linear(cfg.d_model, q_dim, bias=qkv_bias)
            self.kv = Linear(cfg.d_model, 2 * kv_dim, bias=qkv_bias)
        else:  # one GEMM for q, k and v
            self.qkv = Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=qkv_bias)
        self.out = Linear(q_dim, cfg.d_model, bias=cfg.bias)
        self.scale = cfg.attn_scale
        self.dropout = cfg.attn_dropout

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: LayerKV | None = None,
        memory: torch.Tensor | None = None,  # (B, S, C) encoder output, for cross-attention
    ) -> torch.Tensor:
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.cross:
            q = self._heads(self.q(x), self.n_heads)
            if cache is not None and cache.length:  # the encoder output does not change while decoding
                k, v = cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]
            else:
                k, v = self.kv(memory).split(kv_dim, dim=-1)
                k, v = self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)
                if cache is not None:
                    k, v = cache.append(k, v)
        else:
            # (B, T, H + 2 H_kv, D) -> (B, H + 2 H_kv, T, D), split into heads of q, k and v: three ops
            B, T, _ = x.shape
            heads = self.qkv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
            q, k, v = heads.split((self.n_heads, self.n_kv_heads, self.n_kv_heads), dim=1)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:
                k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, D)
        B, _, T, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, q_dim))
