"""Hostile model folders: each case takes a good lmlab folder and breaks it the way an attacker or a
broken download would; `lmlab.load` must refuse it with a CheckpointError that names the file and
the problem, before it allocates the tensors or runs anything.

    python -m tests.reliability hostile
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import torch


def good(folder: Path) -> Path:
    """A small GPT folder, saved by lmlab."""
    import lmlab

    torch.manual_seed(0)
    cfg = lmlab.preset("gpt2-tiny", vocab_size=64, n_layers=1, d_model=16, n_heads=2, d_ff=32, max_seq_len=32)
    lmlab.save(lmlab.Model(cfg), folder)
    return folder


def _raw(folder: Path) -> tuple[dict, bytes]:
    data = (folder / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(folder: Path, header: dict, body: bytes, length: int | None = None) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + body)


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def header_beyond_file(folder: Path) -> None:
    header, body = _raw(folder)
    _write(folder, header, body, length=10**9)


def overlapping_offsets(folder: Path) -> None:
    header, body = _raw(folder)
    names = [k for k in header if k != "__metadata__"]
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]  # two tensors on the same bytes
    _write(folder, header, body)


def offsets_past_the_end(folder: Path) -> None:
    header, body = _raw(folder)
    k = _first(header)
    start, end = header[k]["data_offsets"]
    header[k]["data_offsets"] = [start + len(body), end + len(body)]
    _write(folder, header, body)


def shape_that_overflows(folder: Path) -> None:
    header, body = _raw(folder)
    header[_first(header)]["shape"] = [2**62, 2**62]
    _write(folder, header, body)


def huge_shape_in_the_header(folder: Path) -> None:
    """A consistent file whose first tensor is far larger than config.json allows: refused from the header."""
    header, body = _raw(folder)
    k = _first(header)
    header = {k: {"dtype": "F32", "shape": [2**16, 2**10], "data_offsets": [0, 2**28]}}
    _write(folder, header, b"")
    with open(folder / "model.safetensors", "r+b") as f:  # a sparse 256 MiB of data
        f.truncate(f.seek(0, os.SEEK_END) + 2**28)


def unknown_dtype(folder: Path) -> None:
    header, body = _raw(folder)
    header[_first(header)]["dtype"] = "Q7"
    _write(folder, header, body)


def truncated_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _index(folder: Path, name: str) -> None:
    header, _ = _raw(folder)
    os.replace(folder / "model.safetensors", folder / "part-1.safetensors")
    weight_map = {k: "part-1.safetensors" for k in header if k != "__metadata__"}
    weight_map[_first(header)] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def index_with_dotdot(folder: Path) -> None:
    _index(folder, "../outside.safetensors")


def index_with_absolute_path(folder: Path) -> None:
    _index(folder, "/etc/passwd")


def index_through_a_symlink(folder: Path) -> None:
    outside = folder.parent / f"{folder.name}-outside.safetensors"
    outside.write_bytes((folder / "model.safetensors").read_bytes())
    _index(folder, "link.safetensors")
    (folder / "link.safetensors").symlink_to(outside)


class Payload:
    """Unpickling this runs code: it creates the file `target`."""

    target = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def pickle_that_runs_code(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    Payload.target = str(folder / "pwned")
    torch.save({"w": Payload()}, folder / "pytorch_model.bin")  # read when no safetensors is there


def _config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model"].update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def vocabulary_of_a_trillion(folder: Path) -> None:
    _config(folder, vocab_size=10**12)


def a_billion_layers(folder: Path) -> None:
    _config(folder, n_layers=10**9)


def a_sinusoidal_table_of_a_trillion_positions(folder: Path) -> None:
    """A consistent sinusoidal-position folder (no position weights: the table is built at load time)."""
    from safetensors.torch import load_file, save_file

    _config(folder, position="sinusoidal", max_seq_len=10**12)
    state = load_file(str(folder / "model.safetensors"))
    state.pop("decoder.pos_embed.weight")
    save_file(state, str(folder / "model.safetensors"))


def config_that_is_not_json(folder: Path) -> None:
    (folder / "config.json").write_text('{"lmlab_format": 2, "model": {')


# case -> (how to break a good folder, what the error must say)
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "header length beyond the file": (header_beyond_file, r"model.safetensors: not a readable safetensors file"),
    "overlapping offsets": (overlapping_offsets, r"model.safetensors: not a readable safetensors file"),
    "offsets past the end": (offsets_past_the_end, r"model.safetensors: not a readable safetensors file"),
    "a shape whose size overflows": (shape_that_overflows, r"model.safetensors: not a readable safetensors file"),
    "a huge shape in a consistent header": (huge_shape_in_the_header, r"model.safetensors: tensor .* has shape \(65536, 1024\), but config.json implies"),
    "an unknown dtype": (unknown_dtype, r"model.safetensors: not a readable safetensors file"),
    "weights cut in half": (truncated_weights, r"model.safetensors: not a readable safetensors file"),
    "an index entry with ../": (index_with_dotdot, r"index.json: names the file '../outside.safetensors', which is not a file name inside"),
    "an index entry with an absolute path": (index_with_absolute_path, r"index.json: names the file '/etc/passwd'"),
    "an index entry through a symlink": (index_through_a_symlink, r"index.json: 'link.safetensors' leads outside"),
    "a pickle that would run code": (pickle_that_runs_code, r"pytorch_model.bin: not a weights-only checkpoint"),
    "a vocabulary of 10^12": (vocabulary_of_a_trillion, r"config.json: describes a model of at least this size \(.* GiB\), more than the .* available \(vocab_size=1,000,000,000,000"),
    "10^9 layers": (a_billion_layers, r"config.json: 1,000,000,000 layers; lmlab builds at most 10,000"),
    "a sinusoidal table of 10^12 positions": (a_sinusoidal_table_of_a_trillion_positions, r"config.json: describes a model of 3,280 parameters \(.* GiB\), more than"),
    "config.json that is not JSON": (config_that_is_not_json, r"config.json: line 1, column \d+: not valid JSON"),
}  # fmt: skip


def attack(folder: Path, name: str) -> dict:
    """Break a fresh good folder with case `name`, load it; what happened (the error, the time, RSS)."""
    import re
    import resource

    import lmlab

    breaker, pattern = CASES[name]
    lmlab.load(good(folder))  # the good folder loads (and the loading code is imported before timing)
    breaker(folder)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        lmlab.load(folder)
        error, kind = None, None
    except Exception as e:  # noqa: BLE001  (what comes out is the point)
        error, kind = str(e), type(e).__name__
    return {
        "case": name,
        "refused": kind == "CheckpointError" and bool(re.search(pattern, error or "")),
        "error_type": kind,
        "error": error,
        "seconds": round(time.perf_counter() - t0, 3),
        "rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024, 1),
        "code_ran": (folder / "pwned").exists(),
    }
