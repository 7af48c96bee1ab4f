"""SFT data: sources -> tokenized Arrow data sets, checked before any compute, prepared once and cached.

`prepare_data` reads the recipe's sources (data_sources.py), renders every row with the template, tokenizes,
masks, truncates and drops rows that cannot teach anything in batched `Dataset.map`s over `data.num_proc`
processes, and mixes weighted sources. The `DataReport` (counts, drops by reason, supervised share, two
highlighted samples) is aggregated from the map's own per-row columns; `--dry-run` and the pre-flight lint
show it, and training aborts when nothing trainable remains.

The prepared sets are cached (data_cache.py): a second run, a `--resume` or another rank memory-maps them.
With `data.streaming` rows are read and tokenized on the fly instead, and the report covers the first rows.

`eval_rows` is the one place that decides where eval rows come from (an eval file, `--data`, or the share of
train held out under the seed); `evaluate` and `merge` ask it.

For task sequence-classification, rows are a text column (and optionally a text pair) tokenized as they are,
and a label column mapped to class ids; a label outside the classes stops with the row that holds it.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit import data_cache
from lorafit.data_sources import (
    FORMAT_COLUMNS,
    Messages,
    Source,
    as_text,
    columns_of,
    detect_format,
    eval_source,
    is_mixture,
    read_source,
    row_text,
    row_to_messages,
    source_fingerprint,
    train_sources,
)
from lorafit.errors import LorafitError
from lorafit.recipe import DataSection, Recipe
from lorafit.templates import apply_template, assistant_spans

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from transformers import PreTrainedTokenizerBase

__all__ = ["FORMAT_COLUMNS", "DataReport", "EvalRows", "PreparedData", "eval_rows", "prepare_data"]

CLASSIFICATION = "text+label"  # the DataReport format of sequence-classification data
STREAM_LINT_ROWS = 256  # a stream's report covers its first rows
_SPECIAL_TEXT = "a message holds the special token text"  # drop reason; the rows are named after it
_LINT_COLUMNS = ["_drop", "_trained", "_length", "_eos", "_source"]


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
    sources: list[dict[str, Any]] = field(default_factory=list)  # per data.train entry: path, weight, rows, tokens
    streamed: bool = False  # the counts describe the stream's first rows only
    cache: str = "off"  # "built" | "from cache" | "off" | "streamed"
    cache_path: str | None = None
    prepare_seconds: float = 0.0

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

    def summary(self) -> str:
        """One line on what was prepared and where from, e.g. 'prepared 50,000 rows from cache <path>'."""
        rows = f"{self.train_examples + self.eval_examples:,} rows"
        if self.cache == "from cache":
            return f"prepared {rows} from cache {self.cache_path}"
        if self.cache == "built":
            return f"prepared {rows} in {self.prepare_seconds:.1f} s, cached at {self.cache_path}"
        if self.cache == "streamed":
            return f"streaming; the report covers the first {self.train_examples:,} rows"
        return f"prepared {rows} in {self.prepare_seconds:.1f} s (data.cache: false)"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "dropped": dict(self.dropped)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DataReport:
        report = cls(**{**raw, "dropped": Counter(raw["dropped"])})
        report.samples = [[(text, trained) for text, trained in sample] for sample in report.samples]
        return report


@dataclass
class PreparedData:
    """Tokenized train / eval datasets (input_ids, labels) and the report about them."""

    train: Dataset | IterableDataset
    eval: Dataset | None
    report: DataReport
    labels: list[str] | None = None  # sequence-classification: the class names, in id order
    stored: data_cache.StoredSets | None = None  # how a built train/eval is stored in the cache


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Read, render, tokenize and lint the recipe's SFT rows (chat, alpaca, prompt/completion, text): from the cache
    when nothing changed, else built; streamed when data.streaming says so."""
    check_sources(recipe)
    if recipe.data.streaming:
        return _prepare_stream(recipe, tokenizer)
    return _prepared(recipe, tokenizer, _build_causal)


def prepare_classification_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Read and tokenize the recipe's text + label rows (task sequence-classification), cached like `prepare_data`."""
    check_sources(recipe)
    return _prepared(recipe, tokenizer, _build_classification)


def check_sources(recipe: Recipe) -> None:
    """Source settings the task or the files cannot honour, refused before any row is read: weighted entries under a
    task that cannot draw rows by weight (never joined silently), a split named for local files (which have none)."""
    from lorafit import tasks

    if is_mixture(recipe.data) and not tasks.task_of(recipe).mixes_sources:
        raise LorafitError(f"weighted sources are for task {tasks.names_where(lambda t: t.mixes_sources)}",
                           where="data.train", hint="list the files as plain paths, read as one data set")
    for source in train_sources(recipe.data):
        if source.split != "train" and all(Path(path).expanduser().is_file() for path in source.paths):
            raise LorafitError(f"split {source.split!r} is for hub data sets; {', '.join(source.paths)} is a local "
                               "file, read whole", where="data.split",
                               hint="remove data.split (or the entry's split), or give the split's own file")


def encode_train_and_eval(recipe: Recipe, train_rows: list, eval_rows: list, report: DataReport, encode, *,
                          what: str, hint: str) -> tuple[list, list]:
    """Rows read as lists (preference pairs, prompts) encoded by `encode(rows, is_train)`, which counts its drops in
    `report`; a train set that lost every row, or an eval the recipe asked for that lost every row, is refused naming
    where the rows went (`what` names the rows, `hint` what a usable row holds)."""
    train = encode(train_rows, True)
    train_dropped = Counter(report.dropped)
    evaluation = encode(eval_rows, False) if eval_rows else []
    if not train:
        held = len(eval_rows) if isinstance(recipe.data.eval, float) else 0
        refuse_empty_train(recipe.data, read=len(train_rows) + held, held=held, dropped=train_dropped, what=what,
                           hint=hint)
    if recipe.data.eval is not None and not evaluation:
        refuse_empty_eval(recipe.data, read=len(eval_rows), dropped=report.dropped - train_dropped)
    return train, evaluation


def refuse_empty_train(section: DataSection, *, read: int, held: int, dropped: Counter, what: str,
                       hint: str) -> None:
    """Raise the error for a training set left empty, naming where its rows went: none read, all held out by the
    data.eval fraction, or every one dropped (by reason). `read` counts the train rows read, `held` those held out."""
    if read and held >= read:
        raise LorafitError(f"a held-out fraction of {section.eval:g} takes all {read} row(s) of data.train, leaving "
                           "none to train on", where="data.eval",
                           hint="lower the fraction, add rows, or give data.eval as a file")
    reasons = _reasons(dropped)
    problem = f" ({reasons}): all {read - held} training row(s) dropped" if reasons else ": data.train has no rows"
    raise LorafitError(f"no {what} remain{problem}", where="data.train", hint=hint)


def refuse_empty_eval(section: DataSection, *, read: int, dropped: Counter) -> None:
    """Raise the error for a recipe that asked for eval (data.eval) and has no eval rows left, naming the file or the
    held-out share and why: training without the eval it asked for is never silent. `read`: the eval rows read or
    held out, before drops."""
    if isinstance(section.eval, str):
        where = f"data.eval: {section.eval}"
        problem = (f"all {read} row(s) of the eval file were dropped ({_reasons(dropped)})" if read
                   else "the eval file has no rows")
    else:
        where = f"data.eval: {section.eval:g} held out of data.train"
        problem = (f"all {read} held-out row(s) were dropped ({_reasons(dropped)})" if read
                   else "the held-out fraction takes no row of data.train (too few rows)")
    raise LorafitError(f"no eval rows remain: {problem}", where=where,
                       hint="fix or replace those rows (data.max_length may cut them), or set data.eval: null to "
                       "train without eval")


def _reasons(dropped: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n)


def _drop_counts(drop) -> Counter:
    """A map's drop column (one reason per row, '' for kept) as counts by reason."""
    return Counter(reason for reason in drop.tolist() if reason)


def _prepared(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, build) -> PreparedData:
    """`build(recipe, tokenizer, sources, evaluation, folder)`'s data: from the cache when nothing changed, else built
    (and cached). The cache key covers everything that changes the rows, the task among them."""
    section = recipe.data
    started = time.perf_counter()
    sources = train_sources(section)
    evaluation = eval_source(section, section.eval) if isinstance(section.eval, str) else None
    memo = data_cache.data_cache_dir() / "hashes" if section.cache else None
    fingerprint = {k: v for s in [*sources, *([evaluation] if evaluation else [])]
                   for k, v in source_fingerprint(s, memo).items()}
    key = data_cache.cache_key({
        "data": section.model_dump(mode="json", exclude={"packing", "group_by_length", "num_proc", "cache"}),
        "files": fingerprint, "tokenizer": data_cache.tokenizer_fingerprint(tokenizer),
        "template": recipe.template.model_dump(mode="json"), "template_text": _custom_template_text(recipe),
        "seed": recipe.training.seed, "task": recipe.task,
    })
    if not section.cache:
        folder = data_cache.new_build_folder(None)
        prepared = build(recipe, tokenizer, sources, evaluation, folder)
        prepared.report.fingerprint, prepared.report.prepare_seconds = fingerprint, time.perf_counter() - started
        return prepared
    data_cache.remove_stale_builds()
    with data_cache.locked(key) as entry:
        cached = data_cache.load(entry)
        if cached is not None:
            report = DataReport.from_json(cached.report)
            if report.template != "none":  # the tokenizer saved with the adapter carries the template
                apply_template(recipe.template, tokenizer)
            report.cache, report.cache_path = "from cache", str(entry)
            report.prepare_seconds = time.perf_counter() - started
            labels = report.label_counts and list(report.label_counts)
            return PreparedData(cached.train, cached.eval, report, labels or None)
        folder = data_cache.new_build_folder(entry)
        prepared = build(recipe, tokenizer, sources, evaluation, folder / "rows")
        report = prepared.report
        report.fingerprint, report.cache, report.cache_path = fingerprint, "built", str(entry)
        report.prepare_seconds = time.perf_counter() - started
        cached = data_cache.publish(folder, entry, prepared.stored, report.to_json())
    return PreparedData(cached.train, cached.eval, report, prepared.labels)


def _custom_template_text(recipe: Recipe) -> str | None:
    custom = recipe.template.custom
    if custom and "\n" not in custom and Path(custom).is_file():
        return Path(custom).read_text(encoding="utf-8")
    return custom


def num_proc(section: DataSection, rows: int) -> int | None:
    """Processes for the map: data.num_proc, else the cores this process may use (at most 8); none for small data."""
    wanted = section.num_proc or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    # Starting workers costs ~1 s; below a few thousand rows one process is faster.
    return wanted if wanted > 1 and rows >= 2000 * wanted else None


# ----------------------------------------------------------------------------------------------------
# Causal LM: render, tokenize, mask, truncate, drop — in batches


@dataclass(frozen=True)
class _Encoder:
    """The batched map function: a batch of raw rows -> input_ids, labels and per-row lint columns."""

    source: Source
    tokenizer: Any
    train_on: str
    system_prompt: str | None
    max_length: int
    special_texts: tuple[str, ...]
    source_index: int = 0
    as_lists: bool = False  # a stream hands rows to the trainer as they come out: Python ints, not int32 arrays

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        import numpy as np

        fmt, tokenizer, n = self.source.format, self.tokenizer, len(indices)
        drop = [""] * n
        texts, spans, pending = [], [], []
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        for i, row in enumerate(rows):
            if fmt == "text":
                text = row_text(row, self.source)
                if not text or not text.strip():
                    drop[i] = "empty or missing text"
                    continue
                texts.append(text)
                spans.append(None)
            else:
                messages = row_to_messages(row, self.source, self.system_prompt)
                if not messages or not any(m["content"].strip() for m in messages):
                    drop[i] = f"empty or malformed {fmt} row"
                    continue
                if self.train_on == "completions" and not any(m["role"] == "assistant" for m in messages):
                    drop[i] = "no assistant turn to train on"
                    continue
                special = special_text_in(messages, self.special_texts)
                if special is not None:
                    # The tokenizer would read it as the real token: a turn would end mid-answer and be trained so.
                    drop[i] = f"{_SPECIAL_TEXT} {special!r}"
                    continue
                text, row_spans = assistant_spans(tokenizer, messages)
                texts.append(text)
                spans.append(row_spans)
            pending.append(i)
        # The Rust tokenizer directly: transformers' wrapper would build offset lists for every token of every row,
        # while the mask needs only the tokens at each span's two ends (char_to_token).
        encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=fmt == "text") if texts else []
        eos = tokenizer.eos_token_id
        empty = np.zeros(0, dtype=np.int32)
        input_ids, labels = [empty] * n, [empty] * n
        trained, lengths, eos_trained = [0] * n, [0] * n, [False] * n
        for encoding, i, row_spans in zip(encodings, pending, spans, strict=True):
            ids = np.asarray(encoding.ids, dtype=np.int32)
            if fmt == "text" and eos is not None and (not len(ids) or ids[-1] != eos):
                ids = np.append(ids, np.int32(eos))  # documents end, so the model learns where
            if row_spans is None or self.train_on == "all":
                row_labels = ids.copy()
            else:
                row_labels = np.full(len(ids), -100, dtype=np.int32)
                for start, end in row_spans:
                    first, last = _token_range(encoding, start, end)
                    row_labels[first:last] = ids[first:last]
            full_length = len(ids)
            ids, row_labels = ids[: self.max_length], row_labels[: self.max_length]
            supervised = int((row_labels != -100).sum())
            if not supervised:
                drop[i] = ("no completion tokens left after truncation to data.max_length"
                           if full_length > self.max_length else "no trainable tokens")
                continue
            input_ids[i], labels[i] = (ids.tolist(), row_labels.tolist()) if self.as_lists else (ids, row_labels)
            trained[i], lengths[i] = supervised, len(ids)
            eos_trained[i] = eos is not None and bool((row_labels == eos).any())
        return {"input_ids": input_ids, "labels": labels, "_drop": drop, "_trained": trained, "_length": lengths,
                "_eos": eos_trained, "_source": [self.source_index] * n}


def _token_range(encoding, start: int, end: int) -> tuple[int, int]:
    """The tokens that overlap the characters [start, end) of the encoded text, as a slice."""
    first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
    if first is None or last is None:  # a character no token covers (some normalizers drop spaces): ask every token
        inside = [t for t, (a, b) in enumerate(encoding.offsets) if a < end and b > start]
        return (inside[0], inside[-1] + 1) if inside else (0, 0)
    return first, last + 1


def _encoded_features():
    from datasets import Features, Sequence, Value

    return Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "_drop": Value("string"), "_trained": Value("int32"), "_length": Value("int32"),
                     "_eos": Value("bool"), "_source": Value("int16")})


def special_texts(tokenizer) -> tuple[str, ...]:
    """The special tokens a template writes (end of turn, start of turn, eos) as text: inside a message the tokenizer
    would read them as the real token. Every task's rows are checked for them (`special_text_in`)."""
    specials = {t for t in tokenizer.all_special_tokens if t and len(t) > 1}
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                 if getattr(t, "special", False) and len(t.content) > 1}
    return tuple(sorted(specials))


def special_text_in(value: Any, specials: tuple[str, ...]) -> str | None:
    """The first special-token text inside `value`: a text, chat messages, or any nesting of lists and dicts."""
    if isinstance(value, str):
        return next((t for t in specials if t in value), None)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((found for item in items if (found := special_text_in(item, specials)) is not None), None)


def special_text_reason(special: str, rows: list[int], where: str) -> str:
    """The drop reason of rows holding special-token text, naming the token, where they are and their row numbers
    (1-based); the SFT lint and every other task's lint report them so."""
    shown = ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
    return (f"{_SPECIAL_TEXT} {special!r} (it would be read as the real token and end the turn mid-answer): "
            f"{where} row(s) {shown}; write it differently or remove those rows")


def _encoder(recipe: Recipe, tokenizer, source: Source, index: int = 0, *, as_lists: bool = False) -> _Encoder:
    return _Encoder(source, tokenizer, recipe.template.train_on, recipe.template.system_prompt,
                    recipe.data.max_length, special_texts(tokenizer), index, as_lists)


def _map_encoder(rows: Dataset, encoder: _Encoder, section: DataSection, cache_file: Path | None,
                 fingerprint: str) -> Dataset:
    """Run the encoder over a Dataset in batches, in data.num_proc processes, writing Arrow to cache_file."""
    processes = num_proc(section, len(rows))
    options: dict[str, Any] = {}
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        options["cache_file_name"] = str(cache_file)
    return rows.map(encoder, batched=True, batch_size=256, with_indices=True, remove_columns=rows.column_names,
                    num_proc=processes, features=_encoded_features(), new_fingerprint=fingerprint,
                    load_from_cache_file=False, desc=None, **options)


def _lint_table(encoded: Dataset, indices=None):
    """The lint columns (no token lists) of the chosen rows, as one small in-memory Arrow table."""
    subset = encoded.select_columns(_LINT_COLUMNS)
    if indices is not None:
        subset = subset.select(indices)
    return subset.flatten_indices(keep_in_memory=True).data.table


def _build_causal(recipe: Recipe, tokenizer, sources: list[Source], evaluation: Source | None,
                  work: Path | None) -> PreparedData:
    import numpy as np
    import pyarrow.compute as pc

    section, seed = recipe.data, recipe.training.seed
    read = [read_source(s, cache_dir=_raw_cache_dir(section)) for s in sources]
    resolved = [detect_format(r.source, columns_of(r.rows)) for r in read]
    formats = sorted({s.format for s in resolved})
    template = "none" if formats == ["text"] else apply_template(recipe.template, tokenizer)
    report = DataReport(format="+".join(formats), template=template, eos_token=tokenizer.eos_token)
    # Every map output is kept whole (held-out and dropped rows too); the sets are positions into them, so
    # nothing is copied and the cache stores the files the map wrote.
    parts, train_rows, eval_rows, offset = [], [], [], 0
    train_read, held_read, train_dropped, eval_read_rows, eval_dropped = 0, 0, Counter(), 0, Counter()
    for index, (source_data, source) in enumerate(zip(read, resolved, strict=True)):
        encoder = _encoder(recipe, tokenizer, source, index)
        encoded = _map_encoder(source_data.rows, encoder, section, work / f"train-{index}.arrow" if work else None,
                               fingerprint=f"lorafit-train-{index}-{os.getpid()}-{time.time_ns()}")
        report.rows_read += len(encoded)
        order = np.arange(len(encoded))
        held: np.ndarray = np.array([], dtype=np.int64)
        if isinstance(section.eval, float):
            kept_order, held_order = _hold_out(len(encoded), section.eval, seed)
            order, held = np.asarray(kept_order, dtype=np.int64), np.asarray(held_order, dtype=np.int64)
        drop = np.asarray(encoded.data.column("_drop").to_numpy(zero_copy_only=False)) if len(encoded) else np.array([])
        _count_drops(report, drop, source)
        parts.append(encoded)
        train_rows.append(offset + (order[drop[order] == ""] if len(order) else order))
        train_read, held_read = train_read + len(encoded), held_read + len(held)
        train_dropped += _drop_counts(drop[order]) if len(order) else Counter()
        if len(held):
            eval_rows.append(offset + held[drop[held] == ""])
            eval_read_rows, eval_dropped = eval_read_rows + len(held), eval_dropped + _drop_counts(drop[held])
        offset += len(encoded)
    if evaluation is not None:
        eval_read = read_source(evaluation, cache_dir=_raw_cache_dir(section))
        eval_src = detect_format(eval_read.source, columns_of(eval_read.rows))
        encoded = _map_encoder(eval_read.rows, _encoder(recipe, tokenizer, eval_src), section,
                               work / "eval.arrow" if work else None,
                               fingerprint=f"lorafit-eval-{os.getpid()}-{time.time_ns()}")
        report.rows_read += len(encoded)
        drop = np.asarray(encoded.data.column("_drop").to_numpy(zero_copy_only=False))
        _count_drops(report, drop, eval_src)
        parts.append(encoded)
        eval_rows.append(offset + np.flatnonzero(drop == ""))
        eval_read_rows, eval_dropped = len(encoded), _drop_counts(drop)
    order = _mixed_order(train_rows, resolved, seed) if is_mixture(section) else np.concatenate(train_rows)
    stored = data_cache.StoredSets(parts, order, np.concatenate(eval_rows) if eval_rows else None,
                                   tuple(_LINT_COLUMNS))
    train, evaluation_set = stored.datasets(with_build_columns=True)
    if not len(train):
        refuse_empty_train(section, read=train_read, held=held_read, dropped=train_dropped, what="trainable rows",
                           hint="check data.format, data.fields, data.max_length and template.train_on")
    if section.eval is not None and (evaluation_set is None or not len(evaluation_set)):
        refuse_empty_eval(section, read=eval_read_rows, dropped=eval_dropped)
    lint = _lint_table(train)
    report.train_examples = len(train)
    report.total_tokens = int(pc.sum(lint.column("_length")).as_py() or 0)
    report.trained_tokens = int(pc.sum(lint.column("_trained")).as_py() or 0)
    report.eos_trained = bool(pc.any(lint.column("_eos")).as_py())
    report.sources = _source_counts(lint, resolved)
    for row in train.select(range(min(2, len(train)))):
        report.samples.append([(tokenizer.decode([t]), label != -100) for t, label in zip(row["input_ids"],
                                                                                          row["labels"], strict=True)])
    report.eval_examples = len(evaluation_set) if evaluation_set is not None else 0
    train, evaluation_set = stored.datasets()
    return PreparedData(train, evaluation_set, report, stored=stored)


def _raw_cache_dir(section: DataSection) -> Path | None:
    """Where `datasets` keeps its Arrow copy of the raw files: inside the lorafit cache (None with cache off)."""
    return data_cache.data_cache_dir() / "raw" if section.cache else None


def _count_drops(report: DataReport, drop, source: Source) -> None:
    """Add a source's dropped rows to the report by reason; rows with special-token text are named."""
    import numpy as np

    if not len(drop):
        return
    reasons, counts = np.unique(drop[drop != ""], return_counts=True)
    for reason, count in zip(reasons.tolist(), counts.tolist(), strict=True):
        if reason.startswith(_SPECIAL_TEXT):
            special = reason[len(_SPECIAL_TEXT) + 1:].strip("'\"")  # the drop column holds the token's repr
            reason = special_text_reason(special, (np.flatnonzero(drop == reason) + 1).tolist(), source.where)
        report.dropped[reason] += count


def _hold_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices kept for training and held out for eval: the same shuffle under the same seed, always."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * fraction)) if n > 1 else 0
    held = sorted(order[:n_eval])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


def _concatenate(parts: list[Dataset]) -> Dataset:
    from datasets import concatenate_datasets

    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _mix(parts: list, sources: list[Source], seed: int):
    """Weighted sampling across sources, deterministic under the seed; no row twice; ends when a source runs out."""
    from datasets import interleave_datasets

    total = sum(s.weight for s in sources)
    live = [(p, s.weight / total) for p, s in zip(parts, sources, strict=True)]
    return interleave_datasets([p for p, _ in live], probabilities=[w for _, w in live], seed=seed,
                               stopping_strategy="first_exhausted")


def _mixed_order(rows: list, sources: list[Source], seed: int):
    """The positions of weighted sources' rows in training order: `_mix` applied to the positions alone."""
    import numpy as np
    from datasets import Dataset

    mixed = _mix([Dataset.from_dict({"row": np.asarray(r, dtype=np.int64)}) for r in rows], sources, seed)
    return mixed.flatten_indices(keep_in_memory=True).data.column("row").to_numpy()


def _source_counts(lint, sources: list[Source]) -> list[dict[str, Any]]:
    """Rows and tokens each source contributed to the training set (recorded in metrics.json)."""
    import pyarrow.compute as pc

    counts = []
    for index, source in enumerate(sources):
        mask = pc.equal(lint.column("_source"), index)
        counts.append({"path": ", ".join(source.paths), "weight": source.weight, "format": source.format,
                       "rows": int(pc.sum(pc.cast(mask, "int64")).as_py() or 0),
                       "tokens": int(pc.sum(pc.filter(lint.column("_length"), mask)).as_py() or 0)})
    return counts


# ----------------------------------------------------------------------------------------------------
# Streaming: read, tokenize (and let the trainer pack) on the fly; the report covers the first rows


def _prepare_stream(recipe: Recipe, tokenizer) -> PreparedData:
    from datasets import Dataset

    section, seed = recipe.data, recipe.training.seed
    sources = train_sources(section)
    read = [read_source(s, streaming=True) for s in sources]
    resolved = [detect_format(r.source, columns_of(r.rows)) for r in read]
    formats = sorted({s.format for s in resolved})
    template = "none" if formats == ["text"] else apply_template(recipe.template, tokenizer)
    report = DataReport(format="+".join(formats), template=template, eos_token=tokenizer.eos_token, streamed=True,
                        cache="streamed")
    streams, heads = [], []
    for index, (source_data, source) in enumerate(zip(read, resolved, strict=True)):
        encoder = _encoder(recipe, tokenizer, source, index)
        report.fingerprint.update(source_fingerprint(source))
        head = Dataset.from_list(list(source_data.rows.take(STREAM_LINT_ROWS)))
        heads.append(head.map(encoder, batched=True, with_indices=True, remove_columns=head.column_names,
                              features=_encoded_features()))
        columns = columns_of(source_data.rows)
        stream = source_data.rows.map(_encoder(recipe, tokenizer, source, index, as_lists=True), batched=True, batch_size=256, with_indices=True, remove_columns=columns,
                                      features=_encoded_features())
        streams.append(stream.filter(lambda drop: not drop, input_columns="_drop"))
    import numpy as np
    import pyarrow.compute as pc

    for head, source in zip(heads, resolved, strict=True):
        drop = np.asarray(head.data.column("_drop").to_numpy(zero_copy_only=False))
        _count_drops(report, drop, source)
        report.rows_read += len(head)
    kept = _concatenate([h.select(np.flatnonzero(np.asarray(h["_drop"]) == "")) for h in heads])
    if not len(kept):
        reasons = ", ".join(f"{n} {reason}" for reason, n in report.dropped.items()) or "the file has no rows"
        raise LorafitError(f"no trainable rows in the first {STREAM_LINT_ROWS} rows of the stream ({reasons})",
                           where="data.train", hint="check data.format, data.fields, data.max_length and template.train_on")
    lint = _lint_table(kept)
    report.train_examples = len(kept)
    report.total_tokens = int(pc.sum(lint.column("_length")).as_py() or 0)
    report.trained_tokens = int(pc.sum(lint.column("_trained")).as_py() or 0)
    report.eos_trained = bool(pc.any(lint.column("_eos")).as_py())
    for row in kept.select(range(min(2, len(kept)))):
        report.samples.append([(tokenizer.decode([t]), label != -100) for t, label in zip(row["input_ids"],
                                                                                          row["labels"], strict=True)])
    train = _mix(streams, resolved, seed) if is_mixture(section) else streams[0]
    train = train.remove_columns(_LINT_COLUMNS)
    report.sources = [{"path": ", ".join(s.paths), "weight": s.weight, "format": s.format} for s in resolved]
    evaluation = None
    if isinstance(section.eval, str):  # an eval file is small: prepared whole (not cached)
        eval_read = read_source(eval_source(section, section.eval))
        eval_src = detect_format(eval_read.source, columns_of(eval_read.rows))
        report.fingerprint.update(source_fingerprint(eval_src))
        encoded = eval_read.rows.map(_encoder(recipe, tokenizer, eval_src), batched=True, with_indices=True,
                                     remove_columns=eval_read.rows.column_names, features=_encoded_features())
        drop = np.asarray(encoded.data.column("_drop").to_numpy(zero_copy_only=False))
        _count_drops(report, drop, eval_src)
        evaluation = encoded.select(np.flatnonzero(drop == "")).remove_columns(_LINT_COLUMNS)
        if not len(evaluation):
            refuse_empty_eval(section, read=len(encoded), dropped=_drop_counts(drop))
        report.eval_examples = len(evaluation)
    return PreparedData(train, evaluation, report)


# ----------------------------------------------------------------------------------------------------
# Eval rows: decided here, once, for train (held-out share), eval and merge (verification prompts)


@dataclass
class EvalRows:
    """The eval rows as their users need them, and where they came from, in words."""

    described: str
    conversations: list[Messages | str] = field(default_factory=list)  # causal-lm: messages, or a text row's text
    labelled: list[tuple[dict[str, Any], int]] = field(default_factory=list)  # classification: (row, class id)
    dropped: int = 0  # rows that hold nothing usable (no answer to score, empty text)
    raw: list[dict[str, Any]] = field(default_factory=list)  # the rows as read (preference tasks read own columns)


def eval_rows(recipe: Recipe, data_file: str | Path | None = None, *, labels: list[str] | None = None,
              limit: int | None = None, conversations: bool = True) -> EvalRows:
    """The eval rows: `data_file` (eval --data) if given, else data.eval's file, else the share of train held out.

    The held-out share is the very rows training held out (same shuffle, same seed). A recipe without eval data
    is an error that says how to give some. Classifiers pass `labels` and get (row, class id) pairs; tasks that read
    their own columns pass `conversations=False` and get the rows as read (`raw`).
    """
    section = recipe.data
    raw = _raw_cache_dir(section)  # datasets' Arrow copy of the files, shared with training's preparation
    if data_file is not None:
        parts = [(read_source(eval_source(section, str(data_file), f"--data: {data_file}"), cache_dir=raw), None)]
        described = str(data_file)
    elif isinstance(section.eval, str):
        parts = [(read_source(eval_source(section, section.eval), cache_dir=raw), None)]
        described = section.eval
    elif isinstance(section.eval, float):
        parts = []
        for source in train_sources(section):
            read = read_source(source, cache_dir=raw)
            parts.append((read, _hold_out(len(read.rows), section.eval, recipe.training.seed)[1]))
        train = section.train if isinstance(section.train, str) else "data.train"
        described = f"{section.eval:g} of {train} held out (seed {recipe.training.seed})"
    else:
        raise LorafitError("the recipe has no eval data", where="data.eval",
                           hint="set data.eval to a file or a held-out fraction, or pass --data FILE")
    result = EvalRows(described)
    for read, held in parts:
        rows = read.rows.select(held) if held is not None else read.rows
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        if labels is not None:
            ids = label_ids(rows, labels, section, read.source.where)
            result.labelled.extend(zip(rows, ids, strict=True))
            continue
        result.raw.extend(rows)
        if not conversations:
            continue
        source = detect_format(read.source, columns_of(rows))
        for row in rows:
            item = row_text(row, source) if source.format == "text" else row_to_messages(
                row, source, recipe.template.system_prompt)
            if item is None or (isinstance(item, str) and not item.strip()):
                result.dropped += 1
            else:
                result.conversations.append(item)
    return result


def split_rows(recipe: Recipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """Preference rows (dpo / kto / orpo) as dicts: train, eval (its file, or the held-out share), file fingerprints."""
    section = recipe.data
    fingerprint: dict[str, str] = {}
    train: list[dict[str, Any]] = []
    for source in train_sources(section):
        train.extend(read_source(source, cache_dir=_raw_cache_dir(section)).rows)
        fingerprint.update(source_fingerprint(source))
    evaluation: list[dict[str, Any]] = []
    if isinstance(section.eval, str):
        source = eval_source(section, section.eval)
        evaluation = list(read_source(source, cache_dir=_raw_cache_dir(section)).rows)
        fingerprint.update(source_fingerprint(source))
    elif isinstance(section.eval, float):
        kept, held = _hold_out(len(train), section.eval, recipe.training.seed)
        train, evaluation = [train[i] for i in kept], [train[i] for i in held]
    return train, evaluation, fingerprint


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


@dataclass(frozen=True)
class _LabelledEncoder:
    """Batched map function for classifiers: text (+ pair) -> input_ids, label -> class id (-1: no text)."""

    text_column: str
    pair_column: str
    label_column: str
    classes: tuple[str, ...]
    tokenizer: Any
    max_length: int
    with_pairs: bool

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        index = {name: i for i, name in enumerate(self.classes)}
        n = len(batch[self.text_column])
        texts = [as_text(t) for t in batch[self.text_column]]
        pairs = [as_text(p) for p in batch.get(self.pair_column, [None] * n)]
        usable = [i for i, t in enumerate(texts) if t and t.strip()]
        out = {"input_ids": [[] for _ in range(n)], "labels": [index.get(_label_name(v), -2)
                                                              for v in batch[self.label_column]]}
        if self.with_pairs:
            out["token_type_ids"] = [[] for _ in range(n)]
        for with_pair in (False, True):
            chosen = [i for i in usable if (pairs[i] is not None) == with_pair]
            if not chosen:
                continue
            encoding = self.tokenizer([texts[i] for i in chosen], [pairs[i] for i in chosen] if with_pair else None,
                                      truncation=True, max_length=self.max_length)
            for j, i in enumerate(chosen):
                out["input_ids"][i] = encoding["input_ids"][j]
                if self.with_pairs:
                    types = encoding.get("token_type_ids") if with_pair else None
                    out["token_type_ids"][i] = list(types[j]) if types else [0] * len(encoding["input_ids"][j])
        out["_empty"] = [not out["input_ids"][i] for i in range(n)]
        return out


def _build_classification(recipe: Recipe, tokenizer, sources: list[Source], evaluation: Source | None,
                          work: Path | None) -> PreparedData:
    import numpy as np
    import pyarrow.compute as pc

    section = recipe.data
    train_read = read_source(sources[0], cache_dir=_raw_cache_dir(section))
    labels = class_labels(recipe, train_read.rows)
    # Labels are checked before any row is held out, so an error names the row's place in the file.
    train_all = _map_labelled(train_read.rows, labels, recipe, tokenizer, train_read.source.where,
                              work / "train.arrow" if work else None)
    parts, train_rows, eval_rows = [train_all], np.arange(len(train_all)), None
    if evaluation is not None:
        eval_read = read_source(evaluation, cache_dir=_raw_cache_dir(section))
        parts.append(_map_labelled(eval_read.rows, labels, recipe, tokenizer, evaluation.where,
                                   work / "eval.arrow" if work else None))
        eval_rows = len(train_all) + np.arange(len(parts[1]))
    elif isinstance(section.eval, float):
        kept, held = _hold_out(len(train_all), section.eval, recipe.training.seed)
        train_rows, eval_rows = np.asarray(kept, dtype=np.int64), np.asarray(held, dtype=np.int64)
    report = DataReport(format=CLASSIFICATION, template="none", eos_token=tokenizer.eos_token,
                        rows_read=sum(map(len, parts)), label_counts=dict.fromkeys(labels, 0))
    empty = np.concatenate([np.asarray(p.data.column("_empty").to_numpy(zero_copy_only=False), dtype=bool)
                            for p in parts])

    def non_empty(rows: np.ndarray) -> tuple[np.ndarray, Counter]:
        dropped = Counter({"empty or missing text": int(empty[rows].sum())} if empty[rows].any() else {})
        report.dropped.update(dropped)
        return rows[~empty[rows]], dropped

    kept_train, train_dropped = non_empty(train_rows)
    kept_eval, eval_dropped = non_empty(eval_rows) if eval_rows is not None else (None, Counter())
    stored = data_cache.StoredSets(parts, kept_train, kept_eval, ("_empty",))
    train, evaluation_set = stored.datasets()
    if not len(train):
        refuse_empty_train(section, read=len(train_all), held=len(eval_rows) if evaluation is None and eval_rows
                           is not None else 0, dropped=train_dropped, what="trainable rows",
                           hint="check data.fields.text")
    if section.eval is not None and (evaluation_set is None or not len(evaluation_set)):
        refuse_empty_eval(section, read=len(eval_rows) if eval_rows is not None else 0, dropped=eval_dropped)
    table = train.select_columns(["labels", "input_ids"]).flatten_indices(keep_in_memory=True).data.table
    counts = pc.value_counts(table.column("labels")).to_pylist()
    for item in counts:
        report.label_counts[labels[item["values"]]] = item["counts"]
    report.total_tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
    for row in train.select(range(min(2, len(train)))):  # the text as the model reads it, then its label (highlighted)
        report.samples.append([(tokenizer.decode([t]), False) for t in row["input_ids"]]
                              + [(f"  -> {labels[row['labels']]}", True)])
    report.train_examples = len(train)
    report.eval_examples = len(evaluation_set) if evaluation_set is not None else 0
    return PreparedData(train, evaluation_set, report, labels, stored=stored)


def _map_labelled(rows: Dataset, labels: list[str], recipe: Recipe, tokenizer, where: str,
                  cache_file: Path | None) -> Dataset:
    import numpy as np

    section = recipe.data
    _require_columns(columns_of(rows), section, where)
    pair = _column(section, "text_pair")
    encoder = _LabelledEncoder(_column(section, "text"), pair, _column(section, "label"), tuple(labels), tokenizer,
                               section.max_length, pair in rows.column_names)
    options: dict[str, Any] = {"cache_file_name": str(cache_file)} if cache_file is not None else {}
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
    encoded = rows.map(encoder, batched=True, batch_size=256, remove_columns=rows.column_names,
                       num_proc=num_proc(section, len(rows)), new_fingerprint=f"lorafit-cls-{time.time_ns()}",
                       load_from_cache_file=False, **options)
    ids = np.asarray(encoded.data.column("labels").to_numpy())
    bad = np.flatnonzero(ids < 0)
    if len(bad):
        column = _column(section, "label")
        value = rows[int(bad[0])][column]
        problem = (f"no {column!r} value" if value is None or value == "" else
                   f"label {value!r} is not one of the classes ({', '.join(labels)})")
        raise LorafitError(f"row {int(bad[0]) + 1}: {problem}", where=where,
                           hint="fix the row, or list every class in data.labels")
    return encoded


def class_labels(recipe: Recipe, rows: Dataset | None = None) -> list[str]:
    """The class names in id order: data.labels, else the distinct label values of data.train, sorted."""
    section = recipe.data
    if section.labels is not None:
        return list(section.labels)
    if rows is None:
        rows = read_source(train_sources(section)[0]).rows
    sources = train_sources(section)
    _require_columns(columns_of(rows), section, sources[0].where)
    column = _column(section, "label")
    names = {_label_name(value) for value in rows.unique(column)} - {None}
    if len(names) < 2:
        raise LorafitError(f"the {column!r} column holds {len(names)} distinct label(s); a classifier needs at "
                           "least two", where="data.train", hint="check data.fields.label, or list data.labels")
    return sorted(names, key=_class_order)  # type: ignore[arg-type]


def label_ids(rows, labels: list[str], section: DataSection, where: str) -> list[int]:
    """Each row's class id; a missing label, or one that is not a class, is an error naming its row."""
    _require_columns(columns_of(rows), section, where)
    column = _column(section, "label")
    index = {name: i for i, name in enumerate(labels)}
    ids = []
    for number, value in enumerate(rows[column], start=1):
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
        text, pair = as_text(row.get(text_column)), as_text(row.get(pair_column))
        if not text or not text.strip():
            empty += 1
            continue
        encoding = tokenizer(text, pair, truncation=True, max_length=section.max_length)
        types = encoding.get("token_type_ids") if pair is not None else None
        examples.append(LabelledText(text, pair, list(encoding["input_ids"]), list(types) if types else None, label))
    return examples, empty


def _column(section: DataSection, name: str) -> str:
    return section.fields.get(name, name)


def _require_columns(columns: list[str], section: DataSection, where: str) -> None:
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
