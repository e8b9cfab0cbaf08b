"""The checkpoints of a training run: one folder per step, published atomically.

    run/checkpoints/step-00000100/      a checkpoint (model.safetensors + config.json, optimizer.pt,
                                        state.pt; or dcp/ in their place when sharded), manifest.json
    run/checkpoints/latest              the name of the newest complete checkpoint

A checkpoint is written into `.tmp-step-*`, given its manifest, fsynced, then renamed; `latest` is
replaced last. A crash while writing leaves a `.tmp-*` folder and the previous `latest` untouched. A
disk that fills up (or a file-size limit) during a save removes the partial folder and raises a
CheckpointError saying so; the previous checkpoint stays (`writing`). Resuming takes the newest
checkpoint that passes its manifest (`good_checkpoint`). What goes into a checkpoint is the trainer's
(lmlab.train.checkpoint); this module is the layout alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmlab.checkpoint.manifest import verify_checkpoint, write_manifest
from lmlab.errors import CheckpointError


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


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def publish(root: Path, tmp: Path, name: str, keep: int) -> Path:
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
