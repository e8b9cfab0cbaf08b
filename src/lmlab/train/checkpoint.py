"""Checkpoints: written to a temporary folder, fsynced, then renamed; `latest` is replaced last.

    run/checkpoints/step-00000100/model.safetensors   weights (lmlab format, with config.json)
    run/checkpoints/step-00000100/optimizer.pt        optimizer state (tensors and numbers only)
    run/checkpoints/step-00000100/state.pt            scheduler, RNG states, data position, counters
    run/checkpoints/latest                            the name of the newest complete checkpoint

That is the full format. The sharded one (lmlab.train.sharded) has dcp/ in place of the weights and
optimizer files; `load_checkpoint` reads either, into a model sharded or not.

    run/checkpoints/step-00000100/manifest.json       every other file's size and SHA-256

A crash while writing leaves a `.tmp-*` folder and the previous `latest` untouched. A disk that
fills up (or a file-size limit) during a save removes the partial folder and raises a
CheckpointError saying so; the previous checkpoint stays. Resuming checks the newest checkpoint
against its manifest first: a truncated, changed or missing file makes it fall back to the one
before, saying which file was bad (`good_checkpoint`). Everything is read back with safetensors or
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import CheckpointError
from lmlab.io import MANIFEST, lmlab_config, load_weights_into, save, write_config
from lmlab.train import sharded


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_dir():
            _fsync_tree(f)
            continue
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Record every file's size and SHA-256 in folder/manifest.json."""
    files = {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)} for f in _files(folder)}
    (folder / MANIFEST).write_text(json.dumps({"lmlab_checkpoint": 1, "files": files}, indent=1) + "\n")


def verify_checkpoint(path: Path) -> None:
    """Check a checkpoint folder against its manifest; a CheckpointError names the first bad file.
    Checkpoints written before manifests existed (2026-12-02) have none and pass unchecked."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        if not (path / "state.pt").is_file():
            raise CheckpointError(f"{path}: incomplete (no state.pt and no manifest)")
        return
    try:
        files = json.loads(manifest.read_text())["files"]
        items = [(str(k), int(v["size"]), str(v["sha256"])) for k, v in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest}: unreadable manifest ({e})") from None
    for rel, size, digest in items:
        f = path / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise CheckpointError(f"{manifest}: lists {rel!r}, outside the checkpoint")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (the manifest lists it)")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, the manifest says {size}: truncated or overwritten")
        if _sha256(f) != digest:
            raise CheckpointError(
                f"{f}: its SHA-256 differs from the manifest's: the file changed after it was written"
            )


def _publish(root: Path, tmp: Path, name: str, keep: int) -> Path:
    """Make a fully written `tmp` folder the checkpoint `name`: manifest, fsync, rename, then point
    `latest` at it; drop all but the newest `keep`."""
    write_manifest(tmp)
    _fsync_tree(tmp)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(name + "\n")
    with open(latest_tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(latest_tmp, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(run_dir: Path) -> None:
    """Drop the `.tmp-*` folders a crash mid-save left (call it when no save is being written)."""
    for stale in (Path(run_dir) / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep: int = 2,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically. The optimizer state is stored keyed by parameter name (torch's
    distributed state-dict format), which any world size and any parallel mode can load;
    `model_state` / `optimizer_state` give whole states gathered beforehand (from an FSDP2 model)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = _name(step)
    tmp = root / f".tmp-{name}"
    if optimizer_state is None:
        optimizer_state = optimizer_state_by_name(model, optimizer)

    def write() -> Path:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save(model, tmp, state=model_state)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(state, tmp / "state.pt")
        return _publish(root, tmp, name, keep)

    final = writing(root, tmp, step, write)
    remove_partial(run_dir)
    return final


def writing(root: Path, tmp: Path, step: int, write: Callable[[], Any]) -> Any:
    """Run `write`; if the disk fills up or a limit stops it, remove the partial folder and raise a
    CheckpointError that says so and names the checkpoint still there."""
    try:
        return write()
    except Exception as e:  # OSError, torch.save's RuntimeError, safetensors' SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        kept = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
        where = f"{root / kept} is intact" if kept else "no earlier checkpoint exists"
        room = f"{shutil.disk_usage(root).free / 2**20:,.0f} MiB free there"
        limit = _file_size_limit()
        if limit is not None:
            room += f", and this process may not write files over {limit:,} bytes (ulimit -f)"
        raise CheckpointError(
            f"step {step}: the checkpoint could not be written under {root} ({type(e).__name__}: {e}; "
            f"{room}); the partial folder was removed and {where}. "
            "Free some space (or raise the file-size limit) and resume."
        ) from e


def _file_size_limit() -> int | None:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
    main: bool = True,
    background: bool = False,
    group: Any = None,
) -> sharded.PendingSave:
    """Every rank writes its shard (lmlab.train.sharded; a collective); rank 0 (`main`) then adds the
    model's config.json and `state` and publishes the folder as `save_checkpoint` does. With
    `background` the write goes on in a thread: call the result's `finish()` before the next save."""
    root = Path(run_dir) / "checkpoints"
    name = _name(step)
    tmp = root / f".tmp-{name}"
    future = sharded.write(tmp / sharded.DCP_DIR, model, optimizer, background, group)
    config = lmlab_config(model.config)

    def publish() -> Path | None:
        if not main:
            return None

        def write() -> Path:
            write_config(tmp, config)
            torch.save(state, tmp / "state.pt")
            return _publish(root, tmp, name, keep)

        return writing(root, tmp, step, write)

    return sharded.PendingSave(step, future, publish)


def good_checkpoint(run_dir: Path, note: Callable[[str], None] = lambda text: None) -> Path | None:
    """The newest checkpoint that passes `verify_checkpoint`: the one `latest` names, else the others
    newest first. Each one skipped is reported through `note`, naming the bad file. None when the run
    has no checkpoint; a CheckpointError when it has some and none is good."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    others = sorted((p for p in root.glob("step-*") if p.is_dir() and p != named), reverse=True)
    candidates = ([named] if named is not None else []) + others
    if not candidates:
        return None
    problems = []
    for path in candidates:
        try:
            if not path.is_dir():
                raise CheckpointError(f"{pointer}: names {path.name}, which is missing")
            verify_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            note(f"skipping checkpoint {path.name}: {e}")
            continue
        if problems:
            note(f"resuming from {path.name}, the newest good checkpoint")
        return path
    raise CheckpointError(f"{root}: no good checkpoint: " + "; ".join(problems))


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.pt").is_file():
        raise CheckpointError(f"{pointer}: names {path.name}, which is incomplete or missing")
    return path


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer in place (an FSDP2 model keeps its shards); return the rest of the state."""
    from lmlab.train.distributed import is_sharded, load_full_state
    from lmlab.train.expert_parallel import expert_parameters, shard_full_state

    if sharded.is_sharded_checkpoint(path):
        return _load_sharded(path, model, optimizer)
    fsdp = is_sharded(model)
    try:
        osd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        by_index = all(isinstance(k, int) for k in osd.get("state", {}))  # before 2026-12: optimizer.state_dict()
        if expert_parameters(model):  # this rank's experts of the whole state
            if by_index:
                raise CheckpointError(
                    "its optimizer state predates name-keyed checkpoints; resume it without experts sharded"
                )
            weights, osd = shard_full_state(model, read_checkpoint_weights(path, model), osd)
            if fsdp:  # every rank holds its experts' whole rows; FSDP2 keeps its part of them
                load_full_state(model, optimizer, weights, osd)
            else:
                model.load_state_dict(weights)
                load_full_state(model, optimizer, None, osd)
        elif fsdp:
            if by_index:
                raise CheckpointError("its optimizer state predates name-keyed checkpoints; resume it without fsdp")
            load_full_state(model, optimizer, read_checkpoint_weights(path, model), osd)
        else:
            load_weights_into(model, path)
            if by_index and osd.get("state"):
                optimizer.load_state_dict(osd)
            else:
                load_full_state(model, optimizer, None, osd)
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot restore the optimizer or trainer state ({e})") from None


def read_checkpoint_weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint's whole weights, checked against the model's config."""
    from lmlab.io import migrate, read_config, read_weights

    raw = read_config(path)
    if raw.get("model") != model.config.to_dict():
        raise CheckpointError("it describes a different model than the one being restored")
    state, _ = read_weights(path)
    return migrate(state, model.config, raw.get("lmlab_format"), str(path / "config.json"))


def _load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from lmlab.io import read_config

    try:
        if read_config(path).get("model") != model.config.to_dict():
            raise CheckpointError("it describes a different model than the one being restored")
        sharded.restore(path, model, optimizer)
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (Exception, sharded.CheckpointException) as e:
        raise CheckpointError(f"{path}: cannot restore the sharded checkpoint ({sharded.why(e)})") from None
