"""Fine-tuning tasks, one module each, registered by name: `lmlab finetune --task NAME` and
`lmlab.finetune.finetune` look them up here.

  classify  sequence classification / regression (tables, JSONL)     head: classify
  ner       token classification (CoNLL)                             head: tag
  qa        extractive question answering (SQuAD v1.1 / v2.0)        head: span
"""

from __future__ import annotations

from lmlab.errors import ConfigError
from lmlab.tasks.base import Setup, Task, TaskData
from lmlab.tasks.classify import Classify
from lmlab.tasks.ner import NER
from lmlab.tasks.qa import QA

TASKS: dict[str, Task] = {t.name: t for t in (Classify(), NER(), QA())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Setup", "Task", "TaskData", "get_task"]
