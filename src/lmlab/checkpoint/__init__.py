"""Checkpoint and model-folder formats: what is on disk, and nothing about training.

folder.py     model folders (config.json + weights; lmlab's format and Hugging Face's through lmlab.hf):
              read, check, build through a caller's `build(config)`, write
manifest.py   a training checkpoint's manifest (sizes and SHA-256), written last and checked first
layout.py     a run's checkpoints/: step folders published atomically, `latest`, the newest good one
dcp.py        sharded (torch.distributed.checkpoint) checkpoints read in one process

It sits below both lmlab.io (the user's load / save / convert) and lmlab.train (which decides what a
checkpoint holds) and imports neither.
"""

from lmlab.checkpoint.folder import (
    CONFIG,
    FORMAT_VERSION,
    lmlab_config,
    load_config,
    load_folder,
    migrate,
    read_config,
    read_lmlab_weights,
    read_weights,
    resolve,
    save_folder,
    write_config,
)
from lmlab.checkpoint.layout import good_checkpoint, latest_checkpoint, publish, remove_partial, step_name, writing
from lmlab.checkpoint.manifest import MANIFEST, verify_checkpoint, write_manifest

__all__ = [
    "CONFIG",
    "FORMAT_VERSION",
    "MANIFEST",
    "good_checkpoint",
    "latest_checkpoint",
    "lmlab_config",
    "load_config",
    "load_folder",
    "migrate",
    "publish",
    "read_config",
    "read_lmlab_weights",
    "read_weights",
    "remove_partial",
    "resolve",
    "save_folder",
    "step_name",
    "verify_checkpoint",
    "write_config",
    "write_manifest",
    "writing",
]
