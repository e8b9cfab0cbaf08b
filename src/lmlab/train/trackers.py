"""Experiment trackers a run reports to beside metrics.jsonl (`--report-to`), each working offline.

    tensorboard   event files in RUN/tensorboard (TensorBoard reads them: tensorboard --logdir RUN)
    mlflow        MLflow's local database RUN/mlflow.db (mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db)
    trackio       trackio's local store, project "lmlab" (trackio show --project lmlab; TRACKIO_DIR moves it)
    wandb         a W&B offline run in RUN/wandb (wandb sync RUN/wandb/offline-run-* uploads it later)

Every tracker receives the run's settings once, then every record the trainer writes to metrics.jsonl,
flattened to scalar series named SPLIT/NAME (train/loss, train/lr, train/grad_norm, val/accuracy, ...);
an MoE record's per-layer routing statistics become moe/LAYER/NAME (per-expert lists: .../NAME/E).
Each is an optional extra (`pip install lmlab[tensorboard]`, ...); a missing one is named before training.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError

TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")
_NEEDS = {  # the module each tracker imports, and the extra that installs it
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
    "wandb": ("wandb", "wandb"),
}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as named scalars: SPLIT/NAME, and moe/LAYER/NAME[/EXPERT] for routing."""
    split = record.get("split", "train")
    out = {
        f"{split}/{k}": float(v)
        for k, v in record.items()
        if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for layer in record.get("moe") or ():
        for k, v in layer.items():
            if k == "layer":
                continue
            if isinstance(v, (int, float)):
                out[f"moe/{layer['layer']}/{k}"] = float(v)
            elif isinstance(v, list):
                out.update({f"moe/{layer['layer']}/{k}/{i}": float(x) for i, x in enumerate(v)})
    return out


def flat_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as dotted names -> text (what MLflow's params and TensorBoard's text take)."""
    out: dict[str, str] = {}
    for k, v in settings.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_settings(v, name + "."))
        else:
            out[name] = v if isinstance(v, str) else json.dumps(v)
    return out


class Tracker(ABC):
    """One experiment tracker: `log` a record's scalars at a step, `close` at the run's end."""

    name = ""

    @abstractmethod
    def log(self, values: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str, settings: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("settings", "\n".join(f"    {k}: {v}" for k, v in flat_settings(settings).items()), 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class MLflow(Tracker):
    """MLflow's local SQLite store (its file store is in maintenance mode and refuses new runs)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, settings: dict[str, Any]) -> None:
        import logging

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # its database migrations log at INFO, through the progress display
            logging.getLogger(name).setLevel(logging.WARNING)

        uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = self.client.get_experiment_by_name("lmlab")
        eid = experiment.experiment_id if experiment else self.client.create_experiment("lmlab")
        self.run_id = self.client.create_run(eid, run_name=run_name).info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_settings(settings).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackio(Tracker):
    name = "trackio"

    def __init__(self, run_dir: Path, run_name: str, settings: dict[str, Any]) -> None:
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):  # its banner would tear the progress display
            self.run = trackio.init(
                project="lmlab", name=run_name, config=settings, embed=False, auto_log_cpu=False, auto_log_gpu=False
            )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.run.finish()


class WandB(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, settings: dict[str, Any]) -> None:
        import wandb

        quiet = wandb.Settings(silent=True, console="off", x_disable_stats=True)
        self.run = wandb.init(
            mode="offline", dir=str(run_dir), project="lmlab", name=run_name, config=settings, settings=quiet
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "mlflow": MLflow, "trackio": Trackio, "wandb": WandB}


def check(names: list[str] | tuple[str, ...]) -> None:
    """Refuse an unknown tracker, or one whose library is missing (naming the extra), before training."""
    import importlib.util

    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--report-to {name!r} is unknown; trackers: {', '.join(TRACKERS)}")
        module, extra = _NEEDS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report-to {name} needs the {module} package: pip install 'lmlab[{extra}]'")


class Trackers:
    """The trackers of one run, opened together; a record goes to each."""

    def __init__(
        self, names: list[str] | tuple[str, ...], run_dir: str | Path, settings: dict[str, Any], run_name: str
    ) -> None:
        check(names)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.open: list[Tracker] = []
        try:
            for name in dict.fromkeys(names):
                self.open.append(_CLASSES[name](run_dir, run_name, settings))
        except Exception:
            self.close()
            raise

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            for tracker in self.open:
                tracker.log(values, int(record["step"]))

    def close(self) -> None:
        for tracker in self.open:
            tracker.close()
        self.open = []
