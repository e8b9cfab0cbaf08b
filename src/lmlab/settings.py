"""The settings of a run, as dataclasses: training (TrainConfig), pre-training (PretrainConfig) and
fine-tuning (FinetuneConfig). Each field's metadata carries its help text and choices, and the command
line builds its flags from them (lmlab.cli.flags), so a new setting is one field here.

This module imports no torch: `lmlab --help` stays quick.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.config import option
from lmlab.errors import ConfigError, DataError
from lmlab.families import FAMILY_NAMES, OBJECTIVES, TOKENIZER_KINDS

SCHEDULES = ("cosine", "linear", "constant", "warmup-stable-decay")
TRACKER_NAMES = ("tensorboard", "mlflow", "trackio", "wandb")  # lmlab.train.trackers
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_HELP = (
    "auto: bf16 autocast on a GPU with native bf16 or a CPU with AMX / AVX-512-bf16, fp32 elsewhere; "
    "fp16: float16 autocast with a gradient scaler (for GPUs without native bf16, such as T4 and V100)"
)
PARALLEL = ("none", "ddp", "fsdp")
CHECKPOINT_FORMATS = ("auto", "full", "sharded")


@dataclass
class TrainConfig:
    max_steps: int | None = option(None, "stop after this many optimizer steps")
    max_tokens: int | None = option(None, "stop after this many training tokens")
    max_minutes: float | None = option(None, "stop after this many minutes")
    batch_size: int = option(16, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float | None = option(
        None, "peak learning rate (default: 5e-4 for post-LN models such as BERT, 1e-3 otherwise)"
    )
    min_lr_ratio: float = option(0.1, "the schedule's final rate as a fraction of the peak")
    warmup_steps: int = option(100, "linear warm-up steps")
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=SCHEDULES)
    decay_fraction: float = option(0.2, "warmup-stable-decay: the final fraction of the steps that decays")
    weight_decay: float = option(0.1, "AdamW weight decay (not on biases, norms, embeddings)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the gradient norm to this")
    eval_every: int = option(200, "validate every N steps")
    eval_batches: int = option(20, "validation batches")
    save_every: int = option(500, "checkpoint every N steps")
    keep_checkpoints: int = option(2, "checkpoints kept")
    checkpoint_format: str = option(
        "auto",
        "full: one safetensors folder, gathered on rank 0; sharded: torch.distributed.checkpoint, every rank "
        "writes its shard and any world size resumes it (lmlab convert makes a model folder of it); "
        "auto: sharded under fsdp or expert parallelism, full otherwise",
        choices=CHECKPOINT_FORMATS,
    )
    async_save: bool = option(False, "write sharded checkpoints in the background while training goes on")
    log_every: int = option(10, "write a metrics record every N steps")
    precision: str = option("auto", PRECISION_HELP, choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the model")
    seed: int = option(0, "seed of the initialisation and the data order")
    tensorboard: bool = option(False, "also write TensorBoard logs (the same as --report-to tensorboard)")
    report_to: list[str] | None = option(
        None,
        "experiment trackers that receive the settings and every metrics record, offline: tensorboard, "
        "mlflow (RUN/mlflow.db), trackio (its local store), wandb (offline run in RUN/wandb); each an extra",
        choices=TRACKER_NAMES,
    )
    early_stopping: int | None = option(
        None, "stop after this many evaluations in a row without a better best_metric (needs evaluation)"
    )
    best_metric: str | None = option(
        None,
        "keep the weights of the evaluation best by this metric (loss and ppl: lower is better; others: "
        "higher) and end the run with them (transformers' load_best_model_at_end)",
    )
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    parallel: str = option(
        "none",
        "ddp: data-parallel over the processes torchrun starts (batch_size is the global micro-batch)",
        choices=PARALLEL,
    )
    collective_timeout: float = option(600.0, "seconds a collective may wait for the other processes")
    moe_stats: str = option(
        "global",
        "several processes: the MoE load-balancing loss and routing statistics from every rank's tokens "
        "(global, as one process computes them) or each rank's own (local)",
        choices=("global", "local"),
    )
    expert_parallel: int = option(
        1,
        "shard every MoE layer's experts over groups of this many processes (with --parallel ddp or fsdp; it "
        "divides the number of processes)",
    )

    def validate(self) -> None:
        if not (self.max_steps or self.max_tokens or self.max_minutes):
            raise ConfigError("give a budget: max_steps, max_tokens or max_minutes")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is unknown; expected one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is unknown; expected one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "log_every", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"parallel {self.parallel!r} is unknown; expected one of {', '.join(PARALLEL)}")
        if self.expert_parallel < 1:
            raise ConfigError(f"expert_parallel must be at least 1, got {self.expert_parallel}")
        if self.expert_parallel > 1 and self.parallel == "none":
            raise ConfigError(f"expert_parallel {self.expert_parallel} runs with --parallel ddp or fsdp, not none")
        if self.moe_stats not in ("global", "local"):
            raise ConfigError(f"moe_stats must be global or local, got {self.moe_stats!r}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ConfigError(
                f"checkpoint_format {self.checkpoint_format!r} is unknown; expected one of {', '.join(CHECKPOINT_FORMATS)}"
            )
        if self.async_save and self.resolved_checkpoint_format() != "sharded":
            raise ConfigError(
                "async_save writes sharded checkpoints: add --checkpoint-format sharded "
                f"(this run's checkpoints are {self.resolved_checkpoint_format()})"
            )
        if self.precision == "fp16" and self.parallel == "fsdp":
            raise ConfigError(
                "precision fp16 trains with a gradient scaler, which lmlab does not run under --parallel fsdp; "
                "use bf16 or fp32 there"
            )
        if self.collective_timeout <= 0:
            raise ConfigError(f"collective_timeout must be positive, got {self.collective_timeout}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        for name in self.report_to or ():
            if name not in TRACKER_NAMES:
                raise ConfigError(f"report_to {name!r} is unknown; trackers: {', '.join(TRACKER_NAMES)}")
        if self.early_stopping is not None:
            if self.early_stopping < 1:
                raise ConfigError(
                    f"early_stopping (the patience, in evaluations) must be at least 1, got {self.early_stopping}"
                )
            if not self.best_metric:
                raise ConfigError("early_stopping watches an evaluation metric: give best_metric too")

    def trackers(self) -> list[str]:
        """The trackers this run reports to (--tensorboard is --report-to tensorboard)."""
        names = list(self.report_to or ())
        return (["tensorboard"] if self.tensorboard and "tensorboard" not in names else []) + names

    def resolved_checkpoint_format(self) -> str:
        """full or sharded: what `auto` means for this run's parallel mode."""
        if self.checkpoint_format != "auto":
            return self.checkpoint_format
        return "sharded" if self.parallel == "fsdp" or self.expert_parallel > 1 else "full"


def _check_names(cls: type, d: Any, source: str, what: str = "setting") -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of {what}s, found {type(d).__name__}")
    odd = [k for k in d if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"{source}: {what} names are text; found {odd[0]!r} ({type(odd[0]).__name__})")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown {what}(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")


@dataclass
class PretrainConfig:
    out: str = option("runs/run", "output folder")
    family: str | None = option(None, "model family (default: the preset's)", choices=FAMILY_NAMES)
    preset: str | None = option(None, "model preset (default: the family's tiny preset; see `lmlab presets`)")
    objective: str | None = option(None, "pre-training objective (default: the family's)", choices=OBJECTIVES)
    data: list[str] = option(
        list,
        "text / jsonl files or folders (.gz too), Parquet / Arrow files, datasets folders (save_to_disk), "
        "BUILDER:PATTERN (csv, json, text, parquet, arrow); default: the built-in demo corpus",
    )
    doc_sep: str = option("line", "one document per line, or blank-line separated", choices=("line", "blank"))
    field: str = option(
        "text", "the JSONL field or table column (Parquet, Arrow, CSV, datasets folder) holding the text"
    )
    skip_bad_lines: bool = option(False, "skip (and count) lines that are not UTF-8 / JSON")
    tokenizer: str | None = option(None, "tokenizer.json or folder (default: train one on the data)")
    tokenizer_kind: str | None = option(
        None, "kind of tokenizer to train (default: the family's)", choices=TOKENIZER_KINDS
    )
    vocab_size: int = option(8192, "vocabulary of a trained tokenizer")
    seq_len: int = option(128, "tokens per training example")
    val_fraction: float = option(0.02, "documents held out for validation")
    mask_prob: float = option(0.15, "masked-LM masking rate")
    whole_word: bool = option(False, "whole-word masking (MLM)")
    doc_mask: bool | None = option(
        None,
        "packed documents attend only within themselves, positions restarting per document (default: on for "
        "every objective but mlm-nsp, whose sentence pairs see each other; recorded in run.json)",
    )
    cache_dir: str | None = option(None, "where token stores are cached (default: ~/.cache/lmlab)")
    stream: bool = option(
        False,
        "read, tokenize and pack the corpus on the fly in a worker process while training (no token store, no "
        "pass first; every 1/val_fraction-th document held out); a tokenizer is trained on the first 20,000 "
        "documents unless --tokenizer is given",
    )
    stream_workers: int = option(
        1, "--stream: processes that tokenize (each reads the corpus; the batches do not depend on their number)"
    )
    resume: bool = option(False, "continue from the newest checkpoint in --out")
    model: dict[str, Any] = option(dict, "ModelConfig overrides, e.g. {n_layers: 2}", flag=False)
    train: TrainConfig = option(TrainConfig, "training settings", flag=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> PretrainConfig:
        d = dict(d)
        _check_names(cls, d, source)
        train = d.pop("train", {}) or {}
        _check_names(TrainConfig, train, source, "train setting")
        if isinstance(d.get("data"), str):
            d["data"] = [d["data"]]
        return cls(**d, train=TrainConfig(**train))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FinetuneConfig:
    task: str = option("", "the task (lmlab.tasks)")
    model: str = option("", "pre-trained folder (lmlab or transformers layout) with its tokenizer")
    train: str = option("", "training file in the task's format")
    out: str = option("", "output folder")
    eval: str | None = option(None, "evaluation file of the same format")
    epochs: float = option(3.0, "passes over the training file")
    lr: float = option(5e-5, "peak learning rate")
    batch_size: int = option(16, "examples per batch")
    max_len: int | None = option(
        None,
        "tokens per example (QA: the window; seq2seq: the encoder's source, or the whole sequence of a decoder); "
        "default: 128, or the model's max_seq_len where that is smaller",
    )
    text_columns: list[str] | None = option(None, "classification text column(s) (default: found by name)")
    pooling: str | None = option(
        None,
        "classification: what the classifier reads (default: [CLS] for encoders, last token otherwise)",
        choices=("cls", "mean", "last"),
    )
    label_column: str | None = option(None, "classification label column (default: found by name)")
    doc_stride: int | None = option(
        None, "QA: tokens shared by neighbouring context windows (default: 32, or a quarter of --max-len if smaller)"
    )
    max_answer_len: int = option(30, "QA: longest answer in tokens")
    source_field: str = option("source", "seq2seq: the JSONL field / table column of the input text")
    target_field: str = option("target", "seq2seq: the JSONL field / table column of the output text")
    source_prefix: str = option("", 'seq2seq: text put before every source, e.g. "translate: " for T5')
    separator: str = option("\n\n###\n\n", "seq2seq, decoders and prefix-LMs: the text between source and target")
    max_target_len: int | None = option(
        None,
        "seq2seq: target tokens (end token included); also the generation limit (default: 64, or what fits "
        "the model: half of --max-len for decoders and prefix-LMs)",
    )
    truncate: bool = option(
        False, "seq2seq / chat: cut over-long sources, targets and conversations (and say how many) instead of failing"
    )
    beams: int = option(1, "seq2seq evaluation and prediction: beam search with this many beams (1: greedy)")
    chat_template: str | None = option(
        None, "chat: a Jinja chat template file (default: the tokenizer's own, else lmlab's ChatML template)"
    )
    max_steps: int | None = option(None, "optimizer steps (default: --epochs passes over the training file)")
    grad_accum: int = option(1, "micro-batches of --batch-size per optimizer step")
    lr_schedule: str = option("linear", "learning-rate schedule after warm-up (to 0)", choices=SCHEDULES)
    warmup_ratio: float = option(0.1, "fraction of the steps spent warming up")
    weight_decay: float = option(0.01, "AdamW weight decay")
    gradient_checkpointing: bool = option(
        False, "recompute each block's activations in the backward: less memory for long inputs, ~1 more forward"
    )
    eval_every: int | None = option(
        None, "evaluate every N steps (default: at the end; with --early-stopping: once an epoch)"
    )
    save_every: int | None = option(None, "checkpoint every N steps (default: half the run)")
    early_stopping: int | None = option(
        None, "stop after this many evaluations in a row without a better --metric; the best model is the result"
    )
    metric: str | None = option(
        None,
        "the evaluation metric --early-stopping and --keep-best watch (default: the task's: accuracy, f1, bleu, "
        "loss; pearson for regression)",
    )
    keep_best: bool = option(
        False, "save the best evaluation's model rather than the last one (on with --early-stopping)"
    )
    report_to: list[str] | None = option(
        None, "experiment trackers (offline): tensorboard, mlflow, trackio, wandb", choices=TRACKER_NAMES
    )
    parallel: str = option(
        "none",
        "several processes (torchrun, or --nproc): ddp or fsdp; --batch-size stays the global batch",
        choices=PARALLEL,
    )
    method: str = option(
        "full",
        "full: train every weight; lora / dora: train adapters (PEFT, the peft extra) and the task head only, "
        "saved in PEFT's format",
        choices=("full", "lora", "dora"),
    )
    lora_r: int = option(8, "lora / dora: the adapters' rank")
    lora_alpha: float = option(16.0, "lora / dora: the adapters' scale numerator (scale = alpha / r)")
    lora_dropout: float = option(0.0, "lora / dora: dropout on the adapters' input")
    lora_targets: list[str] | None = option(
        None, "lora / dora: layer kinds to adapt: qkv, out, up, down, experts, head (default: qkv out up down)"
    )
    merge: bool = option(False, "lora / dora: also write the merged model (a plain folder) to OUT/merged")
    seed: int = option(0, "seed of the new head and the data order")
    resume: bool = option(False, "continue from the newest checkpoint in --out")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    precision: str = option("auto", PRECISION_HELP, choices=PRECISIONS)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> FinetuneConfig:
        _check_names(cls, d, source)
        fc = cls(**d)
        if fc.precision not in PRECISIONS:
            raise ConfigError(
                f"{source}: precision {fc.precision!r} is unknown; expected one of {', '.join(PRECISIONS)}"
            )
        missing = [f"--{n.replace('_', '-')}" for n in ("task", "model", "train", "out") if not getattr(fc, n)]
        if missing:
            raise ConfigError(f"{source}: fine-tuning needs {', '.join(missing)} (as flags or in the YAML file)")
        for flag, value in (("--early-stopping", fc.early_stopping), ("--keep-best", fc.keep_best or None)):
            if value is not None and not fc.eval:
                raise ConfigError(f"{source}: {flag} compares evaluations: give an evaluation file (--eval FILE)")
        for name in ("grad_accum", "max_steps", "eval_every", "save_every", "early_stopping"):
            value = getattr(fc, name)
            if value is not None and value < 1:
                raise ConfigError(f"{source}: --{name.replace('_', '-')} must be at least 1, got {value}")
        return fc


# ---- resuming --------------------------------------------------------------------------------------
# What a resumed run may change: its budget, logging, evaluation, checkpointing and where it runs (a
# checkpoint resumes at any world size). Every other setting is the run's own, read from its folder.
RESUMABLE_TRAIN = frozenset(
    {
        "max_steps",
        "max_tokens",
        "max_minutes",
        "eval_every",
        "eval_batches",
        "save_every",
        "keep_checkpoints",
        "checkpoint_format",
        "async_save",
        "log_every",
        "tensorboard",
        "report_to",
        "device",
        "parallel",
        "collective_timeout",
        "expert_parallel",
    }
)
RESUMABLE_PRETRAIN = frozenset({"out", "resume", "cache_dir"})
RESUMABLE_FINETUNE = frozenset(
    {"out", "resume", "epochs", "max_steps", "eval", "device", "eval_every", "save_every", "report_to", "parallel"}
)
RUN_RECORD = "run.json"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):  # the same file named two ways
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b))
    return False


def _merge_resumed(
    recorded: dict[str, Any],
    given: dict[str, Any],
    may_change: frozenset[str],
    where: str,
    changeable: frozenset[str],
    label: Any = _flag,
) -> None:
    """Put `given` over `recorded` in place: a setting outside `may_change` must equal the recorded one
    (the error names it by `label` and lists `changeable`, every setting a resumed run may change)."""
    for name, value in given.items():
        if name in may_change:
            recorded[name] = value
        elif not _same(value, recorded.get(name)):
            raise ConfigError(
                f"{label(name)} {value!r} would change the run being resumed ({where} has {recorded.get(name)!r}); "
                f"a resumed run may change only {', '.join(_flag(n) for n in sorted(changeable - {'resume', 'out'}))}"
            )


def _keep_precision(record: dict[str, Any], recorded: dict[str, Any], given: dict[str, Any]) -> None:
    """A resumed run computes in the precision it trained in, which `auto` given on top means too: auto
    would choose again, on this machine, and a run started in fp32 then resumed in bf16 is not exact."""
    if _trained_in(record):
        recorded["precision"] = _trained_in(record)
    if given.get("precision") == "auto":
        del given["precision"]


def _trained_in(record: dict[str, Any]) -> str | None:
    """The precision a recorded run trained in (run.json keeps the trainer's choice with its reason)."""
    choice = record.get("precision")
    return choice.get("precision") if isinstance(choice, dict) else choice


def read_run_record(out: str | os.PathLike[str], key: str) -> dict[str, Any]:
    """run.json of the run in `out` (written when the run started), checked to be a `key` run."""
    import json

    path = Path(out) / RUN_RECORD
    if not path.is_file():
        raise ConfigError(f"{path}: not found; --resume continues a run that `lmlab {key}` started in {out}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable run record ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get(key), dict):
        raise ConfigError(f"{path}: not the record of an `lmlab {key}` run (no {key!r} settings)")
    return record


def resumed_pretrain_config(out: str | os.PathLike[str], given: dict[str, Any] | None = None) -> PretrainConfig:
    """The settings of the pre-training run in `out`, to continue it: every setting from its run.json,
    then `given` (settings as PretrainConfig.from_dict takes them) on top, which may change only the
    budget, logging, evaluation, checkpointing and where it runs; precision is the one it trained in."""
    record = read_run_record(out, "pretrain")
    where = str(Path(out) / RUN_RECORD)
    settings = dict(record["pretrain"])
    settings.setdefault("doc_mask", False)  # a run recorded before document masking had none
    train, model = dict(settings.get("train") or {}), dict(settings.get("model") or {})
    given = dict(given or {})
    given_train, given_model = dict(given.pop("train", None) or {}), given.pop("model", None) or {}
    _keep_precision(record, train, given_train)
    changeable = RESUMABLE_PRETRAIN | RESUMABLE_TRAIN
    _merge_resumed(settings, given, RESUMABLE_PRETRAIN, where, changeable)
    _merge_resumed(train, given_train, RESUMABLE_TRAIN, where, changeable)
    _merge_resumed(model, given_model, frozenset(), where, changeable, lambda n: f"model setting {n}")
    settings["train"], settings["resume"], settings["out"] = train, True, str(out)
    return PretrainConfig.from_dict(settings, where)


def resumed_finetune_config(out: str | os.PathLike[str], given: dict[str, Any] | None = None) -> FinetuneConfig:
    """The settings of the fine-tuning run in `out`, to continue it, as `resumed_pretrain_config` does."""
    record = read_run_record(out, "finetune")
    settings, given = dict(record["finetune"]), dict(given or {})
    _keep_precision(record, settings, given)
    _merge_resumed(settings, given, RESUMABLE_FINETUNE, str(Path(out) / RUN_RECORD), RESUMABLE_FINETUNE)
    settings["resume"], settings["out"] = True, str(out)
    return FinetuneConfig.from_dict(settings, str(Path(out) / RUN_RECORD))


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML mapping of settings, or a ConfigError naming the file and line."""
    import yaml

    from lmlab.data.corpus import read_utf8

    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(read_utf8(path))
    except DataError as e:  # not UTF-8
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{path}: {where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:  # an empty file (or only comments): every setting its default
        return {}
    if not isinstance(data, dict):  # a lone 0, "" or [] is not an empty config
        raise ConfigError(f"{path}: expected a mapping of settings, found {type(data).__name__} {data!r:.40}")
    return data
