"""Model folders: config.json plus weights, in lmlab's own format or Hugging Face's.

A folder's config.json carries `"lmlab_format"` when lmlab wrote it; anything else is read as a
transformers folder (lmlab.hf converts it). Weights are read from safetensors (one file or a sharded
index), from a sharded training checkpoint's dcp/ (lmlab.checkpoint.dcp), or from a pytorch_model.bin
only with `torch.load(weights_only=True)`: lmlab never unpickles objects. A folder that does not hold
what it claims is refused, naming the file and the problem, before its tensors are read or built.

This module knows the formats, not the model class: `load_folder` builds whatever `build(config)`
returns (lmlab.model.Model), so the model layer can sit above it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmlab import hf
from lmlab.checkpoint.manifest import MANIFEST, verify_checkpoint
from lmlab.config import ModelConfig
from lmlab.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)
# 1: the first format. 2: MoE layers made of parts (router.gate, experts.w_up, zero_compute, Soft MoE's slots)
FORMAT_VERSION = 2
CONFIG = "config.json"
MAX_LAYERS = 10_000  # more than any model has; a config.json asking for more is refused before building


def _v1_to_v2(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """MoE tensors moved into the layer's parts; every other key is unchanged."""
    renames = {
        "router.weight": "slots.weight" if cfg.moe_router == "soft" else "router.gate.weight",
        "noise.weight": "router.noise.weight",
        "gate_residual.weight": "router.residual.weight",
        "w_up": "experts.w_up",
        "w_down": "experts.w_down",
        "const_vec": "zero_compute.const_vec",
        "const_gate.weight": "zero_compute.const_gate.weight",
    }
    out = {}
    for key, value in state.items():
        head, sep, tail = key.partition(".ffn.")
        out[f"{head}.ffn.{renames.get(tail, tail)}" if sep and cfg.ffn == "moe" else key] = value
    return out


# version -> the function that brings a state dict of that version to the next one
MIGRATIONS = {1: _v1_to_v2}


def migrate(state: dict[str, torch.Tensor], cfg: ModelConfig, version: int, source: str) -> dict[str, torch.Tensor]:
    """A state dict saved in format `version`, brought to FORMAT_VERSION key by key (nothing is dropped)."""
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: lmlab_format {version!r} is not one this lmlab reads (1 to "
            f"{FORMAT_VERSION}); a newer lmlab wrote it, upgrade to load it"
        )
    for v in range(version, FORMAT_VERSION):
        state = MIGRATIONS[v](state, cfg)
    return state


def resolve(path_or_id: str | os.PathLike[str]) -> Path:
    """A local folder, or a Hugging Face Hub id fetched into the local cache when the hub is reachable."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a model folder (config.json + weights), found a file")
        return path
    name = str(path_or_id)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"{name}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{name}: no such folder, and huggingface_hub is not installed to fetch it as a "
            "Hub id (pip install huggingface_hub)"
        ) from None
    try:
        return Path(
            snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "pytorch_model.bin"])
        )
    except Exception as e:  # network errors, unknown repo, offline mode: all end the same way for the user
        raise CheckpointError(
            f"{name}: no such folder, and fetching it from the Hugging Face Hub failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). If this machine is offline, download the model "
            "elsewhere and pass its folder"
        ) from None


def read_config(folder: Path) -> dict[str, Any]:
    file = folder / CONFIG
    if not file.is_file():
        raise CheckpointError(
            f"{folder}: no {CONFIG}; a model folder needs config.json plus model.safetensors "
            f"(found: {', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'})"
        )
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(raw).__name__}")
    return raw


def load_config(name_or_folder: str | os.PathLike[str]) -> ModelConfig:
    """A preset's config, or the config of a model folder (lmlab or transformers layout), without
    reading any weights."""
    from lmlab.config import PRESETS, preset

    if str(name_or_folder) in PRESETS:
        return preset(str(name_or_folder))
    folder = resolve(name_or_folder)
    raw = read_config(folder)
    if "lmlab_format" in raw:
        return ModelConfig.from_dict(raw.get("model", {}), source=str(folder / CONFIG))
    return hf.config_from_hf(raw, str(folder / CONFIG))


def _header(file: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes a safetensors file declares, read from its header alone (the
    library checks the header's length, dtypes and offsets against the file before any tensor exists)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _load_safetensors(file: Path, expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; with `expected` (name -> shape), a file that declares another
    shape for a known name is refused from its header, before its tensors are read."""
    if expected is not None:
        for k, shape in _header(file).items():
            if k in expected and tuple(expected[k]) != shape:
                raise CheckpointError(
                    f"{file}: tensor {k!r} has shape {shape}, but config.json implies {tuple(expected[k])}"
                )
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _inside(folder: Path, name: Any, source: Path) -> Path:
    """`folder / name` for a file an index names, refused when it would lie outside the folder
    (an absolute path, `..`, or a symbolic link that leads out)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{source}: names the file {name!r}, which is not a file name inside {folder}")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(f"{source}: {name!r} leads outside {folder} (to {path.resolve()})")
    return path


def read_weights(folder: Path, expected: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The folder's tensors and the name of the file(s) they came from. `expected` (name -> shape):
    safetensors files that declare other shapes are refused before their tensors are read."""
    single, index, binary = (
        folder / "model.safetensors",
        folder / "model.safetensors.index.json",
        folder / "pytorch_model.bin",
    )
    if single.is_file():
        return _load_safetensors(single, expected), str(single)
    if (folder / "dcp" / ".metadata").is_file():  # a sharded training checkpoint (lmlab.train.sharded)
        from lmlab.checkpoint.dcp import read_model_weights

        return read_model_weights(folder), str(folder / "dcp")
    if index.is_file():
        try:
            names = json.loads(index.read_text())["weight_map"].values()
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (expected a 'weight_map' object): {e}") from None
        shards = {str(_inside(folder, name, index)) for name in names}  # every name checked before any read
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(shards):
            state.update(_load_safetensors(Path(shard), expected))
        return state, str(index)
    if binary.is_file():
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{binary}: not a weights-only checkpoint: it pickles objects other than tensors, which lmlab "
                f"refuses to unpickle because unpickling can run code ({str(e).splitlines()[0]}). Re-save it as "
                "safetensors from a trusted environment"
            ) from None
        except Exception as e:
            raise CheckpointError(f"{binary}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{binary}: expected a dict of tensors (a state dict), found {type(state).__name__}")
        return state, str(binary)
    raise CheckpointError(
        f"{folder}: no weights; expected model.safetensors, model.safetensors.index.json, pytorch_model.bin "
        "or a sharded checkpoint's dcp/"
    )


def _build(cfg: ModelConfig, source: str, build: Callable[[ModelConfig], nn.Module]) -> nn.Module:
    """The model on the meta device (nothing allocated before the real weights arrive), refused when
    config.json describes more than this machine's available memory could hold: first from a lower
    bound (embeddings, attention and a dense FFN per layer), so that absurd sizes are refused before
    even the meta build, then from the meta model's exact tensors."""
    from lmlab.runtime import available_memory

    layers = cfg.n_layers + (cfg.decoder_layers if cfg.spec.seq2seq else 0)
    if layers > MAX_LAYERS:
        raise CheckpointError(f"{source}: {layers:,} layers; lmlab builds at most {MAX_LAYERS:,}")
    have = available_memory()

    def check(need: int, what: str, sizes: str) -> None:
        if have is not None and need > have:
            raise CheckpointError(
                f"{source}: describes a model of {what} ({need / 2**30:,.1f} GiB), more than the "
                f"{have / 2**30:,.1f} GiB of memory available ({sizes})"
            )

    floor = 4 * (cfg.vocab_size * cfg.d_model + layers * (4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff))
    sizes = f"vocab_size={cfg.vocab_size:,}, d_model={cfg.d_model:,}, d_ff={cfg.d_ff:,}, layers={layers:,}"
    check(floor, "at least this size", sizes)
    with torch.device("meta"):
        model = build(cfg)
    need = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if cfg.position == "sinusoidal":  # a table built at load time, not saved
        need += cfg.max_seq_len * cfg.d_model * 4
    check(
        need, f"{sum(p.numel() for p in model.parameters()):,} parameters", f"{sizes}, max_seq_len={cfg.max_seq_len:,}"
    )
    return model


def _adopt(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    for k, v in state.items():
        if k not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {k!r}; the folder's config.json does not describe it")
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)}, but config.json implies {tuple(expected[k].shape)}"
            )
    # tensors read from a file can start anywhere in its buffer; BLAS kernels pick their code path by
    # alignment, so a misaligned weight computes (slightly) differently from the one that was saved
    state = {k: v.clone() if v.data_ptr() % 64 else v for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    model.init_buffers()  # buffers that are not saved (RoPE frequencies, sinusoidal tables) were built on meta
    return model


def load_folder(path_or_id: str | os.PathLike[str], build: Callable[[ModelConfig], nn.Module]) -> nn.Module:
    """The model a folder (lmlab or transformers layout, a training checkpoint, or a Hub id) holds, built
    by `build(config)` on the meta device and given the folder's weights; in eval mode, as saved."""
    folder = resolve(path_or_id)
    raw = read_config(folder)
    cfg_source = str(folder / CONFIG)
    if (folder / MANIFEST).is_file():  # a training checkpoint: its files as they were written
        verify_checkpoint(folder)
    if "lmlab_format" in raw:
        try:
            cfg = ModelConfig.from_dict(raw.get("model", {}), source=cfg_source)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{cfg_source}: {e}") from None
        model = _build(cfg, cfg_source, build)
        current = raw["lmlab_format"] == FORMAT_VERSION  # older formats name some tensors otherwise
        state, source = read_weights(folder, {k: v.shape for k, v in model.state_dict().items()} if current else None)
        state = migrate(state, cfg, raw["lmlab_format"], cfg_source)
        model = _adopt(model, state, source)
    else:
        cfg = hf.config_from_hf(raw, cfg_source)
        model = _build(cfg, cfg_source, build)
        state, source = read_weights(folder)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        converted, unexpected = hf.hf_to_lmlab(state, cfg, raw["model_type"], expected, source)
        if unexpected:
            log.warning(
                "%s: %d tensor(s) not used by %s, e.g. %s",
                source,
                len(unexpected),
                (raw.get("architectures") or ["?"])[0],
                unexpected[:3],
            )
        model = _adopt(model, converted, source)
    model.eval()
    return model


def read_lmlab_weights(folder: str | os.PathLike[str], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An lmlab folder's (or training checkpoint's) whole weights, for a model of config `cfg`: refused
    when its config.json describes another model; brought to the current format."""
    folder = Path(folder)
    raw = read_config(folder)
    if raw.get("model") != cfg.to_dict():
        raise CheckpointError(f"{folder / CONFIG}: describes a different model than the one being restored")
    state, _ = read_weights(folder)
    return migrate(state, cfg, raw.get("lmlab_format"), str(folder / CONFIG))


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temporary name, fsync, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def lmlab_config(cfg: ModelConfig) -> dict[str, Any]:
    """What an lmlab folder's config.json holds."""
    return {"lmlab_format": FORMAT_VERSION, "model": cfg.to_dict()}


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """config.json, written atomically."""
    _write_json(Path(folder) / CONFIG, config)


def save_folder(
    model: nn.Module, path: str | os.PathLike[str], format: str = "lmlab", state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write `model` to a folder: format="lmlab" (any model) or "hf" (transformers' Auto classes read it).
    `state`: the weights to write instead of the model's own (a sharded model's, gathered whole)."""
    folder = Path(path)
    cfg = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if state is None else state).items()}
    if format == "lmlab":
        config = lmlab_config(cfg)
    elif format == "hf":
        model_type = hf.hf_model_type(cfg)  # raises ConfigError with the reason when there is none
        config = hf.to_hf_config(cfg, model_type, hf.architecture(cfg, model_type))
        config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        state = hf.lmlab_to_hf(state, cfg, model_type)
    else:
        raise ConfigError(f"save format {format!r} is unknown; expected 'lmlab' or 'hf'")
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_config(folder, config)
    return folder
