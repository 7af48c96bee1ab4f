"""The prepared-data cache: tokenized train/eval sets on disk, keyed by everything that changes them.

An entry is `<cache>/data/<key>/` (cache = `$LORAFIT_CACHE`, default `~/.cache/lorafit`) holding `rows/` (the
Arrow files the tokenizing `map` wrote, kept where they were written and read back memory-mapped),
`train-rows.npy` / `eval-rows.npy` (which of those rows, in training order, make each set), `layout.json`,
`report.json` (the lint report) and `manifest.json` (every file's size, written last). Keeping the map's files
instead of saving the selected sets again means no prepared row is read or copied a second time: at 500k rows
that copy read 6 GB of pages and dominated peak RSS. The key is a sha256 over the data files' hashes (or the hub
revision), the tokenizer, template, format, fields, max_length, train_on, system prompt, seed, task and the
lorafit version, so any change is a miss and nothing stale is ever reused.

An entry is built under a temporary name and renamed into place when complete; one whose files do not match
its manifest is removed and rebuilt. A file lock per key makes one process build while the others (the other
ranks of a `torchrun`, or a second run started meanwhile) wait and then read what it built.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.errors import LorafitError

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

_FORMAT_VERSION = 2  # bump when the layout or the meaning of the prepared columns changes


def data_cache_dir() -> Path:
    """Where prepared data is kept: $LORAFIT_DATA_CACHE, else <lorafit cache>/data (models.cache_dir); created if
    missing. A place that cannot be a writable folder (a file in the way, no permission, a read-only disk) is a
    user error naming the variable that chose it, before any data is read."""
    from lorafit.models import cache_dir

    folder = Path(os.environ.get("LORAFIT_DATA_CACHE") or cache_dir() / "data").expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied", str(folder))
    except OSError as exc:
        from lorafit.run_folder import path_error

        problem = path_error(exc, "")
        raise LorafitError(f"the prepared-data cache {folder} {problem.message}", where=_cache_setting(),
                           hint=f"{problem.hint}, or turn the cache off with data.cache: false") from None
    return folder


def _cache_setting() -> str:
    """What chose the cache folder, as the user would set it."""
    for name in ("LORAFIT_DATA_CACHE", "LORAFIT_CACHE"):
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    return "LORAFIT_DATA_CACHE (unset: ~/.cache/lorafit/data)"


def cache_key(inputs: dict[str, Any]) -> str:
    """A short sha256 of everything that changes the prepared data."""
    from lorafit import __version__

    payload = json.dumps({"lorafit": __version__, "layout": _FORMAT_VERSION, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer as it will encode: its vocabulary and rules, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token,
                        type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None)], default=str)
    return hashlib.sha256((body + extra).encode()).hexdigest()


@dataclass
class StoredSets:
    """Prepared sets as they are stored: the map's outputs (each backed by Arrow files in the build folder) and the
    positions, in the parts concatenated in order, of the rows that make the train and eval sets."""

    parts: list[Dataset]
    train_rows: np.ndarray
    eval_rows: np.ndarray | None
    build_columns: tuple[str, ...] = ()  # per-row lint columns the builder reads and training does not

    def datasets(self, *, with_build_columns: bool = False) -> tuple[Dataset, Dataset | None]:
        """The train and eval sets as views of the parts (an index mapping, no copy)."""
        from datasets import concatenate_datasets

        rows = concatenate_datasets(self.parts)  # a view, also of one part
        if not with_build_columns:
            rows = rows.remove_columns([c for c in self.build_columns if c in rows.column_names])
        evaluation = rows.select(self.eval_rows) if self.eval_rows is not None and len(self.eval_rows) else None
        return rows.select(self.train_rows), evaluation


@dataclass
class CachedData:
    """A complete cache entry, memory-mapped: train, eval (or None) and the stored report."""

    path: Path
    train: Dataset
    eval: Dataset | None
    report: dict[str, Any]


@contextlib.contextmanager
def locked(key: str) -> Iterator[Path]:
    """Hold the key's lock (blocking) and yield the entry's folder; other processes wait at this point."""
    root = data_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        try:
            yield root / key
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load(entry: Path) -> CachedData | None:
    """The entry if it is complete and intact; a damaged one is removed (and so rebuilt), never trusted."""
    if not entry.is_dir():
        return None
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        for name, size in manifest["files"].items():
            if (entry / name).stat().st_size != size:
                raise ValueError(f"{name} has the wrong size")
        import numpy as np
        from datasets import Dataset, concatenate_datasets

        layout = json.loads((entry / "layout.json").read_text())
        parts = [concatenate_datasets([Dataset.from_file(str(entry / name)) for name in files])
                 for files in layout["parts"]]
        eval_rows = np.load(entry / "eval-rows.npy") if (entry / "eval-rows.npy").is_file() else None
        stored = StoredSets(parts, np.load(entry / "train-rows.npy"), eval_rows, tuple(layout["build_columns"]))
        train, evaluation = stored.datasets()
        report = json.loads((entry / "report.json").read_text())
        if len(train) != manifest["train_rows"]:
            raise ValueError("train has the wrong number of rows")
    except Exception:  # any damage at all (missing, truncated, unparsable) means: build it again
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return CachedData(entry, train, evaluation, report)


def new_build_folder(entry: Path | None) -> Path:
    """A fresh folder to build into: beside the entry (renamed into place by publish), or a temporary one."""
    if entry is None:
        folder = Path(tempfile.mkdtemp(prefix="lorafit-data-"))
        import atexit

        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return folder
    folder = entry.parent / f"{entry.name}.tmp-{_build_owner()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def publish(folder: Path, entry: Path, stored: StoredSets, report: dict[str, Any]) -> CachedData:
    """Record which rows of the map's files (already in the build folder) make each set, then rename the folder
    to the entry; returns the sets memory-mapped from there."""
    import numpy as np

    parts = []
    for part in stored.parts:
        files = [Path(f["filename"]).resolve() for f in part.cache_files]
        if not files or any(folder.resolve() not in path.parents for path in files):
            raise OSError(f"prepared data outside its build folder {folder}: {files}")
        parts.append([str(path.relative_to(folder.resolve())) for path in files])
    np.save(folder / "train-rows.npy", np.asarray(stored.train_rows, dtype=np.int64))
    if stored.eval_rows is not None and len(stored.eval_rows):
        np.save(folder / "eval-rows.npy", np.asarray(stored.eval_rows, dtype=np.int64))
    (folder / "layout.json").write_text(json.dumps({"parts": parts, "build_columns": list(stored.build_columns)}))
    (folder / "report.json").write_text(json.dumps(report))
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = {"files": files, "train_rows": len(stored.train_rows)}
    with open(folder / "manifest.json", "w") as handle:  # written last: its presence means "complete"
        json.dump(manifest, handle)
        handle.flush()
        os.fsync(handle.fileno())
    shutil.rmtree(entry, ignore_errors=True)
    os.rename(folder, entry)
    cached = load(entry)
    if cached is None:
        raise OSError(f"the prepared data just written to {entry} cannot be read back")
    return cached


def remove_stale_builds() -> None:
    """Remove build folders left by processes of this machine that died mid-build (their pid is gone).

    Only names this module writes (`<24-hex key>.tmp-<host>-<pid>`) are considered, and only this host's: on a
    cache folder shared by several nodes, another node's pid means nothing here and its build is left alone.
    """
    root = data_cache_dir()
    pattern = re.compile(rf"^[0-9a-f]{{24}}\.tmp-{re.escape(socket.gethostname())}-(\d+)$")
    for folder in root.iterdir() if root.is_dir() else []:
        match = pattern.match(folder.name)
        if match and folder.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _build_owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
