"""The output folders lorafit writes — a run, a merge, an eval report, a sweep — and how lorafit proves which are its
own.

Everything about these folders is spelled here and imported everywhere else:

- the names of the entries lorafit writes (a run: `adapter/`, `recipe.yaml`, `metrics.json`, `README.md`,
  `loss.png`, `checkpoints/`, `logs/`, `eval/`; a merge: the model files and `merge.json`; an eval: `report.json`,
  `samples.jsonl`, `scores.png`; a sweep: `sweep.json`, `sweep.md`, beside its run folders);
- the ownership marker `lorafit.json` at the root of every output folder: its `kind` (run | merge | eval | sweep),
  the lorafit version, when it was created, the top-level `files` lorafit wrote there (recorded *before* they
  are written, so a crash never leaves an entry of ours unlisted), and a `status` (running | finished |
  interrupted | failed). A folder is lorafit's only by this marker: `--overwrite`, `--resume`, `merge
  --overwrite` and `eval --out` delete or replace only the entries it lists (`remove_owned`);
- whether an output folder may be written, checked before any work with one set of rules and messages
  (`check_run_folder`, `check_sweep_folder`, `check_output_folder` for merge and eval): never inside another
  output, only over an earlier output of the same kind, never over a file lorafit did not write; a run never
  into the filesystem root, home, the current folder or the base model's or data's folder, and over a finished
  run only with --overwrite or --resume;
- one atomic writer (`write_atomic`: temporary file, fsync, rename, fsync of the folder);
- one writer per folder (`folder_lock`: `fcntl.flock` on `.lorafit.lock`, released by the kernel on any exit);
- staged outputs (`staged_output`): merge and eval write into a hidden staging folder and publish it into place
  only when complete; Ctrl-C / SIGTERM remove the staging folder and leave the output as it was.

Runs written by lorafit before the marker existed are recognised by the run record those versions wrote
(`checkpoints/lorafit-run.json`); merges by their `merge.json`, which lists the files written; eval folders by
a `report.json` in lorafit's report format. They are converted to a real marker the first time lorafit
writes there again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorafit.errors import Interrupted, LorafitError

if TYPE_CHECKING:
    from lorafit.recipe import Recipe

MARKER = "lorafit.json"
_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it) and put back at once
os.umask(_UMASK)
LOCK = ".lorafit.lock"
STAGING = ".lorafit-staging"  # inside a merge/eval output folder, while it is being written

# A run folder (runs/<name>/)
ADAPTER = "adapter"
ADAPTER_STAGING = ".adapter.tmp"
RECIPE = "recipe.yaml"
METRICS = "metrics.json"
MODEL_CARD = "README.md"
LOSS_CHART = "loss.png"  # train/eval loss and learning rate against step, shown in the model card
CHECKPOINTS = "checkpoints"
LOGS = "logs"
EVAL = "eval"  # `lorafit eval`'s default output folder, inside the run it evaluates
RUN_ENTRIES = (ADAPTER, ADAPTER_STAGING, RECIPE, METRICS, MODEL_CARD, LOSS_CHART, CHECKPOINTS, LOGS, EVAL)
# Inside checkpoints/
CHECKPOINT_STAGING = ".incomplete"
CHECKPOINT_MARKER = "lorafit-checkpoint.json"
RUN_RECORD = "lorafit-run.json"  # the recipe fingerprint --resume checks; also how pre-marker runs are recognised
# An eval folder
EVAL_REPORT = "report.json"
EVAL_SAMPLES = "samples.jsonl"
EVAL_CHART = "scores.png"  # base vs adapters, bar chart
# A sweep folder (`train --sweep`): one run folder per grid point, plus the summary
SWEEP_SUMMARY = "sweep.json"
SWEEP_TABLE = "sweep.md"
# A merge folder (plus the model's own files, listed in the marker as written)
MERGE_RECORD = "merge.json"

Kind = Literal["run", "merge", "eval", "sweep"]
Status = Literal["running", "finished", "interrupted", "failed"]
KINDS = ("run", "merge", "eval", "sweep")
STATUSES = ("running", "finished", "interrupted", "failed")


@dataclass
class Marker:
    """What `lorafit.json` says about a folder: lorafit wrote it, as a `kind` output, and which entries are its own."""

    folder: Path
    kind: str
    lorafit_version: str
    created: str
    files: list[str] = field(default_factory=list)
    status: str | None = None
    updated: str | None = None
    legacy: bool = False  # recognised from a pre-marker lorafit's own records; no lorafit.json on disk yet

    def owns(self, name: str) -> bool:
        """Whether the top-level entry `name` is one lorafit wrote here."""
        return name in self.files or name == MARKER


def read_marker(folder: str | Path) -> Marker | None:
    """The marker of a folder lorafit created as an output; None when lorafit cannot prove the folder is its own.

    A `lorafit.json` that cannot be read (edited by hand, not lorafit's) proves nothing: None.
    """
    folder = Path(folder).expanduser()
    path = folder / MARKER
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _legacy_marker(folder)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("kind") not in KINDS or not isinstance(payload.get("files"), list):
        return None
    status = payload.get("status")
    return Marker(folder=folder, kind=payload["kind"], lorafit_version=str(payload.get("lorafit_version", "")),
                  created=str(payload.get("created", "")), files=[str(f) for f in payload["files"]],
                  status=status if status in STATUSES else None, updated=payload.get("updated"))


def write_marker(folder: Path, kind: Kind, *, files: Iterable[str] = (), status: Status | None = None) -> Marker:
    """Claim `folder` as a lorafit output (keeping `created` and the files of an earlier marker of the same kind)."""
    old = read_marker(folder)
    now = _now()
    marker = Marker(folder=folder, kind=kind, lorafit_version=_version(), created=now, status=status, updated=now)
    if old is not None and old.kind == kind:
        marker.created = old.created or now
        marker.files = list(old.files)
    marker.files = _merged(marker.files, files)
    _save(marker)
    return marker


def update_marker(folder: Path, *, status: Status | None = None, add_files: Iterable[str] = ()) -> Marker:
    """Set the status and/or record more entries as lorafit's (before they are written); the marker must exist."""
    marker = read_marker(folder)
    if marker is None:
        raise LorafitError("this folder has no lorafit marker", where=str(folder / MARKER))
    if status is not None:
        marker.status = status
    marker.files = _merged(marker.files, add_files)
    marker.updated = _now()
    _save(marker)
    return marker


def _save(marker: Marker) -> None:
    payload = {"kind": marker.kind, "lorafit_version": marker.lorafit_version, "created": marker.created,
               "updated": marker.updated, "files": marker.files}
    if marker.status is not None:
        payload["status"] = marker.status
    write_json_atomic(marker.folder / MARKER, payload)
    marker.legacy = False


def _merged(files: list[str], more: Iterable[str]) -> list[str]:
    result = list(files)
    for name in more:
        if name not in result and name != MARKER:
            result.append(name)
    return result


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    from lorafit import __version__

    return __version__


def _legacy_marker(folder: Path) -> Marker | None:
    """A folder written by lorafit before `lorafit.json` existed, recognised by lorafit's own records in it."""
    if (folder / CHECKPOINTS / RUN_RECORD).is_file():
        files = [name for name in RUN_ENTRIES if (folder / name).exists()]
        status = "finished" if (folder / METRICS).is_file() else "interrupted"
        return Marker(folder=folder, kind="run", lorafit_version="(before lorafit.json)", created="", files=files,
                      status=status, legacy=True)
    record = read_json_object(folder / MERGE_RECORD)
    if record is not None and {"max_logit_diff", "base_weights", "files"} <= set(record):
        files = [str(name) for name in record["files"] if isinstance(name, str) and "/" not in name]
        return Marker(folder=folder, kind="merge", lorafit_version="(before lorafit.json)", created="",
                      files=files, status="finished", legacy=True)
    report = read_json_object(folder / EVAL_REPORT)
    if report is not None and {"scores", "report_path", "samples_path"} <= set(report):
        return Marker(folder=folder, kind="eval", lorafit_version="(before lorafit.json)", created="",
                      files=[EVAL_REPORT, EVAL_SAMPLES, EVAL_CHART], status="finished", legacy=True)
    return None


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object read from `path`, or None when the file is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ----------------------------------------------------------------------------------------------------
# Atomic writes


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a file so readers (and a crash or power loss) see either the old or the complete new content."""
    import tempfile

    data = content.encode("utf-8") if isinstance(content, str) else content
    # A fresh name (never a file that exists, such as a user's `.metrics.json.tmp`), so a failure can remove it.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            # mkstemp makes the file private (0600); the written file gets the mode a plain open() would give it.
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, no permission, Ctrl-C: the old content stays and no temporary file is left
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


def write_json_atomic(path: Path, payload: Any) -> None:
    """`write_atomic` of a JSON document (indented, non-JSON values as strings)."""
    write_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk so a rename after a power loss never points at empty files (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------------
# Deleting only what lorafit wrote


def foreign_entries(folder: Path, names: Iterable[str], marker: Marker | None) -> list[str]:
    """Those of `names` that exist in `folder` but that lorafit cannot prove it wrote there."""
    return [name for name in names if (folder / name).exists() or (folder / name).is_symlink()
            if marker is None or not marker.owns(name)]


def remove_owned(folder: Path, marker: Marker, *, keep_marker: bool = False) -> None:
    """Delete the entries `marker` lists (and nothing else) from `folder`.

    A listed folder that is itself a lorafit output (its own marker, e.g. a run's eval/) is emptied the same way;
    `checkpoints/` loses only lorafit's complete checkpoints, its staging area and the run record. A folder left
    holding something lorafit did not write stays, with that content.
    """
    for name in marker.files:
        target = folder / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            if name == CHECKPOINTS and marker.kind == "run":
                _remove_own_checkpoints(target)
            elif name == EVAL and read_marker(target) is None:
                with contextlib.suppress(OSError):  # no report of ours in it (any more): only an empty folder goes
                    target.rmdir()
            elif (inner := read_marker(target)) is not None:
                remove_owned(target, inner)
                with contextlib.suppress(OSError):  # a nested output (a run's eval/) goes when nothing else is left
                    target.rmdir()
            else:
                shutil.rmtree(target)
    if not keep_marker:
        (folder / MARKER).unlink(missing_ok=True)


def _remove_own_checkpoints(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.name == CHECKPOINT_STAGING or (entry.is_dir() and (entry / CHECKPOINT_MARKER).is_file()):
            shutil.rmtree(entry)
        elif entry.name == RUN_RECORD:
            entry.unlink()
    with contextlib.suppress(OSError):  # still holds files lorafit did not write: they stay
        folder.rmdir()


def is_empty(folder: Path) -> bool:
    """True for a folder holding nothing (a crashed lorafit's leftover lock file or staging folder is nothing)."""
    return not any(entry.name not in (LOCK, STAGING) for entry in folder.iterdir())


# ----------------------------------------------------------------------------------------------------
# One writer per folder


@contextlib.contextmanager
def folder_lock(folder: Path, *, where: str) -> Iterator[None]:
    """Hold an exclusive lock on an output folder (created if missing) for the duration of the block.

    `fcntl.flock` is released by the kernel when the process ends in any way, so a lock left by a crash is
    stale and never blocks the next run. A second lorafit on the same folder gets a user error naming the pid
    holding it. The lock file is removed on release, and a folder this call created is removed again if it is
    still empty (a refused or failed start leaves nothing behind).
    """
    import fcntl

    created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again on release, when empty
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LorafitError("exists and is not a folder", where=where,
                           hint="choose a folder path, e.g. runs/<name>") from None
    except OSError as exc:
        raise path_error(exc, where) from None
    path = folder / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise path_error(exc, where) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LorafitError(f"another lorafit process (pid {holder}) is writing to this folder", where=where,
                               hint="wait for it to finish, or choose another output folder") from None
        # The file may have been unlinked by the previous holder between our open and our lock: lock the file the
        # path names now, or two processes could each hold a lock on a different file.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        for made in created:  # deepest first; rmdir refuses a folder that is not empty
            try:
                made.rmdir()
            except OSError:
                break


def check_not_locked(folder: Path, *, where: str) -> None:
    """Refuse now, before any work, when another lorafit holds the folder's lock (naming its pid)."""
    import fcntl

    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody writes there
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise LorafitError(f"another lorafit process (pid {holder}) is writing to this folder", where=where,
                           hint="wait for it to finish, or choose another output folder") from None
    finally:
        os.close(fd)


def is_locked(folder: Path) -> bool:
    """Whether a live lorafit process holds `folder`'s lock now (a lock file left by a crash is not held)."""
    import fcntl

    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the probe's shared lock at once
    return False


def path_error(exc: OSError, where: str) -> LorafitError:
    """A user error for an output path the filesystem refuses (a file in the way, no permission, too long, loop)."""
    reasons = {
        errno.EACCES: ("is not writable (permission denied)", "choose a folder you can write to"),
        errno.EPERM: ("is not writable (operation not permitted)", "choose a folder you can write to"),
        errno.EROFS: ("is on a read-only filesystem", "choose a writable folder"),
        errno.ENOTDIR: ("has a file where a folder should be", "remove the file or choose another path"),
        errno.EEXIST: ("exists and is not a folder", "choose a folder path"),
        errno.ENAMETOOLONG: ("has a name too long for the filesystem", "use a shorter name or path"),
        errno.ELOOP: ("contains a symbolic link loop", "fix the link or choose another path"),
        errno.ENOSPC: ("is on a full disk", "free some space or choose another disk"),
    }
    message, hint = reasons.get(exc.errno, (f"cannot be written ({exc.strerror or exc})", "choose another folder"))
    return LorafitError(message, where=where, hint=hint)


# ----------------------------------------------------------------------------------------------------
# May lorafit write this output folder? Checked before any work, by the same rules for every kind: never inside
# another output, only over an earlier output of the same kind, never over a file lorafit did not write; a run also
# never into the filesystem root, home, the current folder, or the model's or the data's folder.


def check_run_folder(recipe: Recipe, *, resume: bool, overwrite: bool, dry_run: bool) -> bool:
    """Refuse a run folder (the recipe's output.dir) that would destroy something: a finished run, files lorafit did
    not write, home, cwd, model or data folders, paths the filesystem cannot hold. Reads, never writes.

    Returns whether lorafit's own entries in the folder are to be replaced: with --overwrite, or when the folder
    holds a run that stopped before its first checkpoint (nothing in it is worth keeping, and the corrected re-run
    must not need a flag).
    """
    from lorafit import checkpoints

    where = f"output.dir: {recipe.run_dir}"
    check_output_path(recipe.run_dir, where=where)  # first: a link loop or too long a name stops resolve()
    run_dir = recipe.run_dir.resolve()
    _check_not_protected(run_dir, _run_protected_folders(recipe), what="a run", where=where,
                         hint="use a dedicated folder such as runs/<name>")
    _check_resume_or_overwrite(resume, overwrite, what="the run in output.dir", where=where)
    check_not_inside_an_output(run_dir, "run", where=where)
    if dry_run or not run_dir.is_dir():
        return False
    marker = read_marker(run_dir)
    _check_kind(marker, "run", where=where)
    _check_only_own_entries(run_dir, [*RUN_ENTRIES, MARKER], marker, "run", where=where)
    if marker is None or resume:
        return False
    if overwrite:
        return True
    if marker.status == "finished":
        raise LorafitError("this folder already holds a finished run", where=where,
                           hint="pass --overwrite to replace it, --resume to continue, or choose another output.dir")
    if checkpoints.complete_checkpoints(run_dir / CHECKPOINTS):
        raise LorafitError(f"this folder holds checkpoints of an unfinished run ({marker.status or 'stopped'})",
                           where=where, hint="pass --resume to continue it, or --overwrite to start again")
    return True


def check_sweep_folder(sweep_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a sweep folder that is not new or an earlier sweep's: a run, another output, files lorafit did not
    write. Each run folder inside it is checked with `check_run_folder`."""
    where = f"output.dir: {sweep_dir}"
    check_output_path(sweep_dir, where=where)
    check_not_inside_an_output(sweep_dir, "sweep", where=where)
    marker = read_marker(sweep_dir)
    _check_kind(marker, "sweep", where=where)
    _check_only_own_entries(sweep_dir, [SWEEP_SUMMARY, SWEEP_TABLE, MARKER], marker, "sweep", where=where)
    _check_resume_or_overwrite(resume, overwrite, what="the sweep", where=where)


def check_output_folder(out_dir: Path, kind: Kind, *, overwrite: bool, where: str, names: Iterable[str] = ()) -> None:
    """Refuse an output folder that lorafit may not write a `kind` output into (before any work is done).

    A new or empty folder is fine; a folder holding an earlier `kind` output of lorafit's is replaced only with
    `overwrite` (eval replaces its own report without asking); anything else in the way is not lorafit's and is
    refused. `names` are entries the output will write, checked against what is already there.
    """
    check_output_path(out_dir, where=where)
    check_not_inside_an_output(out_dir, kind, where=where)
    check_not_locked(out_dir, where=where)  # before the work: the lock itself is taken when the output is written
    _check_output_contents(out_dir, kind, overwrite=overwrite, where=where, names=names)


def _check_output_contents(out_dir: Path, kind: Kind, *, overwrite: bool, where: str, names: Iterable[str] = ()
                           ) -> None:
    """What is in `out_dir` now may be replaced by a `kind` output: checked before the work, and again under the
    folder's lock when the output is published (another command may have finished an output there meanwhile)."""
    if not out_dir.exists() or is_empty(out_dir):
        return
    marker = read_marker(out_dir)
    if marker is None:
        _check_only_own_entries(out_dir, [*names, MARKER], None, kind, where=where)
        if kind == "merge" and not overwrite:
            raise LorafitError("the output folder is not empty", where=where,
                               hint="choose an empty or new folder, or pass --overwrite to write beside what is "
                               "there (lorafit replaces only files of its own)")
        return
    _check_kind(marker, kind, where=where)
    if kind == "merge" and not overwrite:
        raise LorafitError("this folder holds an earlier merge", where=where,
                           hint="pass --overwrite to replace it, or choose another folder")
    _check_only_own_entries(out_dir, names, marker, kind, where=where)


def _run_protected_folders(recipe: Recipe) -> dict[Path, str]:
    """The folders a run must never be written into, each with how the refusal names it."""
    from lorafit.data_sources import local_files

    places = _protected_folders()
    model_path = Path(recipe.model.path).expanduser()
    if model_path.exists():
        places[model_path.resolve()] = "the base model folder"
    for item in local_files(recipe.data):
        places[item.resolve().parent] = "the data folder"
    return places


def _protected_folders() -> dict[Path, str]:
    """The folders no output is ever written into (callers add their inputs), each with how the refusal names it."""
    return {Path("/").resolve(): "the filesystem root", Path.home().resolve(): "your home folder",
            Path.cwd().resolve(): "the current folder"}


def _check_not_protected(resolved: Path, places: dict[Path, str], *, what: str, where: str, hint: str) -> None:
    if resolved in places:
        raise LorafitError(f"refusing to write {what} into {places[resolved]}", where=where, hint=hint)


def _check_resume_or_overwrite(resume: bool, overwrite: bool, *, what: str, where: str) -> None:
    if resume and overwrite:
        raise LorafitError(f"--resume continues {what} and --overwrite starts it again; pass one", where=where)


def _check_kind(marker: Marker | None, kind: Kind, *, where: str) -> None:
    """An output folder of lorafit's is written again only as the same kind of output."""
    if marker is None or marker.kind == kind:
        return
    if kind == "sweep" and marker.kind == "run":
        raise LorafitError("this folder holds a single run; a sweep puts its runs in folders inside its own",
                           where=where,
                           hint="give the sweep another output.dir (--set output.dir=runs/<name>-sweep) or name")
    article = "an" if kind == "eval" else "a"
    raise LorafitError(f"this folder holds a lorafit {marker.kind} output, not {article} {kind}", where=where,
                       hint=f"choose another {_folder_setting(kind)}")


def _check_only_own_entries(folder: Path, names: Iterable[str], marker: Marker | None, kind: Kind, *,
                            where: str) -> None:
    """Refuse when any of `names` is in `folder` but not lorafit's (by `marker`): lorafit would replace it."""
    taken = foreign_entries(folder, names, marker)
    if not taken:
        return
    listed = ", ".join(taken)
    if kind in ("run", "sweep"):
        raise LorafitError(f"this folder already holds {listed}, which lorafit did not write", where=where,
                           hint="choose a new or empty output.dir; lorafit never replaces files it did not create")
    if marker is None:
        raise LorafitError(f"this folder holds {listed}, which lorafit did not write", where=where,
                           hint="choose a new or empty folder; lorafit never replaces or deletes files it did not "
                           "create")
    raise LorafitError(f"this folder holds {listed}, which lorafit did not write", where=where,
                       hint="move it away or choose another folder")


def _folder_setting(kind: Kind) -> str:
    """How a hint names the output folder: the recipe's output.dir for a run or a sweep, --out's folder otherwise."""
    return "output.dir" if kind in ("run", "sweep") else "folder"


def check_output_path(path: Path, *, where: str) -> None:
    """Refuse paths the filesystem cannot hold: a file where a folder goes, too-long names, link loops."""
    try:
        resolved = path.resolve(strict=False)
    except RuntimeError:  # Python < 3.13 raises this on a loop
        raise LorafitError("contains a symbolic link loop", where=where, hint="fix the link or choose another path")
    except OSError as exc:
        raise path_error(exc, where) from None
    try:
        _check_resolved_output_path(resolved, where=where)
    except OSError as exc:  # exists() / is_dir() raise on names the filesystem refuses (too long, ...)
        raise path_error(exc, where) from None


def _check_resolved_output_path(resolved: Path, *, where: str) -> None:
    max_name = _max_name_length(resolved)
    for part in resolved.parts:
        if len(part.encode()) > max_name:
            raise LorafitError(f"the name {part[:40]!r}... is longer than the filesystem allows ({max_name} bytes)",
                               where=where, hint="use a shorter name")
    for parent in (resolved, *resolved.parents):
        if parent.exists() or parent.is_symlink():
            if parent != resolved and not parent.is_dir():
                raise LorafitError(f"{parent} is a file, not a folder", where=where,
                                   hint="remove the file or choose another path")
            if parent == resolved and not parent.is_dir():
                raise LorafitError("exists and is not a folder", where=where, hint="choose a folder path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise LorafitError(f"{parent} is not writable", where=where, hint="choose a folder you can write to")
            break


def _max_name_length(path: Path) -> int:
    for folder in path.parents:  # the deepest existing folder decides (`path` itself may be too long to stat)
        if folder.is_dir():
            with contextlib.suppress(OSError, ValueError):
                return os.pathconf(folder, "PC_NAME_MAX")
            break
    return 255


def check_not_inside_an_output(path: Path, kind: Kind, *, where: str) -> None:
    """Refuse an output inside an entry another lorafit output owns (a later --overwrite of that one would wipe it).

    A run's own `eval/` is where `lorafit eval` writes by default, and is allowed for eval.
    """
    resolved = path.expanduser().resolve()
    for parent in resolved.parents:
        marker = read_marker(parent)
        if marker is None:
            continue
        entry = resolved.relative_to(parent).parts[0]
        if kind == "eval" and marker.kind == "run" and entry == EVAL and resolved == parent / EVAL:
            return
        if marker.owns(entry):
            raise LorafitError(f"this is inside {parent / entry}, which lorafit wrote as part of a {marker.kind} "
                               f"output: a later --overwrite there would delete it", where=where,
                               hint=f"choose a folder outside {parent / entry}")


# ----------------------------------------------------------------------------------------------------
# Staged outputs (merge, eval): complete or not there at all


@contextlib.contextmanager
def staged_output(out_dir: Path, kind: Kind, *, where: str, overwrite: bool) -> Iterator[Path]:
    """A staging folder to write a complete `kind` output into; published into `out_dir` when the block succeeds.

    The caller has checked the folder (`check_output_folder`) before its work; the folder is checked again once the
    lock is held, with the same `overwrite`, so an output another command finished there meanwhile is never replaced
    without it (the check and the write happen under one lock). Holds the folder's lock throughout. On success the
    entries of an earlier output of the same kind are replaced (only those its marker lists) and the marker lists
    the new ones. On Ctrl-C / SIGTERM the staging folder is removed, the output is left as it was, and the command
    ends with exit 130; on any failure the staging folder is removed.
    """
    with folder_lock(out_dir, where=where), sigterm_as_interrupt():
        _check_output_contents(out_dir, kind, overwrite=overwrite, where=where)
        staging = out_dir / STAGING
        shutil.rmtree(staging, ignore_errors=True)  # a crashed earlier attempt's (we hold the lock)
        staging.mkdir()
        try:
            yield staging
            if kind == "eval" and out_dir.name == EVAL:
                run = read_marker(out_dir.parent)  # a run's own eval/ is the run's: its --overwrite removes it
                if run is not None and run.kind == "run":
                    write_marker(out_dir.parent, "run", files=[EVAL], status=run.status)
            _publish(staging, out_dir, kind)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; nothing was written to {out_dir}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out_dir: Path, kind: Kind) -> None:
    """Move a complete output into place. The marker lists old and new entries while they are swapped, with status
    running, so an interrupted swap never looks complete and nothing of ours is left unlisted."""
    new = sorted(p.name for p in staging.iterdir() if p.name != MARKER)
    old = read_marker(out_dir)
    taken = foreign_entries(out_dir, new, old if old is not None and old.kind == kind else None)
    if taken:
        raise LorafitError(f"this folder holds {', '.join(taken)}, which lorafit did not write and would have "
                           "replaced; nothing was written", where=str(out_dir),
                           hint="move those files away or choose another folder")
    if old is not None and old.kind == kind:
        write_marker(out_dir, kind, files=new, status="running")
        stale = [name for name in old.files if name not in new]
        remove_owned(out_dir, Marker(out_dir, kind, "", "", files=stale), keep_marker=True)
    else:
        write_marker(out_dir, kind, files=new, status="running")
    for name in new:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    fsync_path(out_dir)
    marker = read_marker(out_dir)
    marker.files = [name for name in marker.files if name in new]
    marker.status = "finished"
    marker.updated = _now()
    _save(marker)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, like Ctrl-C, so `kill` cleans up the same way (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
