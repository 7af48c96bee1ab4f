"""`lorafit init`: write a commented starter recipe for a model and a dataset.

The comments are the schema's own field descriptions (recipe.py), so `init`, `--help`, errors and docs say
the same words. The task and data format are detected from the file's columns (preference pairs: dpo; answers
labelled true/false: kto; text with a class label: sequence classification; else the chat / SFT formats, with the
common column names mapped through data.fields), and the target modules are resolved from the model's config on
the meta device (no weights read). Data it cannot place is refused with the exact lines to write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lorafit import tasks
from lorafit.errors import LorafitError
from lorafit.recipe import SECTIONS, ModelSection, Recipe, load_recipe
from lorafit.tasks import classification, dpo, kto


@dataclass
class StarterResult:
    """The recipe written, and what was detected to fill it."""

    path: Path
    data_format: str | None
    target_modules: str | list[str]
    resolved_targets: list[str]
    notes: list[str]
    task: str = tasks.DEFAULT


def run_init(model: str, data: str, out: Path, *, name: str | None = None, qlora: bool = False,
             overwrite: bool = False) -> StarterResult:
    """Write a starter recipe to `out` for `model` and `data`; returns what it detected."""
    from lorafit import adapters, models
    from lorafit.data_sources import read_source, train_sources
    from lorafit.recipe import DataSection

    if out.exists() and not overwrite:
        raise LorafitError("file already exists", where=str(out), hint="pass --overwrite or choose another --out")
    notes: list[str] = []
    data_path = Path(data).expanduser()
    model = str(Path(model).expanduser()) if model.startswith("~") else model
    data_section = DataSection(train=str(data_path.resolve()) if data_path.exists() else data)
    data_source = train_sources(data_section)[0]
    # The first rows say what the data is; a large file is not read whole for a starter recipe.
    rows = list(read_source(data_source, streaming=True).rows.take(10_000))
    columns = list(rows[0]) if rows and isinstance(rows[0], dict) else []
    data_format: str | None = None
    judged = _judged_columns(rows)
    label_columns = None if judged else _classification_columns(rows)
    if judged:  # never SFT on these rows: that would train the undesirable answers too
        task, fields, kind = judged
        notes.append(f"detected preference {kind}: task {task}")
    elif label_columns:
        task, fields = classification.CLASSIFICATION, label_columns
        classes = len({str(row.get(label_columns["label"])) for row in rows})
        notes.append(f"detected a label column ({label_columns['label']!r}, {classes} classes) beside the text column "
                     f"{label_columns['text']!r}: task {task}")
    else:
        task, (data_format, fields) = tasks.DEFAULT, _sft_format(data_source, columns)
    renamed = {key: column for key, column in fields.items() if key != column}
    if renamed:
        notes.append("mapped your columns onto the format's names in data.fields: "
                     + ", ".join(f"{column} -> {key}" for key, column in renamed.items()))

    section = ModelSection(path=model)
    targets: str | list[str] = "attention+mlp"
    try:
        source = models.resolve_model_source(section)
        meta_model, _ = models.build_meta_model(models.load_config(section, source))
        resolved = adapters.resolve_target_modules(meta_model, targets)
    except LorafitError as exc:
        notes.append(f"could not inspect the model ({exc}); target_modules left at all-linear")
        targets, resolved = "all-linear", []

    run_name = name or out.stem
    data_values: dict[str, Any] = {"train": _relative_to(data_section.train, out.parent), "eval": 0.05}
    data_values.update({"format": data_format or "auto", **({"fields": renamed} if renamed else {})})
    values: dict[str, dict[str, Any]] = {
        "": {"task": task},
        "model": {"path": model},
        "adapter": {"target_modules": targets},
        "data": data_values,
        "training": {"gradient_checkpointing": True, "optimizer": "paged_adamw_8bit"} if qlora else {},
        "quantization": {"bits": 4} if qlora else {},
    }
    comment = ("data.fields maps the format's names (left) to your columns (right)" if renamed else None)
    text = _render(run_name, str(out), values, include_quantization=qlora, resolved=resolved, data_comment=comment)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    load_recipe(out)  # what init writes must validate; a failure here is a lorafit bug, not the user's
    shape = "/".join(fields) if judged else "text+label"
    return StarterResult(out, data_format or shape, targets, resolved, notes, task=task)


# Column names people give the prompt and the answer of a row, by how often data sets use them.
_PROMPT_NAMES = ("prompt", "question", "query", "instruction", "input", "context")
_ANSWER_NAMES = ("completion", "answer", "response", "output", "target", "reply")


def _named(columns: list[str], names: tuple[str, ...]) -> str | None:
    """The first of `names` among `columns` (case-insensitive), as the data spells it."""
    return next((c for name in names for c in columns if c.lower() == name), None)


def _judged_columns(rows: list[dict[str, Any]]) -> tuple[str, dict[str, str], str] | None:
    """(task, data.fields, what the rows are) for preference rows: chosen/rejected pairs (dpo), or prompt/completion
    rows whose label is true/false (kto), else None."""
    if not rows or not isinstance(rows[0], dict):
        return None
    columns = list(rows[0])
    prompt = _named(columns, _PROMPT_NAMES)
    chosen, rejected = _named(columns, ("chosen",)), _named(columns, ("rejected",))
    if chosen and rejected:
        return (dpo.TASK.name, {"chosen": chosen, "rejected": rejected, **({"prompt": prompt} if prompt else {})},
                "pairs (chosen / rejected answers)")
    answer = _named(columns, _ANSWER_NAMES)
    label = _named(columns, ("label", "labels", "desirable", "kto_label"))
    if prompt and answer and label and all(isinstance(row.get(label), bool) for row in rows):
        return kto.TASK.name, {"prompt": prompt, "completion": answer, "label": label}, "answers labelled true / false"
    return None


def _sft_format(source, columns: list[str]) -> tuple[str, dict[str, str]]:
    """(data.format, data.fields) for chat / SFT rows: a format the columns name, else the common prompt and answer
    names mapped onto prompt-completion; otherwise a user error giving the exact lines to write."""
    from lorafit.data_sources import detect_format

    try:
        return detect_format(source, columns).format, {}
    except LorafitError:
        prompt, answer = _named(columns, _PROMPT_NAMES), _named(columns, _ANSWER_NAMES)
        if prompt and answer:
            return "prompt-completion", {"prompt": prompt, "completion": answer}
    listed = ", ".join(columns) or "none"
    raise LorafitError(
        f"cannot tell what the rows are from their columns ({listed})", where=source.where,
        hint=("write a recipe by hand with, under data:, format: prompt-completion and fields: {prompt: <your prompt "
              f"column>, completion: <your answer column>}}; or task: {dpo.TASK.name} with fields: {{prompt: ..., "
              f"chosen: ..., rejected: ...}}; or task: {kto.TASK.name} with fields: {{prompt: ..., completion: ..., "
              "label: ...} (label true/false)"))


# Column names that hold a class label, and the text it belongs to, as data sets commonly name them.
_LABEL_NAMES = ("label", "labels", "class", "category", "sentiment", "intent", "target")
_TEXT_NAMES = ("text", "sentence", "review", "content", "document", "input", "question", "comment")
_MAX_CLASSES = 50


def _classification_columns(rows: list[dict[str, Any]]) -> dict[str, str] | None:
    """{text: column, label: column} when the rows are text with a class label (few distinct short values)."""
    if not rows or not isinstance(rows[0], dict):
        return None
    columns = list(rows[0])
    label = next((c for name in _LABEL_NAMES for c in columns if c.lower() == name), None)
    text = next((c for name in _TEXT_NAMES for c in columns if c.lower() == name), None)
    if label is None or text is None:
        return None
    values = [row.get(label) for row in rows]
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) and len(str(v)) <= 64 for v in values):
        return None
    distinct = {str(v) for v in values}
    if not 2 <= len(distinct) <= min(_MAX_CLASSES, max(2, len(rows) // 2)):
        return None
    return {"text": text, "label": label}


def _relative_to(value: str, folder: Path) -> str:
    path = Path(value)
    if not path.is_absolute():
        return value
    try:
        return str(path.relative_to(folder.resolve()))
    except ValueError:
        return value


def _render(name: str, path: str, values: dict[str, dict[str, Any]], *, include_quantization: bool,
            resolved: list[str], data_comment: str | None = None) -> str:
    lines = [f"# Run: lorafit train {path}",
             "# Starter recipe written by `lorafit init`; every key is shown with its default and meaning.",
             "# Check it without loading anything: lorafit validate <this file>;"
             " see samples and counts: lorafit train <this file> --dry-run",
             f"name: {name}"]
    task = values.get("", {}).get("task", tasks.DEFAULT)
    lines.append(f"task: {task}  # {Recipe.model_fields['task'].description}")
    for section, model in SECTIONS.items():
        # The task's own optional sections only (preference for dpo / kto / orpo, rewards and rl for grpo...).
        task_only = section in Recipe.model_fields and Recipe.model_fields[section].default is None and (
            section != "quantization")
        if not section or (section == "quantization" and not include_quantization) or (
                task_only and section not in tasks.TASKS[task].sections):
            continue
        lines.append(f"{section}:")
        if section == "adapter" and resolved:
            lines.append(f"  # on this model, target_modules resolves to: {', '.join(resolved)}")
        if section == "data" and data_comment:
            lines.append(f"  # {data_comment}")
        lines.extend(_render_section(model, values.get(section, {})))
    return "\n".join(lines) + "\n"


def _render_section(model: type[BaseModel], given: dict[str, Any]) -> list[str]:
    lines = []
    for key, field in model.model_fields.items():
        if key in given:
            value = given[key]
        elif field.default is not PydanticUndefined:
            value = field.default
        elif field.default_factory is not None:
            value = field.default_factory()  # type: ignore[call-arg]
        else:
            continue
        rendered = yaml.safe_dump({key: value}, default_flow_style=True, width=1000).strip()[1:-1]
        lines.append(f"  {rendered}  # {field.description}")
    return lines
