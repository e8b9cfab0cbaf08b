"""The training loop: accumulation, clipping, precision, evaluation, metrics, checkpoints, exact resume.

The trainer never prints. It appends metrics to run/metrics.jsonl and reports progress through an
optional callback `on_event(kind, info)` (kinds: start, step, eval, save, end); the CLI draws its
progress bar from those events.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmlab.data.objectives import Batches
from lmlab.errors import ConfigError, DistributedError
from lmlab.families import IGNORE_INDEX
from lmlab.model import Model
from lmlab.runtime import cpu_flags, native_bf16
from lmlab.settings import TrainConfig
from lmlab.train import distributed
from lmlab.train.checkpoint import (
    good_checkpoint,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
    save_sharded_checkpoint,
)
from lmlab.train.optim import make_optimizer, make_scheduler
from lmlab.train.parallel import Parallel, ParallelDims

DEFAULT_LR = 1e-3
POST_LN_LR = 5e-4


def default_lr(model_cfg) -> float:
    """The peak learning rate `lmlab pretrain` uses when none is given. Post-LN stacks (BERT, BART) get
    half the pre-LN one: the tiny post-LN BERT at 2e-3 collapsed, every position's state becoming the
    same vector, while at 5e-4 it learned (the runs are in docs/benchmarks.md).
    Post-LN's larger gradients near the output are why it needs warm-up and a smaller step size
    (Xiong et al., 2020)."""
    return POST_LN_LR if model_cfg.norm_placement == "post" else DEFAULT_LR


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def precision_choice(name: str, device: torch.device, flags: frozenset[str] | None = None) -> dict[str, Any]:
    """What a training run computes in: {"precision": "bf16" | "fp16" | "fp32", "why", "cpu_flags"} from
    the asked `name` (auto | fp32 | bf16 | fp16). auto is bf16 autocast where bf16 is faster than float32:
    CUDA GPUs with native bf16 (Ampere and later), and CPUs with AMX or AVX-512-bf16 (on an AMX Xeon a
    GPT-2-shaped step runs about 2x faster under bf16 autocast); float32 elsewhere. GPUs that only
    emulate bf16 (T4, V100: slower than float32) get float32, with fp16 offered: float16 autocast with
    a gradient scaler, which their tensor cores run natively. AVX2-only CPUs emulate bf16 too."""
    flags = cpu_flags() if flags is None else flags
    shown = sorted(flags)
    if name != "auto":
        return {"precision": name, "why": "as asked", "cpu_flags": shown}
    if device.type == "cuda":
        # is_bf16_supported() alone counts emulation, which is slower than float32
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        why = "the GPU has native bf16"
        if not bf16:
            why = "the GPU has no native bf16 (emulated bf16 is slower than fp32)"
            if torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 7:
                why += "; --precision fp16 runs its tensor cores, with a gradient scaler"
    elif device.type == "cpu":
        bf16 = native_bf16(flags)
        why = "native bf16 matmuls (AMX / AVX-512-bf16)" if bf16 else "no native bf16 matmuls on this CPU"
    else:
        bf16, why = False, f"no bf16 choice for {device.type}"
    return {"precision": "bf16" if bf16 else "fp32", "why": why, "cpu_flags": shown}


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: Model, batches: list[dict[str, torch.Tensor]], device: torch.device, autocast: torch.dtype | None = None
) -> dict[str, float]:
    """Token-level loss and perplexity of the language-model head over fixed batches (plus accuracies).

    For masked LMs the loss is over masked positions only and `accuracy` is masked-token accuracy;
    with NSP, `nsp_accuracy` is reported too.
    """
    was_training = model.training
    model.eval()
    total, count, correct, nsp_right, nsp_n = 0.0, 0, 0, 0, 0
    shift = model.config.spec.shifts_labels
    for batch in batches:
        batch = _on(batch, device)
        with _autocast(device, autocast):
            out = model(**batch, labelled_logits_only=True)
        labels = batch["labels"]
        if shift:
            labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        targets = labels[labels != IGNORE_INDEX]  # out.logits holds exactly these rows
        logits = out.logits.float()
        total += F.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
        correct += int((logits.argmax(-1) == targets).sum())
        if out.nsp_logits is not None and "next_sentence_label" in batch:
            nsp_right += int((out.nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum())
            nsp_n += len(batch["next_sentence_label"])
    model.train(was_training)
    loss = total / max(count, 1)
    result = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "accuracy": correct / max(count, 1), "tokens": count}
    if nsp_n:
        result["nsp_accuracy"] = nsp_right / nsp_n
    return result


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of an evaluation metric is better (losses, perplexities, error rates)."""
    return metric in ("loss", "ppl", "perplexity") or metric.endswith(("_loss", "_ppl", "error", "_wer", "_cer"))


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class Trainer:
    def __init__(
        self,
        model: Model,
        train: Batches,
        val: list[dict[str, torch.Tensor]] | None,
        cfg: TrainConfig,
        run_dir: str | Path,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        evaluate_fn: Callable[..., dict[str, Any]] | None = None,
        world: distributed.World | None = None,
        settings: dict[str, Any] | None = None,
        run_name: str | None = None,
    ) -> None:
        cfg.validate()
        self.settings = settings if settings is not None else {"train": asdict(cfg)}  # what trackers record
        self.run_name = run_name or Path(run_dir).resolve().name
        self.cfg, self.train, self.val, self.run_dir = cfg, train, val or [], Path(run_dir)
        # with several processes (lmlab.train.distributed) only rank 0 reports, logs and saves
        self.world = world or distributed.World()
        distributed.check_batch(cfg.batch_size, self.world)
        self.on_event = (on_event or (lambda kind, info: None)) if self.world.main else (lambda kind, info: None)
        self.evaluate_fn = evaluate_fn or evaluate  # (model, batches, device, autocast) -> metrics; LM loss by default
        self.device = distributed.device_for(resolve_device(cfg.device), self.world)
        self.precision = precision_choice(cfg.precision, self.device)
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision["precision"])
        # float16's narrow range: the loss is scaled up before the backward, the gradients down before
        # clipping, and a step whose gradients overflowed is skipped (torch.amp.GradScaler)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast == torch.float16 else None
        # how the model is spread over the processes: the one object that knows (lmlab.train.parallel)
        self.parallel = Parallel(model, ParallelDims.of(cfg.parallel, self.world.size, cfg.expert_parallel))
        if self.parallel.casts:
            self.autocast = None  # the mixed-precision policy build_sharded set casts instead
        self.model = model.to(self.device)
        self.step_fn = self.parallel.step_module(self.world)
        if cfg.compile:
            self.step_fn = torch.compile(self.step_fn)
        # labels a causal lm head reads one position on (a tagger's never are): for the rank weights
        self._shifts = self.model.config.spec.shifts_labels and "lm" in self.model.config.heads
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * train.objective.tokens_per_example
        self.total_steps = cfg.max_steps
        if cfg.max_tokens:
            by_tokens = math.ceil(cfg.max_tokens / self.tokens_per_step)
            self.total_steps = min(self.total_steps or by_tokens, by_tokens)
        self.optimizer = make_optimizer(
            self.model, cfg.lr if cfg.lr is not None else DEFAULT_LR, cfg.weight_decay, (cfg.beta1, cfg.beta2)
        )
        # with only a time budget the length is unknown: the rate stays at its peak after warm-up
        self.scheduler = make_scheduler(
            self.optimizer, cfg.warmup_steps, self.total_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction
        )
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._trackers = None  # lmlab.train.trackers, opened by fit
        # the best evaluation so far (best_metric): {"step", "metric", "value"}; evaluations since it
        self.best: dict[str, Any] | None = None
        self.evals_since_best = 0
        self.stopped_early = False
        self._last_eval, self._last_eval_step = None, -1
        # MoE layers' routing statistics, summed over a logging window (tensors: no host sync per step)
        self._routers = self.model.config.ffn == "moe"  # the forward returns routing records to log
        self._moe_sums: dict[str, dict[str, torch.Tensor]] = {}
        self._moe_count = 0
        # full: rank 0 writes one folder; sharded: every rank writes its shard (lmlab.train.sharded)
        self.checkpoint_format = cfg.resolved_checkpoint_format()
        self._pending = None  # a sharded checkpoint still being written (async_save)
        self._save_group = None
        if cfg.async_save and self.world.size > 1:  # the writer thread's collectives stay off the training group
            import torch.distributed as dist

            self._save_group = dist.new_group(backend="gloo")

    # ---- routing statistics -------------------------------------------------------------------------
    def _collect_routing(self, routing: Any) -> None:
        for record in routing or ():
            sums = self._moe_sums.setdefault(record.layer, {})
            for k, v in record.stats().items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v.clone()
        self._moe_count += 1 if routing else 0

    def _routing_record(self) -> list[dict[str, Any]] | None:
        """Per MoE layer: mean expert load (fraction of assignments), its CV, router entropy, dropped
        fraction and each auxiliary loss, over the steps since the last record."""
        if not self._moe_count:
            return None
        layers = []
        for name, sums in self._moe_sums.items():
            row: dict[str, Any] = {"layer": name}
            for k, v in sums.items():
                mean = (v / self._moe_count).cpu()
                row[k] = [round(x, 6) for x in mean.tolist()] if mean.ndim else round(mean.item(), 6)
            layers.append(row)
        self._moe_sums, self._moe_count = {}, 0
        return layers

    # ---- state ------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "scheduler": self.scheduler.state_dict(),
            "batches": self.train.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "train_config": asdict(self.cfg),
            "best": self.best,
            "evals_since_best": self.evals_since_best,
            "stopped_early": self.stopped_early,
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def resume(self) -> bool:
        """Continue from the newest checkpoint of run_dir, if there is one."""
        path = good_checkpoint(self.run_dir, lambda text: self.on_event("note", {"text": text}))
        if path is None:
            return False
        state = load_checkpoint(path, self.model, self.optimizer)
        self.step, self.tokens, self.elapsed = int(state["step"]), int(state["tokens"]), float(state["elapsed"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train.load_state_dict(state["batches"])
        torch.set_rng_state(state["rng_torch"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.best, self.evals_since_best = state.get("best"), int(state.get("evals_since_best", 0))
        self.stopped_early = bool(state.get("stopped_early", False))  # a finished run stays finished
        return True

    def _truncate_metrics(self) -> None:
        """Drop metrics logged after the step training starts from (all of them for a run from step 0):
        the run writes them again. A line a crash cut short is dropped too. Replaced atomically."""
        if not self.world.main or not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # torn by a kill mid-append
                continue
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, self.metrics_path)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.world.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._trackers is not None:
            self._trackers.log(record)

    def _done(self, started: float) -> bool:
        cfg = self.cfg
        if self.total_steps and self.step >= self.total_steps:
            return True
        if not cfg.max_minutes:
            return False
        late = (self.elapsed + time.perf_counter() - started) / 60 >= cfg.max_minutes
        if self.world.size > 1:  # clocks differ: every rank stops when the first one runs out of time
            late = distributed.mean_over_ranks(float(late), self.world, self.device) > 0
        return late

    def _save(self) -> None:
        """Checkpoint the step: rank 0 alone (full format, the whole state gathered first when it is
        spread over the ranks) or every rank its shard (sharded format, possibly in the background)."""
        cfg = self.cfg
        self.settle(wait=True)  # one save in flight at a time
        if self.checkpoint_format == "sharded":
            self._pending = save_sharded_checkpoint(
                self.run_dir,
                self.step,
                self.model,
                self.optimizer,
                copy.deepcopy(self._state()),
                cfg.keep_checkpoints,
                main=self.world.main,
                background=cfg.async_save,
                group=self._save_group,
            )
            if not cfg.async_save:
                self.settle(wait=True)
            return
        whole = self.whole_state()
        if self.world.main:  # the weights and optimizer state are the same on every rank
            path = save_checkpoint(
                self.run_dir,
                self.step,
                self.model,
                self.optimizer,
                self._state(),
                cfg.keep_checkpoints,
                model_state=whole[0],
                optimizer_state=whole[1],
            )
            self.on_event("save", {"step": self.step, "path": str(path)})

    def settle(self, wait: bool) -> None:
        """Publish the checkpoint being written once its write has finished (`wait`: block until then)."""
        if self._pending is None or not (wait or self._pending.done()):
            return
        pending, self._pending = self._pending, None
        path = pending.finish()
        if path is not None:
            self.on_event("save", {"step": pending.step, "path": str(path)})

    def whole_state(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(model, optimizer) state gathered whole from an FSDP2 or expert-parallel model, a collective
        every rank calls; (None, None) when every rank already holds everything."""
        return self.parallel.full_state(self.optimizer)

    # ---- the best evaluation ----------------------------------------------------------------------
    def _judge(self, metrics: dict[str, Any]) -> bool:
        """Compare an evaluation with the best so far by best_metric; keep the weights of a better one
        (RUN/best/); True when early stopping's patience has run out."""
        cfg, name = self.cfg, self.cfg.best_metric
        if name not in metrics or not isinstance(metrics[name], (int, float)):
            found = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise ConfigError(f"best_metric {name!r} is not among the evaluation's metrics: {found}")
        value = float(metrics[name])
        lower = lower_is_better(name)
        better = self.best is None or (value < self.best["value"] if lower else value > self.best["value"])
        if better:
            self.best, self.evals_since_best = {"step": self.step, "metric": name, "value": value}, 0
            self._save_best()
        else:
            self.evals_since_best += 1
        return bool(cfg.early_stopping) and self.evals_since_best >= cfg.early_stopping

    def _save_best(self) -> None:
        """RUN/best/: the best evaluation's weights (every parameter and buffer, adapters included) and
        best.json, replaced atomically."""
        whole = self.whole_state()[0]
        if not self.world.main:
            return
        state = whole if whole is not None else self.model.state_dict()
        state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        root = self.run_dir / "best"
        tmp = self.run_dir / ".tmp-best"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "weights.pt")
        (tmp / "best.json").write_text(json.dumps(self.best, indent=2) + "\n")
        old = self.run_dir / ".old-best"
        shutil.rmtree(old, ignore_errors=True)
        if root.exists():
            os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)

    def best_state(self) -> dict[str, torch.Tensor] | None:
        """The best evaluation's weights, read back from RUN/best (safe loading), or None."""
        path = self.run_dir / "best" / "weights.pt"
        if self.best is None or not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def restore_best(self) -> dict[str, Any] | None:
        """Put the best evaluation's weights back into the model (every rank, sharded or not) and evaluate
        them again: returns that evaluation (its best_metric is the recorded best value), or None when
        there is no best to restore. A best that is the last step's is not evaluated twice."""
        if self.best is not None and self.best["step"] == self._last_eval_step:
            return self._last_eval
        together = self.parallel.together
        if not (self.world.main or together):  # under DDP rank 0 alone evaluates and saves
            return None
        state = self.best_state() if self.world.main else None
        if self.world.size > 1 and together:  # every rank needs the whole state (and keeps its shard)
            import torch.distributed as dist

            box = [state]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        if state is None:
            return None
        self.parallel.load_weights(state)
        return self.evaluate_fn(self.model, self.val, self.device, self.autocast)

    # ---- the loop ---------------------------------------------------------------------------------
    def _accumulate(self) -> float:
        """Forward and backward of one step's micro-batches; the step's loss, the same in every process.

        Each micro-batch is the global one; this process trains on its rows, its vocabulary loss
        weighted so that the gradient DDP averages equals the one-process gradient."""
        cfg, world = self.cfg, self.world
        step_loss = 0.0
        for i in range(cfg.grad_accum):
            full = self.train.next_batch()
            part = distributed.shard(full, world)
            weight = distributed.loss_weight(full, part, world, self._shifts)
            batch = _on(part, self.device)
            with distributed.no_sync(self.step_fn, last=i == cfg.grad_accum - 1):
                with _autocast(self.device, self.autocast):
                    out = self.step_fn(**batch, labelled_logits_only=True)
                    loss = out.loss
                    if weight != 1.0 and out.token_loss is not None:
                        loss = loss + (weight - 1.0) * out.token_loss
                    loss = loss / cfg.grad_accum
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            step_loss += loss.item()
            if self._routers:
                self._collect_routing(out.routing)
        return distributed.mean_over_ranks(step_loss, world, self.device)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.trackers() and self.world.main:
            from lmlab.train.trackers import Trackers

            self._trackers = Trackers(cfg.trackers(), self.run_dir, self.settings, self.run_name)
        if self.step == 0:  # a resumed run restores the RNG state instead
            torch.manual_seed(cfg.seed)
        if self.world.main:
            remove_partial(self.run_dir)  # a save a crash interrupted; no rank writes one yet
            self._truncate_metrics()  # records past the step this run starts from are written again
        distributed.barrier(self.world)
        self.model.train()
        self.on_event(
            "start", {"total_steps": self.total_steps, "step": self.step, "tokens_per_step": self.tokens_per_step}
        )
        started = time.perf_counter()
        window_loss, window_steps, window_time, last_eval = 0.0, 0, 0.0, None
        done = self._done(started) or self.stopped_early
        while not done:
            step_start = time.perf_counter()
            try:
                step_loss = self._accumulate()
            except RuntimeError as e:  # a collective that timed out or lost a peer
                if not self.world.distributed:
                    raise
                raise DistributedError(
                    f"rank {self.world.rank} of {self.world.size}, step {self.step + 1}: a collective failed "
                    f"(timeout {cfg.collective_timeout:g} s; another process may have stopped): {e}"
                ) from e
            if self.scaler is not None:  # clip the true gradients
                self.scaler.unscale_(self.optimizer)
            grad_norm = self.parallel.clip_grad_norm(cfg.grad_clip)
            lr = self.optimizer.param_groups[0]["lr"]
            if self.scaler is None:
                self.optimizer.step()
            else:  # skipped when the gradients overflowed; the scale adapts
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens += self.tokens_per_step
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            window_time += time.perf_counter() - step_start  # training time only: evals and saves excluded
            info = {"step": self.step, "loss": step_loss, "lr": lr, "tokens": self.tokens}
            done = self._done(started)  # decided once per step, the same on every rank
            if self.step % cfg.log_every == 0 or done:
                record = {
                    "step": self.step,
                    "split": "train",
                    "loss": window_loss / window_steps,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": self.tokens,
                    "tokens_per_s": window_steps * self.tokens_per_step / window_time,
                    "elapsed_s": self.elapsed + time.perf_counter() - started,
                }
                routing = self._routing_record()
                if routing:
                    record["moe"] = routing
                self._log(record)
                info["tokens_per_s"] = record["tokens_per_s"]
                window_loss, window_steps, window_time = 0.0, 0, 0.0
            self.on_event("step", info)
            # a sharded or expert-parallel forward needs every rank: they all evaluate the same batches
            together = self.parallel.together
            if self.val and (self.world.main or together) and (self.step % cfg.eval_every == 0 or done):
                last_eval = self.evaluate_fn(self.model, self.val, self.device, self.autocast)
                self._last_eval, self._last_eval_step = last_eval, self.step
                # per-example evidence (lmlab.metrics.evidence) stays in the summary, out of the plotted log
                shown = {k: v for k, v in last_eval.items() if k != "evidence"}
                self._log({"step": self.step, "split": "val", **shown})
                self.on_event("eval", {"step": self.step, **shown})
                patience_out = bool(cfg.best_metric) and self._judge(last_eval)
                self.stopped_early = patience_out and not done  # ended before its budget
            if cfg.early_stopping and self.val and (self.step % cfg.eval_every == 0 or done):
                if self.world.size > 1 and not self.parallel.together:  # rank 0 alone judged
                    self.stopped_early = (
                        distributed.mean_over_ranks(float(self.stopped_early), self.world, self.device) > 0
                    )
                if self.stopped_early and not done and self.world.main:
                    self.on_event(
                        "note",
                        {
                            "text": f"early stopping at step {self.step}: {cfg.best_metric} has not improved on "
                            f"{self.best['value']:.6g} (step {self.best['step']}) in {self.evals_since_best} evaluations"
                        },
                    )
                done = done or self.stopped_early
            self.settle(wait=False)
            if self.step % cfg.save_every == 0 or done:
                self.elapsed += time.perf_counter() - started
                started = time.perf_counter()
                self._save()
        self.settle(wait=True)
        self.elapsed += time.perf_counter() - started
        if self._trackers is not None:
            self._trackers.close()
        summary = {"steps": self.step, "tokens": self.tokens, "minutes": self.elapsed / 60, "val": last_eval}
        if cfg.best_metric:
            summary.update(best=self.best, stopped_early=self.stopped_early)
        self.on_event("end", summary)
        return summary
