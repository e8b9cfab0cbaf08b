"""A training checkpoint's manifest: every file's size and SHA-256, written last, checked first.

    run/checkpoints/step-00000100/manifest.json

Resuming and `lmlab.load` check a checkpoint against it: a truncated, changed or missing file is
named in a CheckpointError, and resuming falls back to the checkpoint before (lmlab.checkpoint.layout).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lmlab.errors import CheckpointError

MANIFEST = "manifest.json"


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
