"""LoRA and DoRA adapters through PEFT (the `peft` extra): which layers take them, training only them and
the new task head, PEFT's own folder format, and loading such a folder as one merged model.

lmlab's linear layers are `nn.Linear`s, so PEFT's custom-model path applies as it is: `add_lora` injects
the adapters into the model in place (`peft.inject_adapter_in_model`), the model stays an lmlab Model
for the trainer, and only the adapters and the task head keep `requires_grad`. `save_adapter` writes
what `PeftModel.save_pretrained` writes (adapter_config.json with the base folder's path, and
adapter_model.safetensors with the adapters and, as `modules_to_save`, the new head), so
`peft.PeftModel.from_pretrained(task_model, folder)` reads it. `load_adapter` (what `lmlab.load` does
with such a folder) rebuilds the task model from the base folder, lets PEFT read the adapter and merges
it (`merge_and_unload`): the result is a plain model, whose logits equal the adapted model's.

Targets are named by kind: qkv (self-attention's fused projection, cross-attention's q and kv), out
(attention outputs), up and down (the dense FFN), experts (every expert of an MoE layer, through PEFT's
`target_parameters`: one adapter per expert), head (a separate lm head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.errors import CheckpointError, ConfigError

KINDS: dict[str, tuple[str, ...]] = {
    "qkv": ("attn.qkv", "cross_attn.q", "cross_attn.kv"),
    "out": ("attn.out", "cross_attn.out"),
    "up": ("ffn.up",),
    "down": ("ffn.down",),
    "experts": ("ffn.experts.w_up", "ffn.experts.w_down"),
    "head": ("lm_head",),
}
DEFAULT_TARGETS = ("qkv", "out", "up", "down")
TASK_HEADS = ("classifier", "tagger", "span_head", "pooler")  # new heads: trained whole, saved with the adapter
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError("--method lora / dora needs peft: pip install 'lmlab[peft]' (or pip install peft)") from None
    return peft


def _ends(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def targets_of(model: nn.Module, kinds: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(module names, parameter names) the kinds name in `model`; an error naming what exists when a
    kind is unknown or matches nothing."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"--lora-targets: unknown kind(s) {', '.join(unknown)}; kinds: {', '.join(KINDS)}")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    params = [n for n, _ in model.named_parameters()]
    present = {
        k: [n for n in (params if k == "experts" else linears) if any(_ends(n, s) for s in KINDS[k])] for k in KINDS
    }
    missing = [k for k in kinds if not present[k]]
    if missing:
        have = [k for k, names in present.items() if names]
        raise ConfigError(
            f"--lora-targets {', '.join(missing)} match(es) no layer of this model; the kinds it has: {', '.join(have)}"
        )
    modules = [n for k in kinds if k != "experts" for n in present[k]]
    return modules, (present["experts"] if "experts" in kinds else [])


def add_lora(
    model: nn.Module,
    method: str = "lora",
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    kinds: list[str] | tuple[str, ...] | None = None,
    whole: tuple[str, ...] = (),
) -> Any:
    """Inject LoRA (method "lora") or DoRA ("dora") adapters into `model` in place, freeze everything
    else but the task head and the modules named in `whole` (an embedding table that gained rows for new
    tokens: PEFT's recipe for added tokens); returns the peft.LoraConfig, with the head and `whole` as
    modules_to_save (saved whole beside the adapters)."""
    peft = _peft()
    if method not in ("lora", "dora"):
        raise ConfigError(f"--method {method!r}: expected full, lora or dora")
    if r < 1:
        raise ConfigError(f"--lora-r must be at least 1, got {r}")
    modules, params = targets_of(model, tuple(kinds or DEFAULT_TARGETS))
    if params and method == "dora":
        raise ConfigError(
            "--method dora: PEFT's DoRA does not take MoE expert parameters; use lora, or leave out experts"
        )
    heads = sorted({n.split(".")[0] for n, _ in model.named_parameters() if n.split(".")[0] in TASK_HEADS + whole})
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,  # a list even when empty: PEFT reads a model_type (transformers only) for None
        target_parameters=params or None,
        use_dora=method == "dora",
    )
    peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or name.split(".")[0] in heads
    config.modules_to_save = heads or None
    return config


def parameter_counts(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total}


def save_adapter(model: nn.Module, config: Any, folder: str | Path, base: str) -> None:
    """PEFT's folder: adapter_config.json (base_model_name_or_path = `base`) and adapter_model.safetensors
    (the adapters, and the task head whole, under PEFT's `base_model.model.` names)."""
    peft = _peft()
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {f"base_model.model.{k}": v for k, v in peft.get_peft_model_state_dict(model).items()}
    for name, p in model.state_dict().items():
        if name.split(".")[0] in (config.modules_to_save or []):
            state[f"base_model.model.{name}"] = p
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS))
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _task_base(folder: Path) -> nn.Module:
    """The task model an adapter folder was trained on, before its adapters: the config in finetune.json,
    the base folder's weights where they fit (a new head and new token rows keep a seeded init: the
    adapter's modules_to_save replace them)."""
    from lmlab.checkpoint import load_folder
    from lmlab.config import ModelConfig
    from lmlab.model import Model

    adapter = json.loads((folder / ADAPTER_CONFIG).read_text())
    info_path = folder / "finetune.json"
    if not info_path.is_file() or "model_config" not in json.loads(info_path.read_text()):
        raise CheckpointError(f"{folder}: an adapter folder without lmlab's finetune.json (model_config) to build on")
    base_dir = adapter.get("base_model_name_or_path")
    if not base_dir or not Path(base_dir).exists():
        raise CheckpointError(f"{folder}: the adapter's base model {base_dir!r} is not there (adapter_config.json)")
    cfg = ModelConfig.from_dict(json.loads(info_path.read_text())["model_config"])
    with torch.random.fork_rng(devices=[]):  # a seeded init, leaving the caller's random stream alone
        torch.manual_seed(0)
        model = Model(cfg)
    own = model.state_dict()
    base = load_folder(base_dir, Model)
    kept = {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(kept, strict=False)
    return model


def load_adapter(folder: str | Path) -> nn.Module:
    """The model an adapter folder describes, merged: the task model rebuilt on the base folder's weights
    (its config is in finetune.json), PEFT's adapter read and merged into it."""
    peft = _peft()
    folder = Path(folder)
    model = _task_base(folder)
    with torch.no_grad():
        merged = peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return merged.eval()


def export_hf(folder: str | Path, out: str | Path) -> dict[str, Any]:
    """An adapter folder for transformers + PEFT: OUT/base is the task model before its adapters in
    transformers' layout (with the tokenizer), OUT the same adapter under transformers' module names, so
    `PeftModel.from_pretrained(AutoModelFor...from_pretrained(OUT/base), OUT)` computes what
    `lmlab.load(folder)` does. A fused qkv adapter becomes one adapter per projection (the same A, B's
    rows split), GPT-2's Conv1D layers take the same A and B (fan_in_fan_out), modules saved whole map
    tensor by tensor; a tied embedding table saved whole is saved as the output head too."""
    from safetensors.torch import load_file, save_file

    from lmlab import hf
    from lmlab.checkpoint import save_folder
    from lmlab.tokenizer import load_tokenizer

    _peft()
    folder, out = Path(folder), Path(out)
    if not is_adapter(folder):
        raise ConfigError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG})")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("use_dora"):
        raise ConfigError(
            f"{folder}: a DoRA adapter; only LoRA adapters convert to transformers names (merge it instead)"
        )
    if config.get("target_parameters"):
        raise ConfigError(
            f"{folder}: adapters on MoE expert parameters do not convert to transformers names (merge it)"
        )
    model = _task_base(folder)
    cfg = model.config
    model_type = hf.hf_model_type(cfg)
    table = {e.ours: e for e in hf.weight_table(cfg, model_type)}
    weights = {k.removeprefix("base_model.model."): v for k, v in load_file(folder / ADAPTER_WEIGHTS).items()}
    state, targets, transposed = {}, [], False
    for name in sorted(k.removesuffix(".lora_A.weight") for k in weights if k.endswith(".lora_A.weight")):
        a, b = weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"]
        entry = table.get(f"{name}.weight")
        if entry is None or entry.op not in ("copy", "T", "cat"):
            raise ConfigError(f"{folder}: the adapted layer {name} has no plain transformers counterpart")
        transposed |= entry.op == "T"
        rows = entry.sizes if entry.op == "cat" else (b.shape[0],)
        for hf_name, part in zip(entry.hf, b.split(list(rows), dim=0)):
            module = hf_name.removesuffix(".weight")
            state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = a, part.contiguous()
            targets.append(module)
    whole = config.get("modules_to_save") or []
    full = model.state_dict()
    full.update({k: v for k, v in weights.items() if k.split(".")[0] in whole})
    converted = hf.lmlab_to_hf(full, cfg, model_type)
    saved = []
    for entry in table.values():
        if entry.ours.split(".")[0] in whole:
            for hf_name in entry.hf:
                state[hf_name] = converted[hf_name]
                saved.append(hf_name.rsplit(".", 1)[0])
    if "tok_embed" in whole and cfg.tie_embeddings and "lm" in cfg.heads:  # transformers' head is its own module
        head = "lm_head"
        state[f"{head}.weight"] = full["tok_embed.weight"]
        saved.append(head)
    base = out / "base"
    save_folder(model, base, format="hf")
    load_tokenizer(folder).save(base)
    save_file({f"base_model.model.{k}": v.clone().contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS))
    load_tokenizer(folder).save(out)
    config.update(
        base_model_name_or_path=str(base.resolve()),
        target_modules=sorted(set(targets)),
        modules_to_save=sorted(set(saved)) or None,
        fan_in_fan_out=transposed,
    )
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return {
        "out": out,
        "base": base,
        "target_modules": config["target_modules"],
        "modules_to_save": config["modules_to_save"],
    }
