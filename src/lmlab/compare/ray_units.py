"""`lmlab compare --ray`: the units of a comparison side by side, as Ray tasks.

A comparison is many independent units (contender x seed), each a process that pre-trains, measures and
fine-tunes one model (lmlab.compare.unit). Here each becomes a Ray task that asks for the CPUs and GPUs
of --unit-cpus / --unit-gpus; Ray runs as many at once as the cluster has room for, wherever it has it.
lmlab grows no scheduler of its own: Ray places, queues and retries.

- **Where the files are.** A unit reads the shared tokenizer, the corpus, the questions and the task files
  and writes its folder under OUT/runs. When every node mounts OUT (NFS, a cluster file system, or one
  machine), a unit reads and writes there directly. When a node does not, the driver packs the inputs
  once into Ray's object store, the unit runs in a temporary folder on its node and returns its folder,
  which the driver unpacks into OUT/runs. `--ray-files auto` probes every node for a token the driver
  writes into OUT and picks; `shared` and `ship` force one way.
- **Retries.** A task whose worker process dies (killed, out of memory, its node lost) is run once more
  (Ray's max_retries=1); the unit's folder is emptied first (lmlab.compare.launch), and a unit process
  dies with its worker, so the two attempts never write into one folder at once. A unit that fails by
  itself (bad data, a bug) is not retried: its log is shown.
- **Several processes per unit.** With --nproc N the unit's torchrun runs inside a placement group of one
  bundle (its CPUs and GPUs on one node): the N processes share what the unit reserved.
- **Progress.** Each task reports its node and the unit's stage to a small actor (Board) that the
  driver's live table reads twice a second.

Resuming is the lab's: finished units carry their fingerprint in result.json and are not sent again.
"""

from __future__ import annotations

import io
import logging
import shutil
import socket
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from lmlab.compare.launch import failure, read_json, start_unit, write_json
from lmlab.compare.results import UnitResult
from lmlab.compare.settings import CompareConfig
from lmlab.errors import ConfigError

SHARE_MARK = ".ray-share"  # OUT/.ray-share holds this run's token: a node that reads it sees OUT
POLL = 0.5


class UnitFailed(Exception):
    """A unit's own process exited with an error (not retried: running it again would fail again)."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--ray runs the units on Ray, which is not installed here: pip install 'lmlab[ray]'"
        ) from None
    return ray


class Board:
    """Where each unit runs, which attempt it is, and its last stage: written by the tasks, read by the
    driver (a Ray actor of no CPU)."""

    def __init__(self) -> None:
        self.units: dict[str, dict[str, Any]] = {}

    def start(self, key: str, where: dict[str, Any]) -> int:
        attempt = self.units.get(key, {}).get("attempt", 0) + 1
        self.units[key] = {**where, "attempt": attempt, "started": time.time(), "stage": {}}
        return attempt

    def stage(self, key: str, stage: dict[str, Any]) -> None:
        if key in self.units:
            self.units[key]["stage"] = stage

    def read(self) -> dict[str, dict[str, Any]]:
        return self.units


def _key(spec: dict[str, Any]) -> str:
    return f"{spec['contender']['name']}/seed{spec['seed']}"


def _pack(paths: dict[str, Path]) -> bytes:
    """A gzip tar of files and folders, each under its given name."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for name, path in paths.items():
            tar.add(path, arcname=name)
    return buffer.getvalue()


def _unpack(data: bytes, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(into, filter="data")  # refuses absolute names, links out and devices


def _inputs(spec: dict[str, Any]) -> dict[str, Path]:
    """Every file a unit reads, under a name of its own: what a node that does not see OUT is sent."""
    named = {"tokenizer": Path(spec["tokenizer"]), "questions.jsonl": Path(spec["questions"])}
    for i, path in enumerate(spec["data"]):
        named[f"data/{i}/{Path(path).name}"] = Path(path)
    for task in spec["tasks"]:
        for part in ("train", "eval"):
            named[f"tasks/{task['name']}/{part}/{Path(task[part]).name}"] = Path(task[part])
    return named


def _staged(spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """The spec with its inputs in `root/inputs` (unpacked from _inputs' names) and its folder in `root/unit`."""
    inputs = root / "inputs"
    spec = {**spec, "dir": str(root / "unit"), "cache": str(root / "cache")}
    spec["tokenizer"] = str(inputs / "tokenizer")
    spec["questions"] = str(inputs / "questions.jsonl")
    spec["data"] = [str(inputs / "data" / str(i) / Path(p).name) for i, p in enumerate(spec["data"])]
    spec["tasks"] = [
        {**t, **{part: str(inputs / "tasks" / t["name"] / part / Path(t[part]).name) for part in ("train", "eval")}}
        for t in spec["tasks"]
    ]
    return spec


def _sees(out: str, token: str) -> bool:
    try:
        return (Path(out) / SHARE_MARK).read_text() == token
    except OSError:
        return False


def _where() -> dict[str, Any]:
    import ray

    context = ray.get_runtime_context()
    return {
        "node": context.get_node_id(),
        "host": socket.gethostname(),
        "ip": ray.util.get_node_ip_address(),
        "placement_group": context.get_placement_group_id(),  # --nproc N: the unit's torchrun shares its bundle
    }


def unit_task(spec: dict[str, Any], token: str, inputs: bytes | None, board: Any) -> dict[str, Any]:
    """One unit on a Ray worker: its process, its progress to the board; returns its result (and its folder,
    packed, when the node does not see OUT). `inputs`: the packed inputs (Ray resolves the object before the
    task starts), or None when every node sees OUT.

    The task never waits on Ray (ray.get) before its unit has finished: Ray lends a task's CPUs to other
    tasks while it waits, and a third unit would start on a node of two CPUs."""
    import ray

    key, where = _key(spec), _where()
    # sent, not waited for: a worker killed in its first moments may die before the call goes out, and the
    # retry then reads as attempt 1 (tests/reliability/ray_units.py counts those)
    attempt_ref = board.start.remote(key, where)
    out = spec["compare"]["out"]
    shared = _sees(out, token) and spec["compare"]["ray_files"] != "ship"  # read and write OUT in place
    if not shared and inputs is None:
        raise UnitFailed(
            f"the Ray node {where['host']} ({where['ip']}) does not see the output folder {out}: mount it on "
            "every node, or run with --ray-files ship"
        )
    with tempfile.TemporaryDirectory(prefix="lmlab-unit-") as tmp:
        if not shared:
            _unpack(inputs, Path(tmp) / "inputs")
            spec = _staged(spec, Path(tmp))
        unit_dir = Path(spec["dir"])
        started = time.time()
        proc, log = start_unit(spec, unit_dir)
        while proc.poll() is None:
            time.sleep(POLL)
            board.stage.remote(key, read_json(unit_dir / "stage.json"))
        log.close()
        attempt = ray.get(attempt_ref)
        if proc.returncode != 0:
            raise UnitFailed(failure(spec, unit_dir, proc.returncode, f" on {where['host']}, attempt {attempt}"))
        result = read_json(unit_dir / "result.json")
        result["ran_on"] = {**where, "attempt": attempt, "started": started, "ended": time.time()}
        write_json(unit_dir / "result.json", result)
        files = None if shared else _pack({".": unit_dir})
    return {"result": result, "files": files}


def _absolute(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with every path absolute: a Ray worker's working folder is not the driver's."""

    def a(p: str) -> str:
        return str(Path(p).resolve())

    spec = {**spec, "compare": {**spec["compare"], "out": a(spec["compare"]["out"])}}
    for k in ("dir", "tokenizer", "cache", "questions"):
        spec[k] = a(spec[k])
    spec["data"] = [a(p) for p in spec["data"]]
    spec["tasks"] = [{**t, "train": a(t["train"]), "eval": a(t["eval"])} for t in spec["tasks"]]
    return spec


def _nodes(ray: Any) -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _check_fits(nodes: list[dict[str, Any]], cpus: float, gpus: float) -> None:
    fits = [n for n in nodes if n["Resources"].get("CPU", 0) >= cpus and n["Resources"].get("GPU", 0) >= gpus]
    if not fits:
        have = ", ".join(
            f"{n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPUs, {n['Resources'].get('GPU', 0):g} GPUs"
            for n in nodes
        )
        raise ConfigError(
            f"each unit asks for {cpus:g} CPUs and {gpus:g} GPUs (--unit-cpus, --unit-gpus), which no node of the "
            f"Ray cluster has ({have})"
        )


def run_on_ray(cc: CompareConfig, out: Path, pending: list[dict[str, Any]], emit: Any) -> dict[tuple[str, int], Any]:
    """Run the `pending` unit specs as Ray tasks; returns (contender, seed) -> UnitResult as each is written
    into OUT/runs. Connects to cc.ray (or starts Ray here when it is "local" and none is running)."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        emit("stage", {"text": "starting Ray" if cc.ray == "local" else f"connecting to Ray at {cc.ray}"})
        try:
            ray.init(
                address=None if cc.ray == "local" else cc.ray,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            hint = (
                "; a cluster once started here with `ray start` and no longer running is still recorded: "
                "`ray stop` forgets it"
                if cc.ray == "local"
                else ""
            )
            raise ConfigError(f"--ray {cc.ray}: could not connect to a Ray cluster ({e}){hint}") from None
    try:
        return _run(ray, cc, out, pending, emit)
    finally:
        if started_here:
            ray.shutdown()


def _run(
    ray: Any, cc: CompareConfig, out: Path, pending: list[dict[str, Any]], emit: Any
) -> dict[tuple[str, int], Any]:
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    cpus = float(cc.unit_cpus or cc.nproc)
    gpus = float(cc.unit_gpus)
    nodes = _nodes(ray)
    _check_fits(nodes, cpus, gpus)
    token = uuid.uuid4().hex
    (out / SHARE_MARK).write_text(token)
    out_abs = str(out.resolve())
    ship = cc.ray_files == "ship"
    if cc.ray_files == "auto":  # does every node read the token this run just wrote?
        probe = ray.remote(num_cpus=0)(_sees)
        seen = ray.get(
            [
                probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                    out_abs, token
                )
                for n in nodes
            ]
        )
        ship = not all(seen)
    emit("stage", {"text": f"on Ray: {len(nodes)} node(s), files {'shipped' if ship else 'shared'}"})
    board = ray.remote(num_cpus=0)(Board).remote()
    task = ray.remote(max_retries=1, retry_exceptions=False)(unit_task)
    specs = [{**_absolute(s), "threads": max(1, int(cpus))} for s in pending]
    inputs = ray.put(_pack(_inputs(specs[0]))) if ship else None  # every unit reads the same inputs
    refs: dict[Any, dict[str, Any]] = {}
    groups: dict[str, Any] = {}
    for spec in specs:
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "name": f"lmlab-unit:{_key(spec)}"}
        if cc.nproc > 1:  # torchrun's processes share one bundle on one node
            bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
            groups[_key(spec)] = pg = placement_group([bundle], strategy="STRICT_PACK")
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        refs[task.options(**options).remote(spec, token, inputs, board)] = spec
    finished: dict[tuple[str, int], Any] = {}
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=POLL)
            running = ray.get(board.read.remote())
            for spec in refs.values():
                if (state := running.get(_key(spec))) is not None:
                    emit("unit", _running(spec, state))
            for ref in ready:
                spec = refs.pop(ref)
                if (pg := groups.pop(_key(spec), None)) is not None:
                    remove_placement_group(pg)
                finished[(spec["contender"]["name"], spec["seed"])] = _collect(ray, ref, spec, pending, emit)
    except BaseException:
        for ref in refs:  # the units not finished: stopped (their finished siblings stay on disk)
            ray.cancel(ref, force=True)
        raise
    return finished


def placed(where: dict[str, Any]) -> str:
    """A node as the live table shows it: its host and the start of its Ray node id (several nodes may share
    a host), and the attempt when it is a retry."""
    text = f"{where['host']} {where['node'][:6]}"
    return text + (f", attempt {where['attempt']}" if where.get("attempt", 1) > 1 else "")


def _running(spec: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    return {
        "contender": spec["contender"]["name"],
        "seed": spec["seed"],
        "status": "running",
        "stage": state.get("stage") or {},
        "elapsed": time.time() - state["started"],
        "where": placed(state),
    }


def _collect(ray: Any, ref: Any, spec: dict[str, Any], pending: list[dict[str, Any]], emit: Any) -> UnitResult:
    name, seed = spec["contender"]["name"], spec["seed"]
    try:
        got = ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), UnitFailed) else e
        raise ConfigError(str(cause)) from None
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.RayError) as e:
        raise ConfigError(f"the unit {name} seed {seed} was lost twice on Ray (its worker or node died): {e}") from None
    unit_dir = Path(spec["dir"])
    original = next(p for p in pending if p["contender"]["name"] == name and p["seed"] == seed)
    if got["files"] is not None:  # ran on a node that does not see OUT: its folder comes back here
        if unit_dir.exists():
            shutil.rmtree(unit_dir)
        _unpack(got["files"], unit_dir)
        write_json(unit_dir / "spec.json", original)
        write_json(unit_dir / "result.json", got["result"])
    result = UnitResult.from_dict(got["result"], str(unit_dir / "result.json"))
    emit("unit", {"contender": name, "seed": seed, "status": "done", "result": result, "where": placed(result.ran_on)})
    return result
