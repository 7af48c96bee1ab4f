"""The task table: every task is one module under lorafit/tasks/, and nothing outside that package asks a task's name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lorafit import tasks
from lorafit.recipe import Recipe
from lorafit.tasks.base import Task

PACKAGE = Path(tasks.__file__).resolve().parent.parent
# A task name spelled as a string, or the recipe's task compared with anything.
BRAIDED = re.compile(r"""["'](%s)["']|\btask\s*(==|!=)|\.task\s+(not\s+)?in\b""" % "|".join(map(re.escape, tasks.TASKS)))


def test_no_code_outside_the_tasks_package_compares_or_spells_a_task_name():
    """Adding a task is one module and one table row: the shared pipeline asks the task instead of naming it."""
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
                 for path in sorted(PACKAGE.rglob("*.py")) if "tasks" not in path.relative_to(PACKAGE).parts
                 for number, line in enumerate(path.read_text().splitlines(), start=1) if BRAIDED.search(line)]
    assert offenders == []


def test_every_task_in_the_table_is_a_complete_task_module():
    """Each table row is a Task subclass instance named as its key, with a summary the recipe schema shows."""
    assert tasks.DEFAULT in tasks.TASKS
    for name, task in tasks.TASKS.items():
        assert isinstance(task, Task) and task.name == name
        assert task.summary.startswith(f"{name}: ")
        assert task.summary in Recipe.model_fields["task"].description
        assert task.peft_task_type in ("CAUSAL_LM", "SEQ_CLS")
    schema = json.dumps(Recipe.model_json_schema())
    assert all(name in schema for name in tasks.TASKS)


@pytest.mark.parametrize("name", [n for n, t in tasks.TASKS.items() if not t.streams])
def test_tasks_that_cannot_stream_refuse_data_streaming(make_recipe, tiny_llama, toy_data, name):
    """data.streaming is honoured or refused by name, never ignored (a preference task used to read everything)."""
    raw = make_recipe(tiny_llama, toy_data, task=name, data={"streaming": True},
                      training={"max_steps": 2})
    with pytest.raises(Exception, match="data.streaming: only task causal-lm streams its data"):
        Recipe.model_validate(raw)


@pytest.mark.parametrize("name", ["dpo", "kto", "orpo"])
def test_preference_tasks_refuse_weighted_sources(make_recipe, tiny_llama, tmp_path, name, no_model_load):
    """Weighted data.train entries under a preference task are refused with one line, not joined unweighted."""
    from cli_helpers import assert_one_line_error, cli, write_recipe

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n"
                             for i in range(8)))
    raw = make_recipe(tiny_llama, pairs, tmp_path / "run", task=name,
                      data={"train": [{"path": str(pairs), "weight": 2}, {"path": str(pairs), "weight": 1}]})
    code, lines = cli("train", str(write_recipe(tmp_path / "r.yaml", raw)), "--dry-run")
    assert_one_line_error(code, lines, "data.train", "weighted sources are for task causal-lm")
