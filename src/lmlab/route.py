"""`lmlab route`: which experts took each token of a text, and with what weight, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmlab.errors import LmlabError


@dataclass
class TokenRoute:
    token: str
    layers: list[list[tuple[str, float]]]  # per MoE layer: (expert name, weight), heaviest first


def route_text(model_dir: str, text: str, top: int | None = None) -> tuple[list[str], list[TokenRoute]]:
    """Run `text` through the model and read every MoE layer's routing. Returns the layer names and, per
    token, the experts (and weights) that took it. Encoder-decoder models get the text on both sides
    (teacher-forced decoder). `top` limits the experts shown per layer (default: all with weight > 0)."""
    from lmlab.io import load
    from lmlab.tokenizer import load_tokenizer

    model = load(model_dir).eval()
    if model.config.ffn != "moe":
        raise LmlabError(f"{model_dir}: the model has no Mixture-of-Experts layers (ffn={model.config.ffn!r})")
    tok = load_tokenizer(model_dir)
    ids = tok.encode(text)
    if not ids:
        raise LmlabError("the text is empty after tokenization")
    if len(ids) > model.config.max_seq_len:
        raise LmlabError(
            f"the text is {len(ids)} tokens, longer than the model's max_seq_len={model.config.max_seq_len}"
        )
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=x, labels=x) if model.config.spec.seq2seq else model(input_ids=x)
    names, rows = [], [TokenRoute(tok.token(i), []) for i in ids]
    for record in out.routing or ():
        layer = model.get_submodule(record.layer)
        names.append(record.layer)
        weights = record.expert_weights()  # (T, E); an encoder-decoder's decoder sees the shifted text: same length
        for t, row in enumerate(rows):
            order = weights[t].argsort(descending=True).tolist()
            picked = [(layer.expert_name(e), float(weights[t, e])) for e in order if weights[t, e] > 0]
            row.layers.append(picked[:top] if top else picked)
    return names, rows
