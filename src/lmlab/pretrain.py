"""Pre-training from raw text: tokenizer, token store, objective, model, trainer, saved folder.

The output folder is a model folder (`lmlab.load(out)` reads it; it holds the tokenizer too) plus
the run's record: run.json (the resolved settings), metrics.jsonl, loss.png and checkpoints/.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmlab.config import PRESETS, ModelConfig, preset
from lmlab.data.corpus import corpus_files, demo_corpus, read_corpus
from lmlab.data.objectives import Batches, ObjectiveConfig, check_objective, make_objective
from lmlab.data.store import build_store
from lmlab.errors import ConfigError
from lmlab.families import FAMILIES
from lmlab.io import save
from lmlab.model import Model
from lmlab.settings import RUN_RECORD, PretrainConfig, TrainConfig, load_yaml  # noqa: F401  (re-exported)
from lmlab.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from lmlab.train import distributed
from lmlab.train.trainer import Trainer, precision_choice, resolve_device

STREAM_TOKENIZER_DOCS = 20_000  # what a --stream run trains its tokenizer on: the corpus's first documents


def resolved_names(pc: PretrainConfig) -> tuple[str, str, str]:
    """(family, preset, objective) the run will use, as `prepare` resolves them ("?" where a setting is
    missing or unknown: `pretrain` itself refuses those with the reason)."""
    family = pc.family or (preset(pc.preset).family if pc.preset in PRESETS else "?")
    spec = FAMILIES.get(family)
    return (
        family,
        pc.preset or (spec.default_preset if spec else "?"),
        pc.objective or (spec.default_objective if spec else "?"),
    )


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
    changes: dict[str, Any] = {
        **heads,
        **ids,
        "vocab_size": tok.vocab_size,
        "decoder_start_token_id": start,
        "max_seq_len": max_len,
    }
    try:
        cfg = base.replace(**{**changes, **pc.model})
    except TypeError as e:
        raise ConfigError(f"model overrides: {e}") from None
    cfg.check_length(pc.seq_len, f"seq_len={pc.seq_len}")
    return cfg


def prepare(pc: PretrainConfig, write: bool = True) -> tuple[PretrainConfig, Tokenizer, Any, ObjectiveConfig]:
    """Resolve family / preset / objective, get the tokenizer and the token store (`write`: save the
    tokenizer to the output folder; the other ranks of a multi-process run read rank 0's)."""
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
    pc.preset = pc.preset or FAMILIES[pc.family].default_preset  # run.json records what the run used
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
        kind = pc.tokenizer_kind = pc.tokenizer_kind or FAMILIES[pc.family].tokenizer_kind
        docs = read_corpus(files, pc.doc_sep, pc.field, pc.skip_bad_lines)
        if pc.stream:  # no pass over the corpus: the tokenizer learns from its start
            docs = itertools.islice(docs, STREAM_TOKENIZER_DOCS)
        tok = train_tokenizer(kind, docs, pc.vocab_size)
    if pc.doc_mask is None:  # on wherever documents are packed and can be told apart (run.json records it)
        pc.doc_mask = pc.objective != "mlm-nsp" and (tok.id_of("eos") is not None or tok.id_of("sep") is not None)
    if write:
        tok.save(out)
    cache = (
        Path(pc.cache_dir) if pc.cache_dir else Path(os.environ.get("LMLAB_CACHE", Path.home() / ".cache" / "lmlab"))
    )
    store = None if pc.stream else build_store(files, tok, cache, pc.doc_sep, pc.field, pc.skip_bad_lines)[0]
    ocfg = ObjectiveConfig(
        pc.objective, pc.seq_len, mask_prob=pc.mask_prob, whole_word=pc.whole_word, doc_mask=pc.doc_mask
    )
    return pc, tok, store, ocfg


def pretrain(pc: PretrainConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run pre-training as configured; returns a summary (steps, tokens, validation metrics, paths).

    Under torchrun with `train.parallel` ddp, every process calls this (lmlab.train.distributed): rank 0
    trains the tokenizer and builds the token store first, the others then read both."""
    pc.train.validate()
    world = distributed.setup(pc.train.parallel, resolve_device(pc.train.device), pc.train.collective_timeout)
    try:
        return _pretrain(pc, on_event, world)
    finally:
        distributed.teardown()


def _pretrain(
    pc: PretrainConfig, on_event: Callable[[str, dict[str, Any]], None] | None, world: distributed.World
) -> dict[str, Any]:
    distributed.check_batch(pc.train.batch_size, world)
    if world.main:
        pc, tok, store, ocfg = prepare(pc)
    distributed.barrier(world)
    if not world.main:  # rank 0's tokenizer and token store, from its output folder and the cache
        pc.tokenizer = pc.out
        pc, tok, store, ocfg = prepare(pc, write=False)
    cfg = model_config(pc, tok, pc.objective)
    if pc.train.lr is None:
        from lmlab.train.trainer import default_lr

        pc.train.lr = default_lr(cfg)
    if pc.stream:
        train, val, data = _streamed(pc, tok, ocfg)
    else:
        splits = store.split(pc.val_fraction, pc.train.seed)
        train, val = batches(ocfg, store, splits, tok, pc.train.batch_size, pc.train.seed, pc.train.eval_batches)
        data = {
            "documents": store.n_docs,
            "tokens": store.n_tokens,
            "train_documents": len(splits["train"]),
            "val_documents": len(splits["val"]),
        }
    out = Path(pc.out)
    model = _build_model(pc, cfg, world)
    if world.size > 1 and pc.train.moe_stats == "global":
        distributed.use_global_routing_stats(model, world)
    if world.size > 1:  # router noise as one process draws it for the global batch
        distributed.share_router_noise(model, world)
    trainer = Trainer(model, train, val, pc.train, out, on_event, world=world)
    if world.main:
        record = {
            "pretrain": pc.to_dict(),
            "model": cfg.to_dict(),
            "data": data,
            "precision": trainer.precision,
            "distributed": distributed.describe(world, pc.train.parallel),
        }
        (out / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    resumed = trainer.resume() if pc.resume else False
    try:
        summary = trainer.fit()
    finally:
        if pc.stream:
            train.close()  # the streaming worker
    summary["precision"] = trainer.precision
    whole = trainer.whole_state()[0]
    distributed.barrier(world)
    if not world.main:
        return {**summary, "resumed": resumed, "out": str(out), "rank": world.rank}
    save(model, out, state=whole)
    tok.save(out)
    from lmlab.plots import expert_load, loss_curves

    png = loss_curves(out / "metrics.jsonl", out / "loss.png")
    routing_png = expert_load(out / "metrics.jsonl", out / "expert_load.png")
    return {
        **summary,
        "resumed": resumed,
        "out": str(out),
        "plot": str(png) if png else None,
        "routing_plot": str(routing_png) if routing_png else None,
        "objective": pc.objective,
        "family": pc.family,
        "parameters": _parameters(cfg),  # `model` may hold this rank's experts only
    }


def batches(
    ocfg: ObjectiveConfig,
    store: Any,
    splits: dict[str, Any],
    tok: Tokenizer,
    batch_size: int,
    seed: int,
    eval_batches: int,
    val_seed: int | None = None,
) -> tuple[Batches, list[dict[str, torch.Tensor]]]:
    """The objective's training batches over the training documents (order and randomness from `seed`)
    and its fixed validation batches over the held-out ones (from `val_seed`, default `seed`): what
    `lmlab pretrain` and each `lmlab compare` unit train on."""
    train_obj = make_objective(ocfg, store, splits["train"], tok, "train")
    val_obj = make_objective(ocfg, store, splits["val"], tok, "val")
    val_seed = seed if val_seed is None else val_seed
    return (
        Batches(train_obj, batch_size, seed),
        Batches(val_obj, batch_size, val_seed, shuffle=False).fixed(eval_batches),
    )


def _streamed(pc: PretrainConfig, tok: Tokenizer, ocfg: ObjectiveConfig) -> tuple[Any, list, dict[str, Any]]:
    """Training batches streamed from the corpus files, and validation batches from the held-out documents."""
    from lmlab.data.objectives import separator_of, stream_objective
    from lmlab.data.streaming import StreamBatches, StreamSpec

    objective = stream_objective(ocfg, tok)
    spec = StreamSpec(
        files=[str(f) for f in corpus_files(pc.data)],
        doc_sep=pc.doc_sep,
        field=pc.field,
        skip_bad_lines=pc.skip_bad_lines,
        tokenizer=pc.out if (Path(pc.out) / "tokenizer.json").is_file() else pc.tokenizer,
        separator=separator_of(tok, ocfg),
        window=objective.window,
        seed=pc.train.seed,
        val_every=max(2, round(1 / pc.val_fraction)) if pc.val_fraction > 0 else 0,
    )
    train = StreamBatches(objective, spec, pc.train.batch_size, pc.train.seed, workers=pc.stream_workers)
    val = train.fixed(pc.train.eval_batches)
    return train, val, {"streamed": True, "held_out": f"every {spec.val_every}th document", "files": spec.files}


def _parameters(cfg: ModelConfig) -> int:
    """The whole model's parameter count (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return Model(cfg).num_parameters()


def _build_model(pc: PretrainConfig, cfg: ModelConfig, world: distributed.World) -> Model:
    """The model to train, placed on the run's processes (lmlab.train.parallel): FSDP2's sharded one or
    the plain one (its experts split with expert parallelism), from the same initial weights at every
    world size."""
    from lmlab.train.parallel import ParallelDims, parallelize

    device = distributed.device_for(resolve_device(pc.train.device), world)
    bf16 = precision_choice(pc.train.precision, device)["precision"] == "bf16"
    dims = ParallelDims.of(pc.train.parallel, world.size, pc.train.expert_parallel)
    return parallelize(cfg, dims, world, device, pc.train.seed, torch.bfloat16 if bf16 else None).model
