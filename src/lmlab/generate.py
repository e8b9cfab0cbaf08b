"""Text generation with the KV cache, and fill-mask for encoders.

`generate` follows transformers' conventions: left-padded prompts with an attention mask, and the
return value is prompt + new tokens (for encoder-decoders: the decoder sequence, start token first).
Decoding: greedy, or sampling with temperature, top-k and top-p (nucleus).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.model import KVCache, Model


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set whose probability reaches top_p."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = filter_logits(logits / max(temperature, 1e-5), top_k, top_p)
    return torch.multinomial(logits.float().softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None,
             seed: int | None = None) -> torch.Tensor:
    cfg = model.config
    if not cfg.has_decoder or model.lm_head is None:
        raise ConfigError(f"generate needs a model with an lm head (decoder, prefix-lm or encoder-decoder); this is "
                          f"a {cfg.family} model with heads {cfg.heads}")
    was_training = model.training
    model.eval()
    device = input_ids.device
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else eos)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    B = input_ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=device)

    if cfg.family == "encoder-decoder":
        memory = model(input_ids, attention_mask=attention_mask,
                       decoder_input_ids=input_ids[:, :1] * 0 + cfg.decoder_start_token_id).encoder_last_hidden_state
        cache = KVCache(cfg.decoder_layers, cross=True)
        seq = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
        step_in = seq
        for _ in range(max_new_tokens):
            logits = model(attention_mask=attention_mask, decoder_input_ids=step_in, encoder_outputs=memory,
                           past_key_values=cache).logits[:, -1]
            nxt = _next_token(logits, do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done |= nxt == eos if eos is not None else torch.zeros_like(done)
            if done.all():
                break
            step_in = nxt[:, None]
        model.train(was_training)
        return seq

    T = input_ids.shape[1]
    if cfg.max_seq_len and cfg.position in ("learned", "sinusoidal") and T + max_new_tokens > cfg.max_seq_len:
        raise ConfigError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model's "
                          f"max_seq_len={cfg.max_seq_len}; shorten the prompt or max_new_tokens")
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
    extra = {"prefix_lengths": torch.full((B,), T, device=device)} if cfg.family == "prefix-lm" else {}
    out = model(input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, **extra)
    cache, mask, seq = out.past_key_values, attention_mask, input_ids
    logits = out.logits[:, -1]
    next_pos = positions[:, -1:] + 1
    for i in range(max_new_tokens):
        nxt = _next_token(logits, do_sample, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if eos is not None:
            done |= nxt == eos
        if done.all() or i == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(nxt[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache).logits[:, -1]
        next_pos = next_pos + 1
    model.train(was_training)
    return seq


@torch.no_grad()
def fill_mask(model: Model, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top candidates with probabilities for every mask in `text` ("[MASK]" works with any tokenizer)."""
    if model.mlm_head is None:
        raise ConfigError("fill-mask needs an encoder with an mlm head")
    mask_token = tokenizer.specials.get("mask")
    if mask_token is None:
        raise ConfigError("the tokenizer has no mask token")
    ids = torch.tensor([tokenizer.encode(text.replace("[MASK]", mask_token))])
    where = (ids[0] == tokenizer.mask_id).nonzero().flatten()
    if len(where) == 0:
        raise ConfigError(f"no {mask_token} in the text: {text!r}")
    model.eval()
    probs = F.softmax(model(ids).logits[0, where].float(), dim=-1)
    top = torch.topk(probs, top_k, dim=-1)
    return [[(tokenizer.token(int(i)), float(p)) for p, i in zip(ps, idx)] for ps, idx in zip(top.values, top.indices)]
