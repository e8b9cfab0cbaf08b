"""Loading, saving and converting model folders: the user's calls, over lmlab.checkpoint (the formats)
and lmlab.hf (Hugging Face's layouts).

`load` reads lmlab's folders, transformers folders (see lmlab.hf.ARCHITECTURES), training checkpoints
(full or sharded) and Hub ids, and can ask for what decodes fastest here (`dtype="auto"`,
`quantize="int8"`); `save` writes either format; `convert` rewrites a folder in the other one,
tokenizer included.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from lmlab.checkpoint import load_config, load_folder, read_lmlab_weights, read_weights, resolve, save_folder  # noqa: F401  (load_config, read_weights: re-exported)
from lmlab.errors import CheckpointError
from lmlab.model import Model

log = logging.getLogger(__name__)


def load(
    path_or_id: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
) -> Model:
    """Load an lmlab folder, a transformers folder (see lmlab.hf.ARCHITECTURES), a training checkpoint,
    a LoRA / DoRA adapter folder of `lmlab finetune --method lora` (PEFT's format; merged into its base
    model, lmlab.adapters) or a Hub id.

    dtype: None keeps the weights as saved (float32); a torch.dtype, "float32" or "bfloat16"; or "auto",
    what decodes fastest on this machine: bfloat16 where its matmuls are native (CUDA GPUs with bf16,
    CPUs with AMX / AVX-512-bf16), float32 elsewhere, as `lmlab generate --dtype auto` picks
    (transformers' dtype="auto" takes the saved dtype instead; lmlab saves float32). quantize="int8"
    swaps the linear layers for int8 ones, "fp16" for float16-weight ones (lmlab.quantize; float32
    activations, CPU only). What was chosen, and why, is `model.decoding` when dtype or quantize is
    given by name."""
    choice = None
    if isinstance(dtype, str) or quantize is not None:  # checked before any weight is read
        from lmlab.quantize import decoding_choice

        choice = decoding_choice("float32" if dtype is None else dtype, quantize, device=device or "cpu")
        dtype = getattr(torch, choice["dtype"])
    from lmlab.adapters import is_adapter, load_adapter

    local = Path(path_or_id)
    model = load_adapter(local) if local.is_dir() and is_adapter(local) else load_folder(path_or_id, Model)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    if choice is not None:
        if choice["quantize"] != "none":
            from lmlab.quantize import quantize_linear

            quantize_linear(model.float(), choice["quantize"])
        model.decoding = choice
    return model


def save(
    model: Model, path: str | os.PathLike[str], format: str = "lmlab", state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write `model` to a folder: format="lmlab" (any model) or "hf" (transformers' Auto classes read it).
    `state`: the weights to write instead of the model's own (a sharded model's, gathered whole)."""
    return save_folder(model, path, format, state)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str = "hf") -> dict[str, Any]:
    """Rewrite a model folder in the other layout ("hf" or "lmlab"), tokenizer included, so the result is
    complete: transformers' AutoTokenizer and Auto model classes (and lm-evaluation-harness) read an
    "hf" folder as it is. `src` may be a training checkpoint, full or sharded (its tokenizer is the
    run's). Returns what was written."""
    from lmlab.tokenizer import load_tokenizer

    model = load(src)
    folder = save(model, dst, format=to)
    tok_folder = resolve(src)
    if tok_folder.parent.name == "checkpoints" and not (tok_folder / "tokenizer.json").is_file():
        tok_folder = tok_folder.parent.parent  # a training checkpoint: the run folder holds the tokenizer
    try:
        tok = load_tokenizer(tok_folder)
    except CheckpointError as e:  # a weights-only folder: say so rather than write half a folder silently
        log.warning("%s: no tokenizer written (%s)", folder, e)
        tok = None
    if tok is not None:
        tok.save(folder)
    return {
        "out": folder,
        "format": to,
        "tokenizer": tok is not None,
        "family": model.config.family,
        "heads": model.config.heads,
    }


def load_weights_into(model: Model, folder: str | os.PathLike[str]) -> None:
    """Copy an lmlab folder's weights into an existing model of the same config (keeps parameter identity)."""
    state = read_lmlab_weights(folder, model.config)
    expected = model.state_dict()
    for k, v in state.items():
        if k not in expected or expected[k].shape != v.shape:
            raise CheckpointError(f"{folder}: tensor {k!r} does not fit the model")
    model.load_state_dict(state)
