"""Fine-tuning a pre-trained folder for any registered task (lmlab.tasks), and prediction with the result.

The pre-trained model keeps its backbone; its pre-training heads are replaced by the task's head
(`classify`: encoders pool [CLS] through the pooler, decoders and prefix-LMs take the last real
token, encoder-decoders the decoder's state at the input's final </s> as BART does; `tag` and `span`:
a linear layer on every token state, the encoder's for encoder-decoders), visible in the saved config
(`heads`, `classifier_pooling`). Every family that `lmlab.load` reads can be fine-tuned. Training runs
on the pre-training Trainer (checkpoints, exact resume, progress, metrics.jsonl). What each task reads
and how it is scored is documented in its module.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmlab.data.objectives import Batches
from lmlab.errors import ConfigError
from lmlab.families import FAMILIES
from lmlab.model import Model
from lmlab.settings import RUN_RECORD, FinetuneConfig
from lmlab.tasks import REGISTRY, get_task
from lmlab.tasks.base import pad_id
from lmlab.tasks.classify import read_table  # noqa: F401  (the readers, where users found them before)
from lmlab.tasks.ner import read_conll  # noqa: F401
from lmlab.tasks.qa import read_squad  # noqa: F401


# ---- the model ----------------------------------------------------------------------------------
def task_model(base: Model, task: str, labels: list[str] | None, pooling: str | None = None) -> Model:
    """The pre-trained backbone with the task's head in place of the pre-training heads. Classification
    pools [CLS] through the pooler for encoders and the last real token otherwise (for encoder-decoders,
    the decoder's state at the final </s>, as BART does), unless `pooling` ("cls", "mean", "last")
    says otherwise. Encoder-decoders tag and extract spans from their encoder's states; prefix-LMs
    see their whole input bidirectionally (see `Model.forward`)."""
    cfg = base.config
    head = get_task(task).head if task in REGISTRY else task
    if head == "lm":  # generation tasks train the pre-trained lm head itself
        if base.lm_head is None:
            raise ConfigError(f"the {task} task needs a model with an lm head; this one has heads {cfg.heads}")
        return base
    num_labels = len(labels) if labels else 1
    changes: dict[str, Any] = {"heads": (head,), "num_labels": num_labels, "labels": labels}
    if head == "classify":
        how = pooling or cfg.spec.pooling
        # encoders: [CLS] through the (pre-trained) pooler; encoder-decoders: BART's head, dense + tanh
        # on the last state, then the classifier (so a fine-tuned BART exports as BartForSequenceClassification)
        changes["pooler"] = (not cfg.spec.has_decoder and how == "cls") or cfg.spec.seq2seq
        changes["classifier_pooling"] = how
    else:
        changes["pooler"] = False
    model = Model(cfg.replace(**changes))
    own = model.state_dict()
    kept = {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape}
    missing = set(own) - set(kept)
    new_parts = ("classifier.", "tagger.", "span_head.", "pooler.", "head_drop")
    if any(not k.startswith(new_parts) for k in missing):
        bad = sorted(k for k in missing if not k.startswith(new_parts))
        raise ConfigError(f"the pre-trained model lacks backbone weights {bad[:3]}")
    model.load_state_dict(kept, strict=False)
    return model


# ---- the run ------------------------------------------------------------------------------------
DEFAULT_MAX_LEN, DEFAULT_MAX_TARGET_LEN, DEFAULT_DOC_STRIDE = 128, 64, 32


def fit_lengths(fc: FinetuneConfig, cfg: Any) -> list[str]:
    """Fill the length settings left at their defaults (None) with values the model can take; returns
    a note for each that had to be smaller than the usual default. Values given are kept (and checked)."""
    notes = []
    if fc.max_len is None:
        fc.max_len, note = cfg.fit_default(DEFAULT_MAX_LEN, "--max-len")
        notes += [note] if note else []
    # (setting, usual default, the most that fits, why, the task it matters to)
    rest = [("doc_stride", DEFAULT_DOC_STRIDE, fc.max_len // 4, f"a quarter of --max-len {fc.max_len}", ("qa",))]
    if cfg.spec.seq2seq:  # the decoder's own positions hold the target
        room = cfg.max_seq_len if cfg.has_absolute_positions else DEFAULT_MAX_TARGET_LEN
        why = f"the model's max_seq_len of {cfg.max_seq_len}"
    else:  # a decoder reads source, separator and target in one window: half of it stays the source's
        room, why = fc.max_len // 2, f"half of --max-len {fc.max_len}"
    rest.append(("max_target_len", DEFAULT_MAX_TARGET_LEN, room, why, ("seq2seq", "chat")))
    for name, default, most, why, tasks in rest:
        if getattr(fc, name) is None:
            setattr(fc, name, min(default, most))
            if most < default and fc.task in tasks:
                notes.append(f"--{name.replace('_', '-')} is {most} here, {why}, not the usual default of {default}")
    return notes


def finetune(fc: FinetuneConfig, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Fine-tune `fc.model` on `fc.train`; evaluate on `fc.eval`; save model, tokenizer and metrics to `fc.out`.

    Under torchrun with `fc.parallel` ddp or fsdp every process calls this: each reads the files and the
    model alike, trains on its rows of every global batch, and rank 0 alone evaluates (all ranks, under
    fsdp) and saves; the result is the one-process run's."""
    from lmlab.train import distributed
    from lmlab.train.trainer import resolve_device

    world = distributed.setup(fc.parallel, resolve_device(fc.device), 600.0)
    try:
        return _finetune(fc, on_event if world.main else None, world)
    finally:
        distributed.teardown()


def _steps(fc: FinetuneConfig, examples: int) -> tuple[int, int]:
    """(optimizer steps of the run, steps in one pass over the training file)."""
    per_epoch = max(1, math.ceil(examples / (fc.batch_size * fc.grad_accum)))
    return fc.max_steps or max(1, math.ceil(fc.epochs * per_epoch)), per_epoch


def _finetune(fc: FinetuneConfig, on_event: Callable[[str, dict[str, Any]], None] | None, world: Any) -> dict[str, Any]:
    from lmlab.io import load, save
    from lmlab.tokenizer import load_tokenizer
    from lmlab.train import distributed
    from lmlab.train.parallel import ParallelDims, parallelize
    from lmlab.train.trainer import TrainConfig, Trainer, precision_choice, resolve_device

    def say(text: str) -> None:
        if on_event is not None:
            on_event("note", {"text": text})

    task = get_task(fc.task)
    base = load(fc.model)
    tok = load_tokenizer(fc.model)
    cfg = base.config
    if fc.task not in cfg.spec.tasks:
        able = [name for name, spec in FAMILIES.items() if fc.task in spec.tasks]
        raise ConfigError(
            f"{fc.model}: the {cfg.family} model cannot be fine-tuned for {fc.task} (families that can: {', '.join(able)})"
        )
    distributed.check_batch(fc.batch_size, world)
    if fc.report_to:
        from lmlab.train.trackers import check

        check(fc.report_to)
    notes = fit_lengths(fc, cfg)
    cfg.check_length(fc.max_len, f"--max-len {fc.max_len}")
    setup = task.setup(fc, tok, cfg)
    for note in notes + setup.notes:
        say(note)
    info: dict[str, Any] = {"task": fc.task, **setup.info}
    labels, train_rows, eval_rows, evaluate_fn = setup.labels, setup.train_rows, setup.eval_rows, setup.evaluate
    torch.manual_seed(fc.seed)  # the new head's initialisation, reproducible from --seed (alike on every rank)
    model = task_model(base, fc.task, labels, fc.pooling)
    whole: tuple[str, ...] = ()  # layers an adapter run trains whole
    if tok.vocab_size > model.config.vocab_size:  # the task added tokens (chat templates)
        added = tok.vocab_size - model.config.vocab_size
        model.resize_token_embeddings(tok.vocab_size)
        if fc.method != "full":  # their rows have to learn: the table trains whole, as PEFT does for new tokens
            names = {n for n, _ in model.named_parameters()}
            whole = ("tok_embed",) + (("lm_head",) if "lm_head.weight" in names else ())
            say(
                f"{fc.method}: the embedding table ({', '.join(whole)}) trains whole for the {added} added tokens "
                "and is saved with the adapter (PEFT's modules_to_save)"
            )
    if fc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    lora = None
    if fc.method != "full":
        from lmlab.adapters import add_lora

        if ParallelDims.of(fc.parallel, world.size).fsdp:
            raise ConfigError(f"--method {fc.method} runs on one process or under --parallel ddp, not fsdp")
        lora = add_lora(model, fc.method, fc.lora_r, fc.lora_alpha, fc.lora_dropout, fc.lora_targets, whole)
    elif fc.merge:
        raise ConfigError("--merge merges adapters: it goes with --method lora or dora")
    pad, segments = pad_id(tok), model.config.type_vocab_size > 0
    train = Batches(task.data(train_rows, pad, segments), fc.batch_size, fc.seed)
    val = (
        Batches(task.data(eval_rows, pad, segments), fc.batch_size, fc.seed, shuffle=False).fixed(
            math.ceil(len(eval_rows) / fc.batch_size)
        )
        if eval_rows
        else None
    )
    steps, per_epoch = _steps(fc, len(train_rows))
    keep_best = fc.keep_best or fc.early_stopping is not None
    metric = fc.metric or setup.metric or task.metric
    tc = TrainConfig(
        max_steps=steps,
        batch_size=fc.batch_size,
        grad_accum=fc.grad_accum,
        lr=fc.lr,
        warmup_steps=int(fc.warmup_ratio * steps),
        schedule=fc.lr_schedule,
        min_lr_ratio=0.0,
        weight_decay=fc.weight_decay,
        eval_every=fc.eval_every or (per_epoch if fc.early_stopping else max(steps, 1)),
        save_every=fc.save_every or max(steps // 2, 1),
        log_every=max(1, min(50, steps // 20)),
        seed=fc.seed,
        device=fc.device,
        precision=fc.precision,
        parallel=fc.parallel,
        report_to=fc.report_to,
        early_stopping=fc.early_stopping,
        best_metric=metric if keep_best else None,
    )
    tc.validate()
    device = distributed.device_for(resolve_device(fc.device), world)
    bf16 = precision_choice(fc.precision, device)["precision"] == "bf16"
    dims = ParallelDims.of(fc.parallel, world.size)
    model = parallelize(model, dims, world, device, fc.seed, torch.bfloat16 if bf16 else None).model
    out = Path(fc.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(fc.seed)
    from lmlab.adapters import parameter_counts

    counts = parameter_counts(model)
    if fc.method != "full":  # what the adapters leave to train
        trained = f"{fc.method}: {counts['trainable_params']:,} of {counts['total_params']:,} parameters train"
        setup.notes.append(trained)
        say(trained)
    settings = {"finetune": dataclasses.asdict(fc), "train": dataclasses.asdict(tc)}
    trainer = Trainer(model, train, val, tc, out, on_event, evaluate_fn=evaluate_fn, world=world, settings=settings)
    if world.main:
        record = {
            "finetune": dataclasses.asdict(fc),  # what --resume continues with
            "precision": trainer.precision,
            "distributed": distributed.describe(world, fc.parallel),
        }
        (out / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    resumed = trainer.resume() if fc.resume else False
    summary = trainer.fit()
    evaluation = summary["val"]
    if keep_best and trainer.best is not None:
        evaluation = trainer.restore_best() or evaluation
    whole = trainer.whole_state()[0]
    distributed.barrier(world)
    if not world.main:
        return {"steps": summary["steps"], "rank": world.rank}
    if lora is None:
        save(model, out, state=whole)
    else:
        from lmlab.adapters import save_adapter

        save_adapter(model, lora, out, str(Path(fc.model).resolve()))
    tok.save(out)
    if setup.files is not None:
        setup.files(out)
    result = {
        "task": fc.task,
        "train_examples": len(train_rows),
        "eval_examples": len(eval_rows),
        "steps": summary["steps"],
        "minutes": summary["minutes"],
        "resumed": resumed,
        "eval": evaluation,
        "labels": labels,
        "notes": setup.notes,
        "method": fc.method,
        "processes": world.size,
        **counts,
    }
    if keep_best:
        result.update(best=trainer.best, stopped_early=trainer.stopped_early)
    record = {**info, "config": dataclasses.asdict(fc), "model_config": model.config.to_dict()}
    (out / "finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "eval_results.json").write_text(json.dumps(result, indent=2) + "\n")
    if fc.merge:
        merge(out, out / "merged")
    return result


def merge(adapter: str | Path, out: str | Path) -> Path:
    """Write an adapter folder's model, merged, as a plain fine-tuned folder (weights, tokenizer,
    finetune.json): it exports to Hugging Face and serves like any other."""
    import shutil

    from lmlab.adapters import is_adapter
    from lmlab.io import load
    from lmlab.tokenizer import load_tokenizer

    adapter, out = Path(adapter), Path(out)
    if not is_adapter(adapter):
        raise ConfigError(f"{adapter}: not an adapter folder (no adapter_config.json)")
    model = load(adapter)
    model.save_pretrained(out)
    load_tokenizer(adapter).save(out)
    for name in ("finetune.json", "eval_results.json"):
        if (adapter / name).is_file():
            shutil.copyfile(adapter / name, out / name)
    return out


# ---- prediction ---------------------------------------------------------------------------------
@torch.no_grad()
def predict(model_dir: str, data: str, batch_size: int = 32, max_len: int | None = None) -> list[dict[str, Any]]:
    """Predictions of a fine-tuned folder on a file of the task's format (labels, if present, are ignored)."""
    from lmlab.io import load
    from lmlab.tokenizer import load_tokenizer

    info_path = Path(model_dir) / "finetune.json"
    if not info_path.is_file():
        raise ConfigError(f"{model_dir}: not a fine-tuned folder (no finetune.json); fine-tune with `lmlab finetune`")
    info = json.loads(info_path.read_text())
    model, tok = load(model_dir), load_tokenizer(model_dir)
    return get_task(info["task"]).predict(model, tok, info, data, batch_size, max_len or info["config"]["max_len"])
