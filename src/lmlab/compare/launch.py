"""Starting one unit's process, the same way here and on a Ray worker.

A unit runs as `python -m lmlab.compare.unit SPEC` (under torchrun with --nproc). Its folder is emptied
first: a unit that was interrupted (or whose Ray worker died) starts again from nothing, so no half-written
metrics.jsonl or checkpoint of the earlier attempt leaks into its results. The process dies with whoever
started it (Linux's parent-death signal), so killing `lmlab compare` or a Ray worker leaves no unit
running on behind it that could write into the folder a retry is using.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

PR_SET_PDEATHSIG = 1


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when it is missing or half-written."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader sees the old file or the new one, never part of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def unit_command(spec: dict[str, Any], spec_path: Path) -> list[str]:
    """The unit's process: `python -m lmlab.compare.unit SPEC`, under torchrun on this machine with --nproc."""
    nproc = int(spec["compare"].get("nproc") or 1)
    if nproc == 1:
        return [sys.executable, "-m", "lmlab.compare.unit", str(spec_path)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return launcher + ["-m", "lmlab.compare.unit", str(spec_path)]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def exit_with_parent(every: float = 1.0) -> None:
    """End this process when its parent is gone (a torchrun whose launcher was killed, say): a thread
    watches for the process being handed to another parent."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def start_unit(spec: dict[str, Any], unit_dir: Path) -> tuple[subprocess.Popen, TextIO]:
    """Empty `unit_dir`, write the spec there and start the unit; returns the process and its open log."""
    if unit_dir.exists():
        shutil.rmtree(unit_dir)
    unit_dir.mkdir(parents=True)
    spec_path = unit_dir / "spec.json"
    write_json(spec_path, spec)
    log = open(unit_dir / "unit.log", "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        unit_command(spec, spec_path), stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
    )
    return proc, log


def failure(spec: dict[str, Any], unit_dir: Path, returncode: int, where: str = "") -> str:
    """What to tell the user about a unit that failed: which, how, where its log is, and its last lines."""
    tail = (unit_dir / "unit.log").read_text(errors="replace").strip().splitlines()[-8:]
    name, seed = spec["contender"]["name"], spec["seed"]
    return f"the unit {name} seed {seed} failed (exit {returncode}{where}); its log is {unit_dir / 'unit.log'}:\n" + (
        "\n".join(tail)
    )
