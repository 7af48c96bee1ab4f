"""`lorafit init`: write a commented starter recipe for a model and a dataset.

The comments are the schema's own field descriptions (recipe.py), so `init`, `--help`, errors and docs say
the same words. The data format is detected from the file, and the target modules are resolved from the
model's config on the meta device (no weights read).
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
from lorafit.tasks import classification


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
    from lorafit.data_sources import detect_format, read_source, train_sources
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
    label_columns = _classification_columns(rows)
    task = classification.CLASSIFICATION if label_columns else tasks.DEFAULT
    data_format = None if label_columns else detect_format(data_source, list(rows[0]) if rows else []).format
    if label_columns:
        notes.append(f"detected a label column ({label_columns['label']!r}, {len({str(r.get(label_columns['label'])) for r in rows})} "
                     f"classes) beside the text column {label_columns['text']!r}: task {task}")

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
    if label_columns:
        renamed = {key: column for key, column in label_columns.items() if key != column}
        data_values.update({"format": "auto", **({"fields": renamed} if renamed else {})})
    else:
        data_values["format"] = data_format
    values: dict[str, dict[str, Any]] = {
        "": {"task": task},
        "model": {"path": model},
        "adapter": {"target_modules": targets},
        "data": data_values,
        "training": {"gradient_checkpointing": True, "optimizer": "paged_adamw_8bit"} if qlora else {},
        "quantization": {"bits": 4} if qlora else {},
    }
    text = _render(run_name, str(out), values, include_quantization=qlora, resolved=resolved)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    load_recipe(out)  # what init writes must validate; a failure here is a lorafit bug, not the user's
    return StarterResult(out, data_format or "text+label", targets, resolved, notes, task=task)


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
            resolved: list[str]) -> str:
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
