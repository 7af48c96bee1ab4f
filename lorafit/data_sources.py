"""Where rows come from: files and hub data sets read into Arrow, their format, and each row as chat messages.

`read_source` reads one source (local jsonl/json/csv/parquet files or a hub id) through `datasets`, so rows
stay in memory-mapped Arrow tables, never in a Python list. Reading errors keep their precision: a malformed
JSON line is reported as `file:line`, a `.json` file that wraps its rows in an object is read from its one
list (or the candidates are named), a BOM is skipped, CSV fields keep their quoted newlines and read as text.
Compressed files (`data.jsonl.gz`, `.bz2`, `.xz`, `.zst`) are read as the kind of file they hold, as `datasets`
decompresses them.

`detect_format` decides a source's row format from its columns (ShareGPT `conversations` included), and
`row_to_messages` turns one row into chat messages: content given as a list of text parts is joined,
numbers are text, ShareGPT roles (human/gpt) become user/assistant.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import importlib
import io
import json
import lzma
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lorafit.errors import LorafitError, first_line
from lorafit.recipe import DataSection, DataSource

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

Messages = list[dict[str, str]]

# The columns each format needs, under their standard names (data.fields renames yours onto these).
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Compression suffixes `datasets` decompresses, with the module that reads each (zstandard is an optional package).
_CODECS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstandard"}


@dataclass(frozen=True)
class Source:
    """One entry of data.train (or data.eval) with the section's defaults filled in."""

    paths: tuple[str, ...]  # several files are read as one data set
    weight: float
    split: str
    fields: dict[str, str]
    format: str  # as configured; "auto" until detect_format resolves it
    where: str  # how errors name it, e.g. "data.train: a.jsonl"

    def column(self, standard: str) -> str:
        """The source's own name for a standard column (prompt, completion, messages, ...)."""
        return self.fields.get(standard, standard)


@dataclass
class SourceData:
    """A source's rows as read (the format may still be "auto")."""

    source: Source
    rows: Dataset | IterableDataset


def train_sources(section: DataSection) -> list[Source]:
    """data.train as sources: one for a file, a hub id or a plain list of files; one per entry for a weighted mix."""
    entries = section.train if isinstance(section.train, list) else [section.train]
    if all(isinstance(entry, str) for entry in entries):  # several files read as one data set
        where = f"data.train: {section.train}" if isinstance(section.train, str) else "data.train"
        return [Source(tuple(entries), 1.0, section.split, dict(section.fields), section.format, where)]
    sources = []
    for i, entry in enumerate(entries):
        entry = DataSource(path=entry) if isinstance(entry, str) else entry
        sources.append(Source((entry.path,), entry.weight, entry.split or section.split,
                              dict(section.fields if entry.fields is None else entry.fields),
                              entry.format or section.format, f"data.train[{i}]: {entry.path}"))
    return sources


def eval_source(section: DataSection, path: str, where: str | None = None) -> Source:
    """An eval file (data.eval or --data) read with the section's format and fields."""
    return Source((path,), 1.0, section.split, dict(section.fields), section.format, where or f"data.eval: {path}")


def is_mixture(section: DataSection) -> bool:
    """True when data.train lists weighted entries (a mix), not plain files read as one."""
    return isinstance(section.train, list) and any(not isinstance(entry, str) for entry in section.train)


def local_files(section: DataSection) -> list[Path]:
    """Every local data file the recipe names (train and eval), for checks such as 'not the output folder'."""
    paths = [p for source in train_sources(section) for p in source.paths]
    if isinstance(section.eval, str):
        paths.append(section.eval)
    return [Path(p).expanduser() for p in paths if Path(p).expanduser().exists()]


# ----------------------------------------------------------------------------------------------------
# Reading


def read_source(source: Source, *, streaming: bool = False, cache_dir: Path | None = None) -> SourceData:
    """The source's rows as an Arrow-backed Dataset (or an IterableDataset when streaming)."""
    specs = source.paths
    local = [s for s in specs if _is_local(s)]
    if local and len(local) != len(specs):
        raise LorafitError("mixes local files and hub ids in one list", where=source.where,
                           hint="list them as weighted entries: [{path: a.jsonl}, {path: org/dataset}]")
    if not local:
        if len(specs) > 1:
            raise LorafitError("several hub ids in one plain list", where=source.where,
                               hint="list them as entries: [{path: org/a}, {path: org/b}]")
        return _read_hub(source, streaming=streaming)
    paths = [_checked_file(Path(s).expanduser(), source.where) for s in specs]
    builders = {_FILE_BUILDERS.get(data_suffix(path), "json") for path in paths}
    if len(builders) > 1:
        raise LorafitError("lists files of different kinds (" + ", ".join(sorted(builders)) + ")", where=source.where,
                           hint="convert them to one kind, or list them as weighted entries")
    builder = builders.pop()
    options: dict[str, Any] = {}
    if builder == "csv":
        # Every column as text, exactly as written: "007" stays "007", an empty field stays "" (not NaN).
        options = {"features": _csv_text_features(paths, source.where), "keep_default_na": False,
                   "encoding": "utf-8-sig"}
    elif builder == "json":
        options = _json_options(paths, source.where)
    rows = _load(builder, paths, options, source.where, streaming=streaming, cache_dir=cache_dir)
    return SourceData(source, rows)


def source_fingerprint(source: Source, hash_memo: Path | None = None) -> dict[str, str]:
    """What identifies the source's content: each local file's sha256, or a hub data set's loaded revision."""
    fingerprint = {}
    for spec in source.paths:
        if _is_local(spec):
            path = _checked_file(Path(spec).expanduser(), source.where)
            fingerprint[str(path)] = file_sha256(path, hash_memo)
        else:
            fingerprint[spec] = f"hub:{source.split}@{_hub_revision(spec, source.where)}"
    return fingerprint


def _is_local(spec: str) -> bool:
    path = Path(spec).expanduser()
    return path.exists() or data_suffix(path) in (*_FILE_BUILDERS, ".txt") or "/" not in spec


def data_suffix(path: Path) -> str:
    """The kind of data a file holds, by its name, without a compression suffix: `.jsonl` for `train.jsonl.gz`."""
    if path.suffix.lower() in _CODECS:
        return Path(path.stem).suffix.lower()
    return path.suffix.lower()


def open_data_file(path: Path, *, text: bool = False, newline: str | None = None) -> IO:
    """A data file opened for reading, decompressed when its name says it is compressed (text: UTF-8, BOM skipped).

    A compressed file that cannot be decompressed is refused with the codec's reason when it is read
    (`_decompression_error`)."""
    module = _CODECS.get(path.suffix.lower())
    if module is None:
        handle: IO = path.open("rb")
    else:
        try:
            handle = importlib.import_module(module).open(path, "rb")
        except ImportError:
            raise LorafitError(f"is {path.suffix[1:]}-compressed, and the {module} package that reads it is not "
                               "installed", where=str(path),
                               hint=f"pip install {module}, or decompress the file") from None
    return io.TextIOWrapper(handle, encoding="utf-8-sig", newline=newline) if text else handle


def _decompression_error(path: Path, exc: Exception) -> LorafitError:
    return LorafitError(f"cannot be decompressed ({first_line(exc)})", where=str(path),
                        hint="the file is damaged or not what its name says; check it with the codec's own tool")


# What a damaged compressed file raises when read (gzip.BadGzipFile is an OSError, a cut file an EOFError).
_DECOMPRESSION_ERRORS = (OSError, EOFError, lzma.LZMAError)


def _checked_file(path: Path, where: str) -> Path:
    if not path.exists():
        raise LorafitError("data file not found", where=str(path), hint=f"check {where.split(':')[0]}")
    if path.is_dir():
        raise LorafitError("is a directory, not a data file", where=str(path))
    if path.stat().st_size == 0:
        raise LorafitError("the data file is empty", where=str(path))
    return path


def file_sha256(path: Path, memo: Path | None = None) -> str:
    """The file's sha256, read in blocks (a 1 GB file is never held in memory).

    With a memo folder, a hash computed before is reused while the file's size, modification time (ns), change
    time (ns) and inode are unchanged, as git's index trusts a file's stat: hashing 1.4 GB takes over a second,
    which is most of a cached run's start. The change time is what `cp -p`, `rsync -t` or an archive extraction
    cannot set back when they rewrite a file in place and restore its mtime. A file modified in the last 2 seconds
    is hashed anyway and not memoised, since a second write within the same clock tick would keep its mtime.
    """
    stat = path.stat()
    stamp = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}
    settled = time.time_ns() - stat.st_mtime_ns > 2_000_000_000
    record = memo / (hashlib.sha256(stamp["path"].encode()).hexdigest()[:24] + ".json") if memo else None
    known = _read_hash_memo(record) if record is not None else None
    if settled and known and {key: known.get(key) for key in stamp} == stamp:
        return known["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    # Written only where nothing is, or over a memo of this same format: a file of any other kind that happens to
    # carry the name is left alone.
    ours = record is not None and (known is not None or not record.exists())
    if ours and settled and path.stat().st_mtime_ns == stat.st_mtime_ns:
        _write_hash_memo(record, {**stamp, "sha256": digest.hexdigest()})
    return digest.hexdigest()


def _read_hash_memo(record: Path) -> dict[str, Any] | None:
    """A memo file lorafit wrote (a JSON object with a sha256), else None (absent, unreadable or not a memo)."""
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(record.read_text())
        if isinstance(known, dict) and isinstance(known.get("sha256"), str):
            return known
    return None


def _write_hash_memo(record: Path, memo: dict[str, Any]) -> None:
    """Write the memo atomically: a new temporary file (never an existing one), then renamed over the record."""
    import tempfile

    with contextlib.suppress(OSError):  # a memo that cannot be written only costs the next run the hashing
        record.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=record.parent, prefix=f"{record.name}.tmp-")
        try:
            with os.fdopen(handle, "w") as out:
                out.write(json.dumps(memo))
            os.replace(partial, record)
        except OSError:
            Path(partial).unlink(missing_ok=True)


def _csv_text_features(paths: list[Path], where: str):
    """Every CSV column read as a string (the header gives the names; all files must share it)."""
    import csv

    from datasets import Features, Value

    headers = set()
    for path in paths:
        try:
            with open_data_file(path, text=True, newline="") as handle:
                headers.add(tuple(next(csv.reader(handle), [])))
        except UnicodeDecodeError as error:
            raise LorafitError(f"not UTF-8 text (byte {error.start})", where=str(path)) from None
        except _DECOMPRESSION_ERRORS as error:
            raise _decompression_error(path, error) from None
    if len(headers) > 1:
        raise LorafitError("the CSV files have different header rows", where=where,
                           hint="give every file the same columns, or list them as separate entries")
    header = headers.pop()
    if not header or len(set(header)) != len(header):
        raise LorafitError("the CSV header row is empty or repeats a column name", where=str(paths[0]))
    return Features({name: Value("string") for name in header})


def _json_options(paths: list[Path], where: str) -> dict[str, Any]:
    """How to read .json/.jsonl: one object per line, an array, or an object wrapping the rows in one list."""
    for path in paths:
        _check_rows_are_objects(path)
    fields = {_wrapping_field(path) for path in paths if data_suffix(path) == ".json"} - {None}
    if len(fields) > 1:
        raise LorafitError(f"the .json files wrap their rows under different keys ({', '.join(sorted(fields))})",
                           where=where)
    return {"field": fields.pop()} if fields else {}


def _check_rows_are_objects(path: Path) -> None:
    """JSON lines (or a .json array) must hold objects; `datasets` would read [1, 2] as a text column."""
    head = _head(path).removeprefix(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"[") and data_suffix(path) == ".json":
        if head[1:].lstrip()[:1] not in (b"{", b"]", b""):
            raise LorafitError("expected a JSON object", where=f"{path}: item 0",
                               hint="a .json file must be an array of objects, one per row")
    elif head[:1] not in (b"{", b""):
        _explain_failure([path], "json", ValueError("not JSON lines"))


def _wrapping_field(path: Path) -> str | None:
    """For a .json document like {"data": [...]}, the key of its list of rows; None for arrays and JSON lines."""
    text = _head(path).removeprefix(codecs.BOM_UTF8).lstrip()
    if not text.startswith(b"{"):
        return None
    first_line = text.split(b"\n", 1)[0]
    try:
        obj = json.loads(first_line)
        one_line_document = not text[len(first_line):].strip()
    except ValueError:
        obj, one_line_document = None, False
    if obj is not None and not one_line_document:
        return None  # JSON lines: the first line is a whole object and more follow
    try:
        with open_data_file(path) as handle:
            document = json.loads(handle.read().removeprefix(codecs.BOM_UTF8))
    except ValueError:
        return None  # reported with its line by _explain_failure
    if not isinstance(document, dict):
        return None
    lists = [key for key, value in document.items()
             if isinstance(value, list) and value and all(isinstance(item, dict) for item in value)]
    if len(lists) == 1:
        return lists[0]
    if obj is not None and not lists:
        return None  # one row written as a one-line JSON document
    raise LorafitError(
        "is one JSON object, not rows: " + (f"it holds several lists of rows ({', '.join(lists)})" if lists else
                                            f"none of its keys ({', '.join(map(str, document)) or 'none'}) holds a list of rows"),
        where=str(path), hint="write one JSON object per line (.jsonl), or a .json array of objects")


def _head(path: Path) -> bytes:
    """The first 64 KiB of the file's (decompressed) content."""
    try:
        with open_data_file(path) as handle:
            return handle.read(1 << 16)
    except _DECOMPRESSION_ERRORS as error:
        raise _decompression_error(path, error) from None


def _load(builder: str, paths: list[Path], options: dict[str, Any], where: str, *, streaming: bool,
          cache_dir: Path | None):
    import datasets

    datasets.disable_progress_bars()
    # Its JSON reader logs a parse failure (with a traceback) before raising; the error below says it in one line.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", streaming=streaming,
                                     cache_dir=str(cache_dir) if cache_dir else None, **options)
    except LorafitError:
        raise
    except Exception as exc:  # datasets wraps parser errors in several types; find the line ourselves
        _explain_failure(paths, builder, exc)
        raise LorafitError(f"cannot read the data: {_first_line(exc)}", where=where) from None


def _explain_failure(paths: list[Path], builder: str, exc: Exception) -> None:
    """Raise the precise error (file:line) behind a failed load, found by re-reading the files in Python."""
    for path in paths:
        try:
            with open_data_file(path, text=True) as handle:
                if builder == "json" and data_suffix(path) == ".json" and handle.read(1 << 16).lstrip()[:1] == "[":
                    handle.seek(0)
                    try:
                        rows = json.loads(handle.read())
                    except json.JSONDecodeError as error:
                        raise LorafitError(f"invalid JSON: {error.msg}", where=f"{path}:{error.lineno}") from None
                    for i, row in enumerate(rows):
                        _require_object(row, f"{path}: item {i}")
                    continue
                handle.seek(0)
                if builder != "json":
                    handle.read()  # only the text decoding is checked for csv / parquet
                    continue
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise LorafitError(f"malformed JSON line: {error.msg}", where=f"{path}:{number}",
                                           hint="each line must be one JSON object") from None
                    _require_object(row, f"{path}:{number}")
        except UnicodeDecodeError as error:
            raise LorafitError(f"not UTF-8 text (byte {error.start})", where=str(path)) from None
        except _DECOMPRESSION_ERRORS as error:
            raise _decompression_error(path, error) from None
    message = _first_line(exc)
    if "ArrowInvalid" in repr(exc.__cause__) or "column" in message.lower():
        raise LorafitError(f"the files' columns do not agree: {message}", where=", ".join(map(str, paths)),
                           hint="give every row the same columns, or list the files as separate entries")


def _require_object(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise LorafitError(f"expected a JSON object, got {type(row).__name__}", where=where)


def _first_line(exc: BaseException) -> str:
    return first_line(exc.__cause__ or exc)  # datasets wraps the parser's error; its cause says what went wrong


def _read_hub(source: Source, *, streaming: bool) -> SourceData:
    import datasets

    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(source.paths[0], split=source.split, streaming=streaming)
    except Exception as exc:  # datasets raises many types for "not reachable / not found"
        raise LorafitError(f"cannot load hub dataset: {_first_line(exc)}", where=source.where,
                           hint="check the id, data.split, and your network") from None
    return SourceData(source, rows)


def _hub_revision(dataset_id: str, where: str) -> str:
    """The commit of the hub data set that loading resolves to now (offline: the one in the local cache)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(dataset_id)
    except Exception as exc:  # not reachable / not found: the same error the load itself would give
        raise LorafitError(f"cannot load hub dataset: {_first_line(exc)}", where=where,
                           hint="check the id, data.split, and your network") from None
    return str(builder.hash or builder.config_id)


# ----------------------------------------------------------------------------------------------------
# Formats


def columns_of(rows) -> list[str]:
    """The column names of a Dataset or IterableDataset (a stream is asked for its first row if needed)."""
    names = getattr(rows, "column_names", None)
    if names is None:
        first = next(iter(rows), None)
        names = list(first) if first else []
    return list(names)


def detect_format(source: Source, columns: list[str]) -> Source:
    """The source with its row format resolved: as configured (checked against the columns), or detected."""
    present = set(columns)
    mapped = {standard for cols in FORMAT_COLUMNS.values() for standard in cols if source.column(standard) in present}
    fmt = source.format
    if fmt != "auto":
        missing = [source.column(c) for c in FORMAT_COLUMNS[fmt] if c not in mapped]
        if fmt == "messages" and missing and "messages" not in source.fields and "conversations" in present:
            return _with(source, "messages", {"messages": "conversations"})
        if missing:
            raise LorafitError(f"format {fmt} needs column(s) {', '.join(missing)}; the data has "
                               f"{', '.join(sorted(present)) or 'no columns'}", where=source.where,
                               hint="map your columns with data.fields, e.g. {prompt: question}")
        return source
    for candidate, needed in FORMAT_COLUMNS.items():
        if all(c in mapped for c in needed):
            return _with(source, candidate, {})
    if "conversations" in present and "messages" not in source.fields:  # ShareGPT
        return _with(source, "messages", {"messages": "conversations"})
    raise LorafitError(f"cannot tell the data format from columns {', '.join(sorted(present)) or '(none)'}",
                       where=source.where,
                       hint="set data.format (messages | alpaca | prompt-completion | text) and data.fields")


def _with(source: Source, fmt: str, fields: dict[str, str]) -> Source:
    return Source(source.paths, source.weight, source.split, {**source.fields, **fields}, fmt, source.where)


def as_text(value: Any) -> str | None:
    """A cell as text: strings as they are, numbers written out (a completion of 42 is the text "42")."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _content_text(content: Any) -> str | None:
    """Message content as text: a string, a number, or a list of text parts ({"type": "text", "text": ...})."""
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                return None  # an image or other non-text part: this row cannot be trained as text
        return "\n".join(texts)
    return as_text(content)


def row_to_messages(row: dict[str, Any], source: Source, system_prompt: str | None) -> Messages | None:
    """One row as chat messages (None when it has nothing usable); `source.format` must be resolved, not text."""
    get = lambda name: row.get(source.column(name))  # noqa: E731
    fmt = source.format
    if fmt == "messages":
        raw = get("messages")
        if isinstance(raw, str):  # a messages column stored as JSON text (e.g. in CSV or parquet)
            try:
                raw = json.loads(raw)
            except ValueError:
                return None
        if not isinstance(raw, list):
            return None
        messages = []
        for turn in raw:
            if not isinstance(turn, dict):
                return None
            role = turn.get("role", turn.get("from"))
            content = _content_text(turn.get("content", turn.get("value")))
            if not isinstance(role, str) or content is None:
                return None
            messages.append({"role": _ROLE_ALIASES.get(role, role), "content": content})
    elif fmt == "alpaca":
        instruction, extra, output = as_text(get("instruction")), as_text(get("input")), as_text(get("output"))
        if instruction is None or output is None:
            return None
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:
        prompt, completion = as_text(get("prompt")), as_text(get("completion"))
        if prompt is None or completion is None:
            return None
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if system_prompt and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def row_text(row: dict[str, Any], source: Source) -> str | None:
    """A text-format row's document."""
    return as_text(row.get(source.column("text")))
