"""One unit of a comparison: one contender, one seed, from pre-training to its last measurement.

The lab runs each unit in a process of its own (`python -m lmlab.compare.unit SPEC.json`, started by
lmlab.compare.launch), one at a time, so that a unit's peak memory is its own and one unit's threads never
compete with another's; with --ray, as Ray tasks side by side, each with the CPUs it reserved (its
"threads" in the spec).
A unit writes `stage.json` as it goes (for the lab's live table) and `result.json` last, atomically:
a unit without result.json is run again, one with it is skipped while its fingerprint matches.

With `lmlab compare --nproc N` the unit runs under torchrun: its N processes pre-train the contender
together (DDP or FSDP2, lmlab.train.distributed; the same global batch, so the losses one process
gets), then rank 0 alone measures and fine-tunes the model.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlab.compare import measure
from lmlab.compare.contenders import Contender, model_config
from lmlab.compare.launch import exit_with_parent, write_json
from lmlab.compare.results import FewShot, Intrinsic, MoeStats, Pretrain, Samples, TaskResult, UnitResult
from lmlab.compare.settings import CompareConfig
from lmlab.data.objectives import ObjectiveConfig
from lmlab.data.store import build_store
from lmlab.errors import LmlabError
from lmlab.metrics import evidence
from lmlab.model import Model
from lmlab.pretrain import batches
from lmlab.runtime import can_compile
from lmlab.tokenizer import load_tokenizer
from lmlab.train import distributed
from lmlab.train.parallel import ParallelDims, parallelize
from lmlab.train.trainer import TrainConfig, Trainer, evaluate, resolve_device

FILL_MASK = [
    ("And God said, Let there be [MASK]: and there was light.", "light"),
    ("In the beginning God created the heaven and the [MASK].", "earth"),
    ("The LORD is my [MASK]; I shall not want.", "shepherd"),
]

UNIT_EVAL_BATCHES = 8  # validation batches each pre-training evaluates


class Unit:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.cc = CompareConfig.from_dict(spec["compare"])
        self.c = Contender(**spec["contender"])
        self.seed = int(spec["seed"])
        self.dir = Path(spec["dir"])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tok = load_tokenizer(spec["tokenizer"])
        self.started = time.perf_counter()
        self._stage: tuple[str, float] = ("start-up", self.started)
        self.stage_seconds: dict[str, float] = {}
        # under torchrun (lmlab compare --nproc): this process's rank; otherwise rank 0 of 1
        self.world = distributed.env_world()
        self.threads = int(spec.get("threads") or len(os.sched_getaffinity(0)))

    def stage(self, name: str, **info: Any) -> None:
        if not self.world.main:
            return
        now = time.perf_counter()
        if name != self._stage[0]:  # where the unit's time goes: seconds per stage, in results.json
            self.stage_seconds[self._stage[0]] = self.stage_seconds.get(self._stage[0], 0.0) + now - self._stage[1]
            self._stage = (name, now)
        write_json(self.dir / "stage.json", {"stage": name, **info})

    def data(self):
        cc, tok = self.cc, self.tok
        store, _ = build_store(self.spec["data"], tok, self.spec["cache"], cc.doc_sep, cc.field)
        splits = store.split(cc.val_fraction, 0)  # the same held-out documents for every contender and seed
        return store, splits

    def run(self) -> UnitResult | None:
        cc, c, tok = self.cc, self.c, self.tok
        store, splits = self.data()
        cfg = model_config(cc, c, tok)
        ocfg = ObjectiveConfig(c.objective, cc.seq_len, mask_prob=cc.mask_prob, doc_mask=cc.doc_mask)
        world = self.world
        # placed on the processes as lmlab pretrain places it (lmlab.train.parallel): under fsdp sharded from
        # the start, from the one-process init
        dims = ParallelDims.of(cc.parallel if world.size > 1 else "none", world.size)
        device = distributed.device_for(resolve_device("auto"), world)
        model = parallelize(cfg, dims, world, device, self.seed).model
        if world.size > 1 and cfg.ffn == "moe":  # load balancing from every rank's tokens, as one process
            distributed.use_global_routing_stats(model, world)
        steps = self.spec.get("steps")
        # lmlab pretrain's own data pipeline; the validation batches are the same for every seed
        train, val = batches(ocfg, store, splits, tok, cc.batch_size, self.seed, UNIT_EVAL_BATCHES, val_seed=0)
        tc = TrainConfig(
            max_steps=steps,
            max_minutes=self.spec.get("minutes"),
            batch_size=cc.batch_size,
            lr=cc.lr,
            warmup_steps=min(cc.warmup_steps, max((steps or 10**9) // 5, 1)),
            eval_every=max((steps or 100) // 5, 1),
            eval_batches=UNIT_EVAL_BATCHES,
            save_every=10**9,
            keep_checkpoints=1,
            log_every=10,
            seed=self.seed,
            parallel=cc.parallel if world.size > 1 else "none",
            precision=cc.precision,
            compile=compiles(cc.compile, train.objective, resolve_device("auto").type),
            report_to=cc.report_to,
        )
        val_stream = store.stream(splits["val"], tok.eos_id, "val")
        wins = measure.windows(val_stream, cc.seq_len, cc.eval_windows)
        curve_wins, top = wins[:8], self.spec["unigram_top"]

        def evaluate_fn(model: Model, batches: Any, device: Any, autocast: Any) -> dict[str, Any]:
            """The objective's own validation loss, and the comparable number on 8 held-out windows."""
            r = evaluate(model, batches, device, autocast)
            model.eval()
            with torch.no_grad():
                if cfg.spec.generative:
                    r["bpb"] = measure.bits_per_byte(
                        tok, curve_wins, lambda w: measure.second_half_nats(model, tok, w, c.objective)
                    )["bpb"]
                else:
                    r["masked_accuracy"] = measure.masked_accuracy(model, tok, curve_wins, top)["accuracy"]
            model.train()
            return r

        self.stage("pretrain", step=0, steps=steps)

        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind == "step" and info["step"] % 5 == 0:
                self.stage("pretrain", step=info["step"], steps=steps, loss=info["loss"])

        trainer = Trainer(
            model,
            train,
            val,
            tc,
            self.dir / "pretrain",
            on_event,
            evaluate_fn=evaluate_fn,
            world=world,
            settings={"compare": cc.to_dict(), "contender": c.name, "seed": self.seed, "train": dataclasses.asdict(tc)},
            run_name=self.dir.name,
        )
        summary = trainer.fit()
        precision = trainer.precision["precision"]
        if world.size > 1:  # pre-trained on every rank; measured and fine-tuned on rank 0
            whole = trainer.whole_state()[0]  # an FSDP model's shards, gathered (every rank calls it)
            distributed.barrier(world)
            del trainer  # its DDP wrapper holds the process group: released before it is destroyed
            gc.collect()
            distributed.teardown()
            if not world.main:
                return None
            if whole is not None:
                with torch.random.fork_rng():  # the RNG stays where one process's run leaves it
                    model = Model(cfg)
                model.load_state_dict(whole)
            torch.set_num_threads(self.threads)  # torchrun gave each process one thread
        model.save_pretrained(self.dir / "model")
        tok.save(self.dir / "model")
        model.eval()
        pretrain = Pretrain(
            processes=world.size,
            parallel=tc.parallel,
            precision=precision,
            compiled=tc.compile,
            steps=summary["steps"],
            tokens=summary["tokens"],
            minutes=summary["minutes"],
            train_tokens_per_s=summary["tokens"] / max(summary["minutes"] * 60, 1e-9),
            val=summary["val"],
            curve=_curve(self.dir / "pretrain" / "metrics.jsonl"),
            val_curve=_val_curve(self.dir / "pretrain" / "metrics.jsonl"),
        )
        moe = _moe_stats(self.dir / "pretrain" / "metrics.jsonl") if cfg.ffn == "moe" else None
        ev: dict[str, dict[str, Any]] = {}  # every measurement per example, keyed by metric
        self.stage("intrinsic")
        with torch.no_grad():
            intrinsic = self.intrinsic(model, wins, ev)
        self.stage("few-shot")
        questions = [json.loads(line) for line in Path(self.spec["questions"]).read_text().splitlines() if line]
        from lmlab.fewshot import score_items

        form = "span" if c.objective == "span" else "prefix"  # an encoder-decoder is asked as it was trained
        fewshot = {}
        for k in (0, 3):
            r = score_items(model, tok, questions, shots=k, seed=self.seed, seq2seq_form=form)
            ev[f"mc_k{k}"] = evidence("accuracy", range(len(r["correct"])), r["correct"])
            fewshot[f"k{k}"] = FewShot(**{f: r[f] for f in FewShot.__dataclass_fields__})
        self.stage("generation")
        samples = fill_mask = routing = None
        if cfg.spec.generative:
            samples = Samples(
                **measure.sample_continuations(model, tok, wins, cc.samples, self.seed, objective=c.objective)
            )
        else:
            fill_mask = measure.fill_mask_candidates(model, tok, FILL_MASK)
        if cfg.ffn == "moe":
            self.stage("routing")
            routing = measure.routing_report(model, tok, wins[:8], self.seed)
        tasks = {}
        for task in self.spec["tasks"]:
            self.stage(f"fine-tune {task['name']}")
            tasks[task["name"]] = self.finetune(task, cfg, ev)
        if moe:
            ev["load_cv"] = evidence("load_cv", ["training"], [moe.load_cv])
        self.stage("done")
        return UnitResult(
            contender=c.name,
            seed=self.seed,
            pretrain=pretrain,
            intrinsic=intrinsic,
            fewshot=fewshot,
            tasks=tasks,
            evidence=ev,
            samples=samples,
            fill_mask=fill_mask,
            routing=routing,
            moe=moe,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            stage_seconds=self.stage_seconds,
            unit_minutes=(time.perf_counter() - self.started) / 60,
        )

    def intrinsic(self, model: Model, wins: list[np.ndarray], ev: dict[str, Any]) -> Intrinsic:
        tok, cfg = self.tok, model.config
        if cfg.spec.generative:
            r = measure.bits_per_byte(tok, wins, lambda w: measure.second_half_nats(model, tok, w, self.c.objective))
            ev["bpb"] = r["evidence"]
            return Intrinsic(bpb=r["bpb"], tokens=r["tokens"], bytes=r["bytes"], method="second half given the first")
        r = measure.bits_per_byte(tok, wins, lambda w: measure.pseudo_second_half_nats(model, tok, w))
        acc = measure.masked_accuracy(model, tok, wins, self.spec["unigram_top"])
        ev["masked_accuracy"] = acc["evidence"]
        return Intrinsic(
            pll_bpb=r["bpb"],
            tokens=r["tokens"],
            bytes=r["bytes"],
            masked_accuracy=acc["accuracy"],
            unigram_accuracy=acc["unigram_accuracy"],
            masked_positions=acc["positions"],
            method="pseudo-log-likelihood: each second-half token masked in turn, both halves visible",
        )

    def finetune(self, task: dict[str, Any], cfg: Any, ev: dict[str, Any]) -> TaskResult:
        from lmlab.finetune import finetune
        from lmlab.settings import FinetuneConfig

        if task["task"] not in cfg.spec.tasks:
            return TaskResult(skipped=f"{cfg.family} models cannot be fine-tuned for {task['task']}")
        fc = FinetuneConfig(
            task=task["task"],
            model=str(self.dir / "model"),
            train=task["train"],
            eval=task["eval"],
            out=str(self.dir / "tasks" / task["name"]),
            epochs=self.cc.finetune_epochs,
            lr=self.cc.finetune_lr,
            batch_size=16,
            max_len=min(self.cc.seq_len, cfg.max_seq_len),
            max_target_len=min(48, min(self.cc.seq_len, cfg.max_seq_len) // 2),
            truncate=True,
            seed=self.seed,
            precision=self.cc.precision,
        )
        try:
            r = finetune(fc)
        except LmlabError as e:  # the task's data does not suit this contender: reported, not fatal
            return TaskResult(skipped=f"could not fine-tune: {e}")
        metrics = {k: float(v) for k, v in (r["eval"] or {}).items() if isinstance(v, (int, float))}
        if (r["eval"] or {}).get("evidence"):
            ev[f"task:{task['name']}"] = r["eval"]["evidence"]
        return TaskResult(metrics=metrics, steps=r["steps"], minutes=r["minutes"], train_examples=r["train_examples"])


def compiles(setting: str, objective: Any, device_type: str) -> bool:
    """Whether a unit torch.compiles its training step: --compile on, or auto where it wins (docs/benchmarks.md:
    1.2-1.7x for objectives that label most positions; masked LMs, which project only their masked positions
    eager, run 0.66x compiled) and a compiler is found."""
    if setting != "auto":
        return setting == "on"
    return bool(objective.dense_labels) and can_compile(device_type)


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _curve(path: Path) -> list[list[float]]:
    """(step, tokens, training loss) of each logged window."""
    return [[r["step"], r["tokens"], r["loss"]] for r in _records(path) if r.get("split") == "train"]


def _val_curve(path: Path) -> list[list[float]]:
    """(step, held-out bits per byte or masked-token accuracy on 8 windows) of each validation."""
    return [
        [r["step"], r.get("bpb", r.get("masked_accuracy"))]
        for r in _records(path)
        if r.get("split") == "val" and ("bpb" in r or "masked_accuracy" in r)
    ]


def _moe_stats(path: Path) -> MoeStats | None:
    """Expert-load CV and dropped fraction, averaged over the MoE layers and the last quarter of training."""
    recs = [r for r in _records(path) if r.get("split") == "train" and r.get("moe")]
    if not recs:
        return None
    tail = recs[-max(1, len(recs) // 4) :]
    cv = [layer["cv"] for r in tail for layer in r["moe"]]
    dropped = [layer.get("dropped", 0.0) for r in tail for layer in r["moe"]]
    return MoeStats(load_cv=float(np.mean(cv)), dropped=float(np.mean(dropped)), layers=len(tail[-1]["moe"]))


def main(argv: list[str]) -> int:
    exit_with_parent()  # under torchrun: not left running when the launcher is killed
    spec = json.loads(Path(argv[0]).read_text())
    world = distributed.env_world()
    if world.size == 1:
        torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    else:
        distributed.setup(spec["compare"].get("parallel", "ddp"), resolve_device("auto"), 1800.0)
    unit = Unit(spec)
    result = unit.run()
    if result is None:  # a rank other than 0: its part was the pre-training
        return 0
    result.fingerprint = spec["fingerprint"]
    write_json(unit.dir / "result.json", result.to_dict())
    unit.stage("done")
    return 0


if __name__ == "__main__":
    from lmlab.runtime import keep_freed_memory

    keep_freed_memory()
    sys.exit(main(sys.argv[1:]))
