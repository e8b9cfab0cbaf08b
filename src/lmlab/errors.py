"""lmlab's error types. Every message says where (file, line, field) and what was expected."""

from __future__ import annotations


class LmlabError(Exception):
    """Base class of every error lmlab raises on purpose."""


class ConfigError(LmlabError, ValueError):
    """A model or run configuration that cannot work (unknown value, inconsistent sizes)."""


class CheckpointError(LmlabError):
    """A model folder or weights file that cannot be read as what it claims to be."""


class DataError(LmlabError, ValueError):
    """Input data that cannot be read (bad encoding, bad JSON line, missing field)."""


class DistributedError(LmlabError, RuntimeError):
    """A multi-process run that cannot go on: a collective timed out or a peer process stopped."""
