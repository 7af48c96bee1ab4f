"""What a task is: the one place that lists what differs between causal-lm, classification, dpo, kto, orpo...

A task module (lorafit/tasks/<name>.py) defines one subclass of `Task` and one instance of it, `TASK`; the table in
lorafit/tasks/__init__.py maps the recipe's `task` value to it. The shared pipeline (train.py, evaluate.py, data.py,
run_record.py ...) never compares the task name: it asks the task. The defaults here are those of a task that trains a
causal LM on text rows; a task overrides what it does differently. Module-level imports stay light (no torch, no
recipe): the recipe schema imports this package to list the tasks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lorafit.data import DataReport, PreparedData
    from lorafit.evaluate import EvalInputs, EvalPlan
    from lorafit.recipe import Recipe


class Task(ABC):
    """One recipe `task`: its recipe rules, rows, trainer, logged metrics, eval scoring and model-card text."""

    name: ClassVar[str]
    summary: ClassVar[str]  # what `task: <name>` means: the recipe field's description is built from these
    peft_task_type: ClassVar[str] = "CAUSAL_LM"  # PEFT's task_type in adapter_config.json
    classifier: ClassVar[bool] = False  # loads AutoModelForSequenceClassification (a head over data.labels)
    generates: ClassVar[bool] = True  # the model writes answers: generation stop tokens matter
    data_driven_init: ClassVar[bool] = False  # its rows can start adapter.init eva / corda (SFT rows)
    streams: ClassVar[bool] = False  # data.streaming is honoured
    mixes_sources: ClassVar[bool] = False  # weighted data.train entries are drawn by weight
    prepares_in_parallel: ClassVar[bool] = True  # data.num_proc is honoured (its rows are tokenized in processes)
    sections: ClassVar[frozenset[str]] = frozenset()  # optional recipe parts it reads: "preference", "data.labels"

    def check_recipe(self, recipe: Recipe) -> None:
        """Refuse settings this task cannot honour; raise ValueError naming the key path (the schema's validator)."""

    @abstractmethod
    def prepare_data(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, *,
                     allow_code: bool = False) -> PreparedData:
        """Read, render, tokenize and lint the recipe's rows for this task's trainer. `allow_code`: the command line
        allowed running the recipe's Python (--allow-code), which a task may need (custom rewards)."""

    @abstractmethod
    def trainer_classes(self, recipe: Recipe) -> tuple[type, type, dict[str, Any]]:
        """The HF TrainingArguments class, the trainer class, and the arguments only this task sets."""

    def trainer_options(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase,
                        prepared: PreparedData) -> dict[str, Any]:
        """Keyword arguments for the trainer's constructor beyond the shared ones (model, args, data, callbacks)."""
        return {}

    def logged_metrics(self, recipe: Recipe) -> tuple[str, ...]:
        """Trainer log keys kept in metrics.json's loss history (and their eval_ twins) beyond loss and lr."""
        return ()

    def metric_fields(self, recipe: Recipe, history: list[dict], report: DataReport) -> dict[str, Any]:
        """TrainMetrics fields only this task fills (classes, preference rewards, the supervised token share)."""
        return {"supervised_token_share": report.supervised_share}

    def eval_labels(self, recipe: Recipe, trained: list, config, notes: list[str]) -> list[str] | None:
        """The class names a classifier head is built over in eval (None: no head)."""
        return None

    def eval_plan(self, inputs: EvalInputs) -> EvalPlan:
        """The eval rows and how one model is measured on them (lorafit/evaluate.py runs the plan per model)."""
        from lorafit.evaluate import causal_plan

        return causal_plan(inputs)

    def card_description(self, recipe: Recipe) -> str:
        """What the adapter carries besides itself, appended to the model card's first line ('' for nothing)."""
        return ""


def last_logged(history: list[dict], key: str) -> float | None:
    """The last value the trainer logged under `key` (None if never)."""
    for entry in reversed(history):
        if key in entry:
            return entry[key]
    return None
