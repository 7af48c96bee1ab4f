"""The tasks lorafit trains, one module each; the recipe's `task` value picks one from `TASKS`.

Outside this package no code compares the task name: it asks the task (lorafit/tasks/base.py lists what a task
decides). Adding a task is one new module with a `Task` subclass, one row below, its tests and its docs page
(docs/architecture.md, "Adding a task").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorafit.tasks import causal_lm, classification, dpo, grpo, kto, orpo, rloo
from lorafit.tasks.base import Task

if TYPE_CHECKING:
    from lorafit.adapters import TrainedAdapter
    from lorafit.recipe import Recipe

TASKS: dict[str, Task] = {task.name: task for task in (
    causal_lm.TASK,
    classification.TASK,
    dpo.TASK,
    kto.TASK,
    orpo.TASK,
    grpo.TASK,
    rloo.TASK,
)}
DEFAULT = causal_lm.TASK.name  # a recipe without `task`


def task_of(recipe: Recipe) -> Task:
    """The task a recipe trains."""
    return TASKS[recipe.task]


def names_where(predicate) -> str:
    """The task names for which `predicate(task)` holds, as a recipe message lists them ("dpo, kto or orpo")."""
    names = [name for name, task in TASKS.items() if predicate(task)]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def model_kind(peft_task_type: str | None) -> str:
    """What a model with an adapter of this PEFT task type is, named by the first task of that type (causal-lm for
    every causal-LM adapter, sequence-classification for a classifier head): merge.json's `task`."""
    return next((name for name, task in TASKS.items() if task.peft_task_type == peft_task_type), DEFAULT)


def checkpoint_task(recipe: Recipe) -> str | None:
    """The task as a checkpoint's fingerprint records it: None for the default task, so that runs recorded before
    recipes had `task` still resume."""
    return None if recipe.task == DEFAULT else recipe.task


def check_adapter_task(adapter: TrainedAdapter, recipe: Recipe) -> None:
    """Refuse an adapter whose PEFT task type (a causal LM, a classifier head) differs from the recipe task's."""
    from lorafit.errors import LorafitError

    task_type = adapter.config.get("task_type")
    known = {task.peft_task_type for task in TASKS.values()}
    if task_type in known and task_type != task_of(recipe).peft_task_type:
        raise LorafitError(f"is a {model_kind(task_type)} adapter, but the recipe's task is {recipe.task}",
                           where=f"adapter: {adapter.path}", hint="evaluate it with the recipe it was trained with")
