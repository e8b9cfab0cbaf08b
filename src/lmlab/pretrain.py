"""Pre-training from raw text: tokenizer, token store, objective, model, trainer, saved folder.

The output folder is a model folder (`lmlab.load(out)` reads it; it holds the tokenizer too) plus
the run's record: run.json (the resolved settings), metrics.jsonl, loss.png and checkpoints/.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lmlab.config import PRESETS, ModelConfig, preset
from lmlab.data.corpus import corpus_files, demo_corpus, read_corpus
from lmlab.data.objectives import Batches, ObjectiveConfig, check_objective, make_objective
from lmlab.data.store import build_store
from lmlab.errors import ConfigError
from lmlab.model import Model
from lmlab.families import FAMILIES
from lmlab.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from lmlab.train.trainer import TrainConfig, Trainer



@dataclass
class PretrainConfig:
    out: str = "runs/run"
    family: str | None = None
    preset: str | None = None
    objective: str | None = None  # default: the family's own (see lmlab.data.objectives)
    data: list[str] = dataclasses.field(default_factory=list)  # empty: the built-in demo corpus
    doc_sep: str = "line"
    field: str = "text"
    skip_bad_lines: bool = False
    tokenizer: str | None = None  # tokenizer.json or folder; default: train one on the data
    tokenizer_kind: str | None = None
    vocab_size: int = 8192
    seq_len: int = 128
    val_fraction: float = 0.02
    mask_prob: float = 0.15
    whole_word: bool = False
    cache_dir: str | None = None
    resume: bool = False
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig overrides, e.g. {"n_layers": 2}
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "PretrainConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        train = d.pop("train", {}) or {}
        tnames = {f.name for f in dataclasses.fields(TrainConfig)}
        bad = sorted(set(train) - tnames)
        if bad:
            raise ConfigError(f"{source}: unknown train setting(s) {', '.join(bad)}; known: {', '.join(sorted(tnames))}")
        if isinstance(d.get("data"), str):
            d["data"] = [d["data"]]
        return cls(**d, train=TrainConfig(**train))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{path}: {where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    return data


def model_config(pc: PretrainConfig, tok: Tokenizer, objective: str) -> ModelConfig:
    """The preset, sized to the tokenizer and sequence length, with heads for the objective and overrides."""
    name = pc.preset or FAMILIES[pc.family].default_preset
    base = preset(name)
    heads: dict[str, Any] = {"heads": ("lm",), "pooler": False}
    if objective == "mlm-nsp":
        heads = {"heads": ("mlm", "nsp"), "pooler": True}
    elif objective == "mlm":
        heads = {"heads": ("mlm",), "pooler": False}
    ids = tok.model_ids()
    start = ids["pad_token_id"] if ids["pad_token_id"] is not None else ids["eos_token_id"]
    # a learned position table only needs seq_len rows; other schemes keep the preset's limit (or more)
    max_len = pc.seq_len if base.position == "learned" else max(pc.seq_len, base.max_seq_len)
    changes: dict[str, Any] = {**heads, **ids, "vocab_size": tok.vocab_size, "decoder_start_token_id": start,
                               "max_seq_len": max_len}
    try:
        cfg = base.replace(**{**changes, **pc.model})
    except TypeError as e:
        raise ConfigError(f"model overrides: {e}") from None
    cfg.check_length(pc.seq_len, f"seq_len={pc.seq_len}")
    return cfg


def prepare(pc: PretrainConfig) -> tuple[PretrainConfig, Tokenizer, Any, ObjectiveConfig]:
    """Resolve family / preset / objective, get the tokenizer and the token store."""
    if pc.preset and pc.preset not in PRESETS:
        raise ConfigError(f"unknown preset {pc.preset!r}; presets: {', '.join(PRESETS)}")
    if pc.preset:
        fam = preset(pc.preset).family
        if pc.family and pc.family != fam:
            raise ConfigError(f"preset {pc.preset!r} is a {fam} model, but family={pc.family!r} was asked for")
        pc.family = fam
    if not pc.family:
        raise ConfigError("give a family (--family encoder|decoder|encoder-decoder|prefix-lm) or a preset")
    if pc.family not in FAMILIES:
        raise ConfigError(f"family {pc.family!r} is unknown; expected one of {', '.join(FAMILIES)}")
    pc.objective = pc.objective or FAMILIES[pc.family].default_objective
    check_objective(pc.objective, pc.family)
    if not pc.data:  # the built-in demo corpus: one Bible chapter per document
        pc.data, pc.doc_sep = [str(demo_corpus("kjv"))], "blank"
    files = corpus_files(pc.data)
    out = Path(pc.out)
    out.mkdir(parents=True, exist_ok=True)
    if pc.resume and (out / "tokenizer.json").is_file():
        tok = load_tokenizer(out)
    elif pc.tokenizer:
        tok = load_tokenizer(pc.tokenizer)
    else:
        kind = pc.tokenizer_kind or FAMILIES[pc.family].tokenizer_kind
        tok = train_tokenizer(kind, read_corpus(files, pc.doc_sep, pc.field, pc.skip_bad_lines), pc.vocab_size)
    tok.save(out)
    cache = Path(pc.cache_dir) if pc.cache_dir else Path(os.environ.get("LMLAB_CACHE", Path.home() / ".cache" / "lmlab"))
    store, _ = build_store(files, tok, cache, pc.doc_sep, pc.field, pc.skip_bad_lines)
    ocfg = ObjectiveConfig(pc.objective, pc.seq_len, mask_prob=pc.mask_prob, whole_word=pc.whole_word)
    return pc, tok, store, ocfg


def pretrain(pc: PretrainConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run pre-training as configured; returns a summary (steps, tokens, validation metrics, paths)."""
    pc.train.validate()
    pc, tok, store, ocfg = prepare(pc)
    cfg = model_config(pc, tok, pc.objective)
    if pc.train.lr is None:
        from lmlab.train.trainer import default_lr

        pc.train.lr = default_lr(cfg)
    splits = store.split(pc.val_fraction, pc.train.seed)
    train_obj = make_objective(ocfg, store, splits["train"], tok, "train")
    val_obj = make_objective(ocfg, store, splits["val"], tok, "val")
    out = Path(pc.out)
    (out / "run.json").write_text(json.dumps({"pretrain": pc.to_dict(), "model": cfg.to_dict(),
                                              "data": {"documents": store.n_docs, "tokens": store.n_tokens,
                                                       "train_documents": len(splits["train"]),
                                                       "val_documents": len(splits["val"])}}, indent=2) + "\n")
    torch.manual_seed(pc.train.seed)
    model = Model(cfg)
    train = Batches(train_obj, pc.train.batch_size, pc.train.seed)
    val = Batches(val_obj, pc.train.batch_size, pc.train.seed, shuffle=False).fixed(pc.train.eval_batches)
    trainer = Trainer(model, train, val, pc.train, out, on_event)
    resumed = trainer.resume() if pc.resume else False
    summary = trainer.fit()
    model.save_pretrained(out)
    tok.save(out)
    from lmlab.plots import expert_load, loss_curves

    png = loss_curves(out / "metrics.jsonl", out / "loss.png")
    routing_png = expert_load(out / "metrics.jsonl", out / "expert_load.png")
    return {**summary, "resumed": resumed, "out": str(out), "plot": str(png) if png else None,
            "routing_plot": str(routing_png) if routing_png else None,
            "objective": pc.objective, "family": pc.family, "parameters": model.num_parameters()}
