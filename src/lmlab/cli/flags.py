"""Command-line flags generated from the settings dataclasses (lmlab.settings, ModelConfig's moe_*
fields): the flag is the field's name with dashes, its type comes from the annotation, its help and
choices from the field's metadata (`option(...)`). Every flag defaults to None, so a YAML file's value
or the dataclass default stands unless the flag is given."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def _bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_fields(
    parser: Any,
    cls: type,
    dest: str = "",
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
    required: tuple[str, ...] = (),
) -> None:
    """One flag per field of `cls` (those with flag metadata, not in `skip`, in `only` if given). `dest`
    prefixes where the value lands in the namespace ("train." -> args.train.max_steps is read back by
    `collect`)."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("flag", False) or f.name in skip or (only is not None and f.name not in only):
            continue
        kind = str(f.type).replace(" ", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        text = meta.get("help") or ""
        if default not in (None, "", False) and not kind.startswith("list"):
            shown = repr(default) if isinstance(default, str) and default != default.strip() else default
            text += f" (default: {shown})"
        # argparse %-formats help text: a literal % is doubled
        kw: dict[str, Any] = {"dest": dest + f.name, "default": None, "help": text.replace("%", "%%")}
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if kind == "bool":
            kw["action"] = "store_true"
        elif kind.startswith("bool|"):
            kw.update(type=_bool, metavar="{true,false}")
        elif kind.startswith("list["):
            kw["nargs"] = "+"
            kw["metavar"] = f.name.upper()
        else:
            base = kind.split("|")[0]
            kw["type"] = {"int": int, "float": float, "str": str}[base]
            if "choices" not in kw:
                kw["metavar"] = f.name.upper()
        if f.name in required:
            kw["required"] = True
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def collect(args: argparse.Namespace, cls: type, dest: str = "") -> dict[str, Any]:
    """The values of `cls`'s flags that were given on the command line."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, dest + f.name, None)
        if value is not None:
            out[f.name] = value
    return out
