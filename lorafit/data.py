"""Stage 3: data files -> normalised conversations -> tokenized examples, checked before any compute.

`prepare_data` reads the recipe's files (or hub dataset), detects the row format, turns every row into
chat messages (or plain text), renders and tokenizes it with the template, truncates, and drops rows that
cannot teach anything, counting why. The returned `DataReport` is what `--dry-run` and the pre-flight
lint show; training aborts when nothing trainable remains.

For task sequence-classification, rows are a text column (and optionally a text pair) tokenized as they are,
and a label column mapped to class ids; a label outside the classes stops with the row that holds it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.errors import LorafitError
from lorafit.recipe import DataSection, Recipe
from lorafit.templates import Encoded, Messages, apply_template, encode_messages, encode_text

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

# The columns each format needs, under their standard names (data.fields renames yours onto these).
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
CLASSIFICATION = "text+label"  # the DataReport format of sequence-classification data


@dataclass
class DataReport:
    """What will be trained: counts, drops by reason, supervision share, and rendered samples."""

    format: str
    template: str
    rows_read: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    dropped: Counter = field(default_factory=Counter)
    total_tokens: int = 0
    trained_tokens: int = 0
    eos_trained: bool = False
    eos_token: str | None = None
    samples: list[list[tuple[str, bool]]] = field(default_factory=list)  # (token text, trained?) per token
    fingerprint: dict[str, str] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)  # sequence-classification: train rows per class

    @property
    def supervised_share(self) -> float:
        return self.trained_tokens / self.total_tokens if self.total_tokens else 0.0

    def warnings(self) -> list[str]:
        """Problems worth showing before training starts."""
        notes = [f"dropped {n} row(s): {reason}" for reason, n in self.dropped.items()]
        if not self.eos_trained and self.format not in ("text", CLASSIFICATION):
            notes.append(f"the end-of-turn token {self.eos_token!r} is never a trained label: the model will not "
                         "learn to stop; check template.name")
        notes.extend(f"class {name!r} has no training rows" for name, n in self.label_counts.items() if not n)
        return notes


@dataclass
class PreparedData:
    """Tokenized train / eval datasets (input_ids, labels) and the report about them."""

    train: Dataset
    eval: Dataset | None
    report: DataReport
    labels: list[str] | None = None  # sequence-classification: the class names, in id order


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Read, normalise, render, tokenize and lint the recipe's data."""
    from datasets import Dataset

    if recipe.task == "sequence-classification":
        return _prepare_classification(recipe, tokenizer)
    section = recipe.data
    train_rows, fingerprint = read_rows(section.train, section)
    if isinstance(section.eval, str):
        eval_rows, eval_fp = read_rows(section.eval, section)
        fingerprint.update(eval_fp)
    else:
        eval_rows = []
        if isinstance(section.eval, float):
            train_rows, eval_rows = _hold_out(train_rows, section.eval, recipe.training.seed)
    fmt = detect_format(train_rows, section)
    template = "none" if fmt == "text" else apply_template(recipe.template, tokenizer)
    report = DataReport(format=fmt, template=template, rows_read=len(train_rows) + len(eval_rows),
                        eos_token=tokenizer.eos_token, fingerprint=fingerprint)
    train = _encode_rows(train_rows, fmt, recipe, tokenizer, report, is_train=True)
    evaluation = _encode_rows(eval_rows, fmt, recipe, tokenizer, report, is_train=False) if eval_rows else []
    if not train:
        reasons = ", ".join(f"{n} {reason}" for reason, n in report.dropped.items()) or "the file has no rows"
        raise LorafitError(f"no trainable rows remain ({reasons})", where="data.train",
                           hint="check data.format, data.fields, data.max_length and template.train_on")
    report.train_examples, report.eval_examples = len(train), len(evaluation)
    to_dataset = lambda rows: Dataset.from_dict(  # noqa: E731
        {"input_ids": [e.input_ids for e in rows], "labels": [e.labels for e in rows]}
    )
    return PreparedData(to_dataset(train), to_dataset(evaluation) if evaluation else None, report)


def _hold_out(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction)) if len(rows) > 1 else 0
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def split_rows(recipe: Recipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """The recipe's train and eval rows, unencoded (eval: its file, or the held-out share), and file fingerprints."""
    section = recipe.data
    train_rows, fingerprint = read_rows(section.train, section)
    eval_rows: list[dict[str, Any]] = []
    if isinstance(section.eval, str):
        eval_rows, eval_fingerprint = read_rows(section.eval, section)
        fingerprint.update(eval_fingerprint)
    elif isinstance(section.eval, float):
        train_rows, eval_rows = _hold_out(train_rows, section.eval, recipe.training.seed)
    return train_rows, eval_rows, fingerprint


def read_eval_rows(recipe: Recipe) -> list[dict[str, Any]]:
    """The recipe's eval rows, unencoded: its eval file, or the same held-out share of train that training used."""
    section = recipe.data
    if isinstance(section.eval, str):
        return read_rows(section.eval, section)[0]
    if isinstance(section.eval, float):
        return _hold_out(read_rows(section.train, section)[0], section.eval, recipe.training.seed)[1]
    return []


# ----------------------------------------------------------------------------------------------------
# Reading


def read_rows(spec: str | list[str], section: DataSection) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows from local files or a hub dataset, plus a sha256 fingerprint of each local file."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    rows: list[dict[str, Any]] = []
    fingerprint: dict[str, str] = {}
    for item in specs:
        path = Path(item)
        if path.exists() or path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") or "/" not in item:
            rows.extend(_read_file(path))
            fingerprint[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            rows.extend(_read_hub(item, section.split))
            fingerprint[item] = f"hub:{section.split}"
    return rows, fingerprint


def _read_file(path: Path) -> list[dict[str, Any]]:
    where = str(path)
    if not path.exists():
        raise LorafitError("data file not found", where=where, hint="check data.train / data.eval")
    if path.is_dir():
        raise LorafitError("is a directory, not a data file", where=where)
    if path.stat().st_size == 0:
        raise LorafitError("the data file is empty", where=where)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        from datasets import Dataset

        return Dataset.from_parquet(str(path)).to_list()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LorafitError(f"not UTF-8 text (byte {exc.start})", where=where) from None
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LorafitError(f"invalid JSON: {exc.msg}", where=f"{where}:{exc.lineno}") from None
        return [_require_object(row, f"{where}: item {i}") for i, row in enumerate(rows)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorafitError(f"malformed JSON line: {exc.msg}", where=f"{where}:{number}",
                               hint="each line must be one JSON object") from None
        rows.append(_require_object(row, f"{where}:{number}"))
    if not rows:
        raise LorafitError("the data file has no rows", where=where)
    return rows


def _require_object(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise LorafitError(f"expected a JSON object, got {type(row).__name__}", where=where)
    return row


def _read_hub(dataset_id: str, split: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    try:
        return load_dataset(dataset_id, split=split).to_list()
    except Exception as exc:  # datasets raises many types for "not reachable / not found"
        raise LorafitError(f"cannot load hub dataset: {str(exc).splitlines()[0][:200]}", where=f"data.train: {dataset_id}",
                           hint="check the id, data.split, and your network") from None


# ----------------------------------------------------------------------------------------------------
# Formats


def detect_format(rows: list[dict[str, Any]], section: DataSection) -> str:
    """The row format: as configured, or detected from the first row's columns."""
    columns = set(rows[0]) if rows else set()
    mapped = {standard: section.fields.get(standard, standard) for cols in FORMAT_COLUMNS.values() for standard in cols}
    present = {standard for standard, actual in mapped.items() if actual in columns}
    if section.format != "auto":
        needed = FORMAT_COLUMNS[section.format]
        missing = [section.fields.get(c, c) for c in needed if c not in present]
        if missing and rows:
            raise LorafitError(f"format {section.format} needs column(s) {', '.join(missing)}; the data has "
                               f"{', '.join(sorted(columns))}", where="data.format",
                               hint="map your columns with data.fields, e.g. {prompt: question}")
        return section.format
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(c in present for c in needed):
            return fmt
    if "conversations" in columns:
        raise LorafitError("found a 'conversations' column (ShareGPT style)", where="data.fields",
                           hint="set data.fields: {messages: conversations}")
    raise LorafitError(f"cannot tell the data format from columns {', '.join(sorted(columns)) or '(none)'}",
                       where="data.format",
                       hint="set data.format (messages | alpaca | prompt-completion | text) and data.fields")


def row_to_messages(row: dict[str, Any], fmt: str, section: DataSection, system_prompt: str | None) -> Messages | None:
    """One row as chat messages (None when it has nothing to train on)."""
    get = lambda name: row.get(section.fields.get(name, name))  # noqa: E731
    if fmt == "messages":
        raw = get("messages")
        if not isinstance(raw, list):
            return None
        messages = []
        for turn in raw:
            if not isinstance(turn, dict):
                return None
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            if not isinstance(role, str) or not isinstance(content, str):
                return None
            messages.append({"role": _ROLE_ALIASES.get(role, role), "content": content})
    elif fmt == "alpaca":
        instruction, extra, output = get("instruction"), get("input"), get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            return None
        prompt = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:
        prompt, completion = get("prompt"), get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return None
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if system_prompt and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _encode_rows(rows: list[dict[str, Any]], fmt: str, recipe: Recipe, tokenizer: PreTrainedTokenizerBase,
                 report: DataReport, *, is_train: bool) -> list[Encoded]:
    section, template = recipe.data, recipe.template
    eos_ids = {tokenizer.eos_token_id}
    encoded = []
    for row in rows:
        if fmt == "text":
            text = row.get(section.fields.get("text", "text"))
            if not isinstance(text, str) or not text.strip():
                report.dropped["empty or missing text"] += 1
                continue
            example = encode_text(tokenizer, text)
        else:
            messages = row_to_messages(row, fmt, section, template.system_prompt)
            if not messages or not any(m["content"].strip() for m in messages):
                report.dropped[f"empty or malformed {fmt} row"] += 1
                continue
            if not any(m["role"] == "assistant" for m in messages) and template.train_on == "completions":
                report.dropped["no assistant turn to train on"] += 1
                continue
            example = encode_messages(tokenizer, messages, train_on=template.train_on)
        ids, labels = example.input_ids[: section.max_length], example.labels[: section.max_length]
        if all(label == -100 for label in labels):
            reason = "no completion tokens left after truncation to data.max_length" if len(
                example.input_ids) > section.max_length else "no trainable tokens"
            report.dropped[reason] += 1
            continue
        example = Encoded(ids, labels, example.text)
        if is_train:
            report.total_tokens += len(ids)
            report.trained_tokens += sum(label != -100 for label in labels)
            report.eos_trained = report.eos_trained or any(label in eos_ids for label in labels)
            if len(report.samples) < 2:
                report.samples.append([(tokenizer.decode([t]), label != -100) for t, label in zip(ids, labels)])
        encoded.append(example)
    return encoded


# ----------------------------------------------------------------------------------------------------
# Sequence classification: a text column (and optionally a text pair) and a label column


@dataclass(frozen=True)
class LabelledText:
    """One sequence-classification example: the text (and pair) as read, its tokens and its class id."""

    text: str
    text_pair: str | None
    input_ids: list[int]
    token_type_ids: list[int] | None  # only with a text pair: which tokens belong to which text
    label: int


def _prepare_classification(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    section = recipe.data
    train_rows, fingerprint = read_rows(section.train, section)
    labels = class_labels(recipe, train_rows)
    # Labels are checked before any row is held out, so an error names the row's place in the file.
    train = list(zip(train_rows, label_ids(train_rows, labels, section, _where_train(section)), strict=True))
    evaluation: list[tuple[dict[str, Any], int]] = []
    if isinstance(section.eval, str):
        eval_rows, eval_fingerprint = read_rows(section.eval, section)
        fingerprint.update(eval_fingerprint)
        ids = label_ids(eval_rows, labels, section, f"data.eval: {section.eval}")
        evaluation = list(zip(eval_rows, ids, strict=True))
    elif isinstance(section.eval, float):
        train, evaluation = _hold_out(train, section.eval, recipe.training.seed)
    report = DataReport(format=CLASSIFICATION, template="none", rows_read=len(train) + len(evaluation),
                        eos_token=tokenizer.eos_token, fingerprint=fingerprint, label_counts=dict.fromkeys(labels, 0))
    train_examples, empty = encode_labelled(train, section, tokenizer)
    eval_examples, eval_empty = encode_labelled(evaluation, section, tokenizer)
    if empty + eval_empty:
        report.dropped["empty or missing text"] += empty + eval_empty
    if not train_examples:
        raise LorafitError(f"no trainable rows remain ({empty} with an empty or missing text)", where="data.train",
                           hint="check data.fields.text")
    for example in train_examples:
        report.label_counts[labels[example.label]] += 1
        report.total_tokens += len(example.input_ids)
        if len(report.samples) < 2:  # the text as the model reads it, then the label it learns (highlighted)
            report.samples.append([(tokenizer.decode([t]), False) for t in example.input_ids]
                                  + [(f"  -> {labels[example.label]}", True)])
    report.train_examples, report.eval_examples = len(train_examples), len(eval_examples)
    return PreparedData(_labelled_dataset(train_examples),
                        _labelled_dataset(eval_examples) if eval_examples else None, report, labels)


def class_labels(recipe: Recipe, train_rows: list[dict[str, Any]] | None = None) -> list[str]:
    """The class names in id order: data.labels, else the distinct label values of data.train, sorted."""
    section = recipe.data
    if section.labels is not None:
        return list(section.labels)
    rows = read_rows(section.train, section)[0] if train_rows is None else train_rows
    _require_columns(rows, section, "data.train")
    column = _column(section, "label")
    names = {_label_name(row.get(column)) for row in rows} - {None}
    if len(names) < 2:
        raise LorafitError(f"the {column!r} column holds {len(names)} distinct label(s); a classifier needs at "
                           "least two", where="data.train", hint="check data.fields.label, or list data.labels")
    return sorted(names, key=_class_order)  # type: ignore[arg-type]


def labelled_rows(spec: str | list[str], labels: list[str], section: DataSection,
                  where: str) -> list[tuple[dict[str, Any], int]]:
    """The rows of a file (or hub dataset) paired with their class ids; `where` names it in errors."""
    rows = read_rows(spec, section)[0]
    return list(zip(rows, label_ids(rows, labels, section, where), strict=True))


def labelled_eval_rows(recipe: Recipe, labels: list[str]) -> list[tuple[dict[str, Any], int]]:
    """A classifier's eval rows and class ids: the eval file, or the same held-out share of train that training used."""
    section = recipe.data
    if isinstance(section.eval, str):
        return labelled_rows(section.eval, labels, section, f"data.eval: {section.eval}")
    if isinstance(section.eval, float):
        train = labelled_rows(section.train, labels, section, _where_train(section))
        return _hold_out(train, section.eval, recipe.training.seed)[1]
    return []


def _where_train(section: DataSection) -> str:
    return f"data.train: {section.train}" if isinstance(section.train, str) else "data.train"


def label_ids(rows: list[dict[str, Any]], labels: list[str], section: DataSection, where: str) -> list[int]:
    """Each row's class id; a missing label, or one that is not a class, is an error naming its row."""
    _require_columns(rows, section, where)
    column = _column(section, "label")
    index = {name: i for i, name in enumerate(labels)}
    ids = []
    for number, row in enumerate(rows, start=1):
        value = row.get(column)
        name = _label_name(value)
        if name not in index:
            problem = (f"no {column!r} value" if value is None or value == "" else
                       f"label {value!r} is not one of the classes ({', '.join(labels)})")
            raise LorafitError(f"row {number}: {problem}", where=where,
                               hint="fix the row, or list every class in data.labels")
        ids.append(index[name])
    return ids


def encode_labelled(rows: list[tuple[dict[str, Any], int]], section: DataSection,
                    tokenizer: PreTrainedTokenizerBase) -> tuple[list[LabelledText], int]:
    """Tokenize (row, class id) pairs, truncated to data.max_length; also returns how many rows had no text."""
    text_column, pair_column = _column(section, "text"), _column(section, "text_pair")
    examples, empty = [], 0
    for row, label in rows:
        text, pair = row.get(text_column), row.get(pair_column)
        if not isinstance(text, str) or not text.strip():
            empty += 1
            continue
        pair = pair if isinstance(pair, str) else None
        encoding = tokenizer(text, pair, truncation=True, max_length=section.max_length)
        types = encoding.get("token_type_ids") if pair is not None else None
        examples.append(LabelledText(text, pair, list(encoding["input_ids"]), list(types) if types else None, label))
    return examples, empty


def _labelled_dataset(examples: list[LabelledText]) -> Dataset:
    from datasets import Dataset

    columns: dict[str, list] = {"input_ids": [e.input_ids for e in examples], "labels": [e.label for e in examples]}
    if any(e.token_type_ids for e in examples):
        columns["token_type_ids"] = [e.token_type_ids or [0] * len(e.input_ids) for e in examples]
    return Dataset.from_dict(columns)


def _column(section: DataSection, name: str) -> str:
    return section.fields.get(name, name)


def _require_columns(rows: list[dict[str, Any]], section: DataSection, where: str) -> None:
    columns = set(rows[0]) if rows else set()
    missing = [_column(section, name) for name in ("text", "label") if _column(section, name) not in columns]
    if missing:
        raise LorafitError(f"no {' or '.join(repr(m) for m in missing)} column; the data has "
                           f"{', '.join(sorted(columns)) or 'no columns'}", where=where,
                           hint="map your columns with data.fields, e.g. {text: review, label: sentiment}")


def _label_name(value: Any) -> str | None:
    """A label value as a class name: text as written, whole numbers as digits; None when missing or unusable."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value
    return None


def _class_order(name: str) -> tuple[int, float, str]:
    """Numbers numerically (2 before 10), then names alphabetically."""
    try:
        number = float(name)
    except ValueError:
        return (1, 0.0, name)
    return (0, number, name) if math.isfinite(number) else (1, 0.0, name)
