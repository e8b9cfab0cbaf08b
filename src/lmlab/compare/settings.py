"""The settings of a comparison (`lmlab compare`), as one dataclass the command line and YAML files fill.

This module imports no torch: `lmlab --help` stays quick.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from lmlab.config import option
from lmlab.errors import ConfigError
from lmlab.families import FAMILY_NAMES
from lmlab.settings import PRECISION_HELP, PRECISIONS, TRACKER_NAMES, _check_names

BUDGETS = ("flops", "tokens", "minutes")
RAY_FILES = ("auto", "shared", "ship")
# settings that change where and how fast units run, never what they compute: out of the fingerprint
PLACEMENT = ("out", "cache_dir", "report_to", "ray", "unit_cpus", "unit_gpus", "ray_files", "profile", "plan_only")

# MoE variants a contender can take, each beside its dense twin: ModelConfig changes on the shared shape.
# Their FFN experts are as wide as the dense FFN unless noted, so active FLOPs match the twin's (Switch,
# GShard) or the twin's FFN width is split into finer experts (DeepSeekMoE).
MOE_VARIANTS: dict[str, dict[str, Any]] = {
    # Switch Transformer: top-1, capacity factor 1.25 with dropping, load-balancing loss, z-loss
    "switch": dict(moe_experts=8, moe_top_k=1, moe_capacity_factor=1.25, moe_every=2, moe_z_weight=0.001),
    # the same router without any balancing term: the control for the load-balancing claim
    "switch-nobalance": dict(
        moe_experts=8, moe_top_k=1, moe_capacity_factor=1.25, moe_every=2, moe_aux_weight=0.0, moe_z_weight=0.0
    ),
    # GShard: top-2, capacity factor 1.0
    "gshard": dict(moe_experts=8, moe_top_k=2, moe_capacity_factor=1.0, moe_every=2),
    # Mixtral: top-2 in every layer, dropless
    "mixtral": dict(moe_experts=8, moe_top_k=2),
    # DeepSeekMoE: 4x finer experts, 3 routed + 1 shared = the dense FFN's width, first layer dense
    "deepseekmoe": dict(
        moe_experts=16, moe_top_k=3, moe_shared_experts=1, moe_renormalize=False, moe_first_dense=1, moe_d_ff_div=4
    ),
}


@dataclass(frozen=True)
class Profile:
    """Named shapes and budget for `lmlab compare --profile NAME`: what it sets, where it is meant to run,
    how long it takes there, and which verdicts it is meant to settle (docs/compare-profiles.md)."""

    settings: dict[str, Any]
    machine: str
    wall_time: str
    settles: str


# GPT-2 small's body (12 layers, 768 wide, 12 heads, FFN 3072, 1,024 positions) with its recipe (lr 6e-4,
# init std 0.02, BERT's 15% masking) for every family
_GPT2_SMALL: dict[str, Any] = dict(
    d_model=768,
    n_layers=12,
    n_heads=12,
    d_ff=3072,
    seq_len=1024,
    vocab_size=32768,
    batch_size=32,
    init_std=0.02,
    lr=6e-4,
    warmup_steps=200,
    mask_prob=0.15,
    eval_windows=256,
    questions=1000,
    max_task_examples=4000,
    finetune_lr=5e-5,
    finetune_epochs=3.0,
)
PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        settings={},
        machine="a laptop or one CPU node (the defaults: 64 wide, 2 layers, 6.4e12 training FLOPs per unit)",
        wall_time="26 minutes measured for the 8 units on 2 cores of an AMD EPYC (make demo; docs/benchmarks.md)",
        settles="the decoder against the Kneser-Ney trigram; the encoder's masked-token accuracy against the "
        "unigram; which family fine-tunes best on the built-in tasks",
    ),
    "gpu": Profile(
        settings={**_GPT2_SMALL, "budget": "flops", "budget_value": 6e16},
        machine="one GPU with bf16 (A100, H100, H200), --unit-gpus 1; text of 100M tokens or more (--data): the "
        "built-in corpus (about 1M tokens) would be repeated about 70 times",
        wall_time="an estimate, not yet measured: 6e16 FLOPs per unit at 2e14 FLOP/s sustained is 5 minutes of "
        "pre-training, about an hour for the 8 units with their measurements",
        settles="the published orderings at a size where they were made: every language model below the "
        "trigram, the decoder against the prefix-LM and encoder-decoder (T5's Table 2), MoE twins against "
        "their dense ones (--moe switch)",
    ),
    "cluster": Profile(
        settings={**_GPT2_SMALL, "budget": "flops", "budget_value": 6e17},
        machine="a Ray cluster of GPU nodes (--ray ADDRESS --unit-gpus 1); text of 1B tokens or more",
        wall_time="an estimate, not yet measured: 10 GPU-hours for 8 units, about 1.3 hours on 8 GPUs",
        settles="the gpu profile's verdicts at 10x the budget: whether an ordering holds as the budget "
        "grows (Switch's curves)",
    ),
}


@dataclass
class CompareConfig:
    out: str = option("runs/compare", "output folder (results.json, report.md, report.html, one folder per run)")
    data: list[str] = option(
        list,
        "text / jsonl files or folders (.gz too), or a built-in corpus: kjv (the default: the King James Bible) "
        "or zh (Tang and Song poems, held-out fraction at least 0.2)",
    )
    doc_sep: str = option("line", "one document per line, or blank-line separated", choices=("line", "blank"))
    field: str = option(
        "text", "the JSONL field or table column (Parquet, Arrow, CSV, datasets folder) holding the text"
    )
    families: list[str] = option(
        lambda: list(FAMILY_NAMES), f"families to compare (default: all four: {' '.join(FAMILY_NAMES)})"
    )
    moe: list[str] = option(
        list,
        f"MoE variants trained beside their dense twins ({', '.join(MOE_VARIANTS)}; default none: the default "
        "grid answers BERT vs GPT vs T5 vs prefix-LM)",
    )
    moe_families: list[str] = option(lambda: ["decoder"], "families that get the MoE variants")
    objectives: list[str] = option(
        list,
        "more contenders: FAMILY=OBJECTIVE pre-trains FAMILY with another objective beside its default "
        "(encoder-decoder=span: T5's span corruption; decoder=prefix-lm; encoder=mlm-nsp)",
    )
    budget: str = option("flops", "what every contender gets the same amount of", choices=BUDGETS)
    budget_value: float | None = option(
        None, "the amount: training FLOPs, training tokens or minutes (default: the demo's, --quick: a third)"
    )
    seeds: int = option(
        2, "seeds per contender (initialisation and data order): the intervals resample them with the examples"
    )
    tasks: list[str] = option(
        lambda: ["builtin"],
        "fine-tuning tasks: 'builtin' (kjv-sections, kjv-italics and nave-qa, on the built-in corpus), one of "
        "those names, and/or task files "
        "(.tsv/.csv/.jsonl classification, .conll tagging, SQuAD .json, seq2seq .jsonl with source/target)",
    )
    quick: bool = option(
        False,
        "a preview: a third of the budget, one seed, fewer questions and task examples (the whole report in "
        "minutes; more verdicts stay undetermined)",
    )
    # the body: the best held-out bits per byte of a decoder at the demo budget in a recorded sweep
    # (bench/compare_sweep.py, docs/benchmarks.md): small and fed many tokens, as Chinchilla would have it
    d_model: int = option(64, "width of every contender")
    n_layers: int = option(2, "layers of every stack (an encoder-decoder has this many in each)")
    n_heads: int = option(2, "attention heads")
    d_ff: int = option(256, "FFN width (MoE experts: the same, or a quarter for deepseekmoe)")
    position: str = option("rope", "position scheme of every contender", choices=("learned", "rope"))
    seq_len: int = option(64, "tokens per pre-training example")
    vocab_size: int = option(4096, "size of the one shared vocabulary")
    batch_size: int = option(16, "sequences per step")
    init_std: float = option(
        0.05,
        "initialisation std of every contender (0.02, GPT-2's for width 768, keeps a 128-wide encoder on the unigram plateau)",
    )
    lr: float = option(4e-3, "peak learning rate of every contender (pre-LN, warm-up then cosine)")
    warmup_steps: int = option(10, "warm-up steps")
    mask_prob: float = option(0.3, "the encoder's masking rate (docs/benchmarks.md: the tiny BERT's recipe)")
    val_fraction: float = option(0.05, "documents held out for the intrinsic and few-shot measurements")
    eval_windows: int = option(128, "held-out windows scored for bits per byte and masked-token accuracy")
    questions: int = option(
        400, "multiple-choice questions built from held-out text (hundreds: a 95% interval of about +-0.04)"
    )
    finetune_epochs: float = option(2.0, "passes over each task's training file")
    finetune_lr: float = option(1e-3, "fine-tuning learning rate")
    max_task_examples: int = option(400, "training examples kept per fine-tuning task")
    max_eval_examples: int | None = option(None, "evaluation examples kept per task (default: all; --quick: 200)")
    samples: int = option(8, "sampled continuations per generative contender (distinct-n, repetition)")
    cache_dir: str | None = option(None, "where token stores are cached (default: ~/.cache/lmlab)")
    nproc: int = option(
        1,
        "pre-train each contender on N processes of this machine (torchrun, the same global batch: the "
        "losses one process gets); the measurements and fine-tuning run on one",
    )
    parallel: str = option("ddp", "how the --nproc processes share a pre-training", choices=("ddp", "fsdp"))
    doc_mask: bool = option(
        False, "packed documents attend only within themselves in every contender's pre-training (pretrain --doc-mask)"
    )
    report_to: list[str] | None = option(
        None,
        "experiment trackers each contender's pre-training reports to, offline (one run per unit): "
        "tensorboard, mlflow, trackio, wandb",
        choices=TRACKER_NAMES,
    )
    ray: str | None = option(
        None,
        "run the units side by side as Ray tasks (the ray extra): on the cluster at this address (HOST:PORT, "
        'auto, ray://HOST:PORT), or "local" (--ray alone): the Ray running on this machine, or one started '
        "for the run",
        flag=False,
    )
    unit_cpus: int | None = option(
        None,
        "CPUs each unit reserves and computes with (its torch threads; all its processes together): under --ray "
        "1 per process by default, so a node runs as many units at once as it has CPUs; here every CPU",
    )
    unit_gpus: float = option(
        0.0, "GPUs each unit reserves under --ray (all its processes together; a fraction shares a GPU)"
    )
    ray_files: str = option(
        "auto",
        "how a unit on another node gets its inputs and gives back its files: shared (every node mounts the "
        "output folder), ship (through Ray's object store, the files returned to this folder), auto (shared "
        "when every node sees the folder)",
        choices=RAY_FILES,
    )
    profile: str | None = option(
        None,
        "named shapes and budget (flags and --config override them): cpu (the defaults: this laptop's demo), gpu "
        "(GPT-2-small-sized contenders, about an hour of one GPU), cluster (gpu at 10x the budget)",
        choices=tuple(PROFILES),
    )
    plan_only: bool = option(
        False,
        "print each contender's parameters, steps, tokens and training FLOPs (and write plan.json); train nothing",
    )
    precision: str = option("auto", f"pre-training and fine-tuning: {PRECISION_HELP}", choices=PRECISIONS)
    compile: str = option(
        "off",
        "torch.compile each contender's pre-training step: on, off (the default: results.json bit-equal run to "
        "run), or auto (on for the objectives that label most positions, 1.2-1.7x faster on a CPU, where a C++ "
        "compiler is found; held-out scores then vary in the 8th-9th significant digit run to run)",
        choices=("auto", "on", "off"),
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> CompareConfig:
        _check_names(cls, d, source)
        d = dict(d)
        if d.get("profile") is not None:  # the profile's settings under those given
            if d["profile"] not in PROFILES:
                raise ConfigError(
                    f"{source}: profile {d['profile']!r} is unknown; expected one of {', '.join(PROFILES)}"
                )
            d = {**PROFILES[d["profile"]].settings, **d}
        for key in ("data", "families", "moe", "moe_families", "tasks", "objectives"):
            if isinstance(d.get(key), str):
                d[key] = [d[key]]
        return cls(**d)

    def validate(self) -> None:
        for f in self.families:
            if f not in FAMILY_NAMES:
                raise ConfigError(f"unknown family {f!r} in --families; expected some of {', '.join(FAMILY_NAMES)}")
        for f in self.moe_families:
            if f not in FAMILY_NAMES:
                raise ConfigError(f"unknown family {f!r} in --moe-families; expected some of {', '.join(FAMILY_NAMES)}")
        for m in self.moe:
            if m != "none" and m not in MOE_VARIANTS:
                raise ConfigError(
                    f"unknown MoE variant {m!r} in --moe; expected some of {', '.join(MOE_VARIANTS)}, or none"
                )
        if self.budget not in BUDGETS:
            raise ConfigError(f"budget {self.budget!r} is unknown; expected one of {', '.join(BUDGETS)}")
        if not self.families:
            raise ConfigError("--families names no family")
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {self.seeds}")
        if self.budget_value is not None and self.budget_value <= 0:
            raise ConfigError(f"--budget-value must be positive, got {self.budget_value}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {self.nproc}")
        if self.batch_size % self.nproc:
            raise ConfigError(
                f"--batch-size {self.batch_size} (the global batch) does not divide among --nproc {self.nproc} "
                f"processes: use a multiple of {self.nproc}"
            )
        if self.unit_cpus is not None and self.unit_cpus < 1:
            raise ConfigError(f"--unit-cpus must be at least 1, got {self.unit_cpus}")
        if self.unit_gpus < 0:
            raise ConfigError(f"--unit-gpus must not be negative, got {self.unit_gpus}")
        if self.unit_gpus and not self.ray:
            raise ConfigError("--unit-gpus reserves GPUs on a Ray cluster: give --ray too")
        if self.unit_gpus > 1 and self.unit_gpus != int(self.unit_gpus):
            raise ConfigError(f"--unit-gpus {self.unit_gpus}: more than one GPU must be a whole number")
        if self.ray_files not in RAY_FILES:
            raise ConfigError(f"--ray-files {self.ray_files!r} is unknown; expected one of {', '.join(RAY_FILES)}")
        if self.profile is not None and self.profile not in PROFILES:
            raise ConfigError(f"--profile {self.profile!r} is unknown; expected one of {', '.join(PROFILES)}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"--parallel {self.parallel!r} is unknown; expected ddp or fsdp")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"--compile {self.compile!r} is unknown; expected auto, on or off")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is unknown; expected one of {', '.join(PRECISIONS)}")
        self.extra_objectives()
        if self.seq_len < 16:
            raise ConfigError(f"seq_len={self.seq_len} is too short to split into a prompt and its continuation")

    def extra_objectives(self) -> dict[str, list[str]]:
        """--objectives FAMILY=OBJECTIVE ..., checked, as family -> objectives."""
        from lmlab.families import FAMILIES

        out: dict[str, list[str]] = {}
        for entry in self.objectives:
            family, sep, objective = entry.partition("=")
            if not sep or family not in FAMILIES:
                raise ConfigError(
                    f"--objectives {entry!r}: expected FAMILY=OBJECTIVE with FAMILY one of {', '.join(FAMILY_NAMES)}"
                )
            if objective not in FAMILIES[family].objectives:
                raise ConfigError(
                    f"--objectives {entry!r}: {family} models train with {', '.join(FAMILIES[family].objectives)}"
                )
            if family not in self.families:
                raise ConfigError(f"--objectives {entry!r}: {family} is not among --families")
            out.setdefault(family, []).append(objective)
        return out

    @property
    def variants(self) -> list[str]:
        return [m for m in self.moe if m != "none"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, extra: dict[str, Any] | None = None) -> str:
        """A hash of everything that changes what a run computes (not where it writes or reports)."""
        d = {k: v for k, v in self.to_dict().items() if k not in PLACEMENT}
        if not d["doc_mask"]:  # off: the fingerprints of runs from before the setting existed still match
            del d["doc_mask"]
        text = json.dumps({**d, **(extra or {})}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
