"""Fine-tuning tasks, one module each, registered by name: `lmlab finetune --task NAME` and
`lmlab.finetune.finetune` look them up here.

  classify  sequence classification / regression (tables, JSONL)     head: classify
  ner       token classification (CoNLL)                             head: tag
  qa        extractive question answering (SQuAD v1.1 / v2.0)        head: span
  seq2seq   text -> text: translation, summarization (JSONL / TSV)    head: lm (generative families)
  chat      instruction tuning on conversations (messages JSONL)     head: lm (decoders, prefix-LMs)

The registry names each task's class by module path, so listing the tasks (the CLI's choices)
imports none of them; a new task is one module and one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lmlab.errors import ConfigError

if TYPE_CHECKING:
    from lmlab.tasks.base import Task

REGISTRY: dict[str, str] = {
    "classify": "lmlab.tasks.classify:Classify",
    "ner": "lmlab.tasks.ner:NER",
    "qa": "lmlab.tasks.qa:QA",
    "seq2seq": "lmlab.tasks.seq2seq:Seq2Seq",
    "chat": "lmlab.tasks.chat:Chat",
}
TASK_NAMES = tuple(REGISTRY)
_loaded: dict[str, Task] = {}


def get_task(name: str) -> Task:
    """The task registered under `name`, or a ConfigError listing the tasks."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(REGISTRY)}")
    if name not in _loaded:
        module, cls = REGISTRY[name].split(":")
        _loaded[name] = getattr(importlib.import_module(module), cls)()
    return _loaded[name]


def all_tasks() -> dict[str, Task]:
    return {name: get_task(name) for name in REGISTRY}


__all__ = ["REGISTRY", "TASK_NAMES", "all_tasks", "get_task"]
