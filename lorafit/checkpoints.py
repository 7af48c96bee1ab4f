"""Checkpoints a run can trust: atomic publish, own-only rotation, and the resume check.

- Every checkpoint is atomic: the Trainer writes into `checkpoints/.incomplete/checkpoint-N` (its
  output_dir, `staging_dir`); only when the save has finished does `publish` write a marker and rename the
  folder to `checkpoints/checkpoint-N`. A crash or kill during a save never leaves a half-written checkpoint
  where resume looks.
- `rotate` (`training.save_total_limit`) deletes only checkpoints lorafit marked as its own; HF's own
  rotation, which deletes any `checkpoint-*` it finds, is switched off.
- `check_resume` (before any model is loaded) refuses to resume with a different recipe and picks the newest
  complete checkpoint; `record_run` writes the recipe fingerprint it compares against.
- The names of the folders and markers, and what `--overwrite` may delete, are spelled in `run_folder`.

The training loop that calls `publish` and `rotate` after each save is `lorafit.training_loop.fit`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lorafit import tasks
from lorafit.errors import LorafitError, RunFailed
from lorafit.recipe import Recipe
from lorafit.run_folder import CHECKPOINT_MARKER as MARKER
from lorafit.run_folder import CHECKPOINT_STAGING as STAGING
from lorafit.run_folder import CHECKPOINTS, RUN_RECORD, fsync_path, read_marker, write_json_atomic
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Recipe sections that decide what a checkpoint's weights mean; training.* (max_steps, save_steps...) may change.
_FINGERPRINTED = ("model", "quantization", "adapter", "data", "template")
# Loading permissions change nothing about what is trained.
_NOT_COMPARED = ("model.trust_remote_code", "model.allow_pickle_weights")


def staging_dir(run_dir: Path) -> Path:
    """The Trainer's output_dir: checkpoints are written here and renamed into place once complete."""
    return run_dir / CHECKPOINTS / STAGING


# ----------------------------------------------------------------------------------------------------
# The recipe fingerprint and resume


def fingerprint(recipe: Recipe, data_sha256: dict[str, str]) -> dict[str, Any]:
    """What a checkpoint was trained from: the weight-defining recipe sections and the data files' sha256."""
    sections = {name: (None if getattr(recipe, name) is None else getattr(recipe, name).model_dump(mode="json"))
                for name in _FINGERPRINTED}
    if tasks.checkpoint_task(recipe) is not None:
        sections["task"] = recipe.task
    if recipe.preference is not None:  # beta, loss and reference define the weights too (preference tasks only)
        sections["preference"] = recipe.preference.model_dump(mode="json")
    body = {"recipe": sections, "data_sha256": dict(sorted(data_sha256.items()))}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {"fingerprint": digest, **body}


def record_run(run_dir: Path, recipe: Recipe, data_sha256: dict[str, str]) -> None:
    """Write the fingerprint that a later --resume is checked against (kept when it is already there)."""
    path = run_dir / CHECKPOINTS / RUN_RECORD
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, fingerprint(recipe, data_sha256))


def check_resume(recipe: Recipe, data_sha256: dict[str, str]) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None: start at step 0) and notes on what was skipped.

    Refuses when the run folder was trained from different model/adapter/data/template settings.
    """
    run_dir = recipe.run_dir
    folder = run_dir / CHECKPOINTS
    notes: list[str] = []
    record = folder / RUN_RECORD
    if record.is_file():
        try:
            saved = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LorafitError(f"unreadable run record ({exc})", where=str(record),
                               hint="start again with --overwrite") from None
        current = fingerprint(recipe, data_sha256)
        if saved.get("fingerprint") != current["fingerprint"]:
            changes = _differences(saved, current)
            if changes:
                raise LorafitError(
                    "refusing to resume: the checkpoints were trained with a different recipe: " + "; ".join(changes),
                    where=f"--resume {run_dir}",
                    hint="resume with the original recipe (training.* settings may change), or start again with "
                         "--overwrite or another output.dir",
                )
    elif folder.is_dir():
        notes.append("resume: this run folder records no recipe fingerprint, so lorafit cannot check that the "
                     "recipe matches the checkpoints")
    complete, skipped = _scan(folder)
    notes.extend(skipped)
    if complete:
        return complete[-1], notes
    marker = read_marker(run_dir)
    if marker is not None and marker.status == "finished":
        raise LorafitError("nothing to resume: this finished run has no complete checkpoint",
                           where=f"--resume {run_dir}", hint="pass --overwrite to train again")
    notes.append("resume: no complete checkpoint found, starting from step 0")
    return None, notes


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    old, new = _flatten(saved.get("recipe", {})), _flatten(current["recipe"])
    # A key the record lacks and the recipe leaves at None is a field added to lorafit since (e.g. data.labels),
    # not a change: it must not block resuming a run recorded by an older version.
    changes = [f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
               for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key) and key not in _NOT_COMPARED and (key in old or new[key] is not None)]
    old_data, new_data = saved.get("data_sha256", {}), current["data_sha256"]
    for path in sorted(set(old_data) | set(new_data)):
        if path not in new_data:
            changes.append(f"data file {path}: no longer used")
        elif path not in old_data:
            changes.append(f"data file {path}: not used by the checkpoints")
        elif old_data[path] != new_data[path]:
            changes.append(f"data file {path}: contents changed (sha256 {old_data[path][:12]}... -> "
                           f"{new_data[path][:12]}...)")
    return changes


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


# ----------------------------------------------------------------------------------------------------
# Complete checkpoints: published by rename, recognised by their marker


def complete_checkpoints(folder: Path) -> list[Path]:
    """lorafit's complete checkpoints in `folder`, oldest step first."""
    return _scan(folder)[0]


def last_saved(run_dir: Path) -> str:
    """A phrase about the newest complete checkpoint, for messages after a failure."""
    complete = complete_checkpoints(run_dir / CHECKPOINTS)
    if not complete:
        return "no checkpoint had been saved yet"
    return f"the last complete checkpoint ({complete[-1]}) is kept"


def checkpoint_step(path: Path) -> int:
    """The step in a `checkpoint-N` folder's name (-1 for any other name)."""
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


def _scan(folder: Path) -> tuple[list[Path], list[str]]:
    complete, notes = [], []
    if not folder.is_dir():
        return complete, notes
    for path in sorted((p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)), key=checkpoint_step):
        if _is_complete(path):
            complete.append(path)
        else:
            notes.append(f"resume: skipped {path.name}: not a complete lorafit checkpoint")
    staging = folder / STAGING
    if staging.is_dir():
        for path in sorted((p for p in staging.iterdir() if _NAME.match(p.name)), key=checkpoint_step):
            notes.append(f"resume: skipped the incomplete {path.name} (its save did not finish); it is removed")
    return complete, notes


def _is_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        if "trainer_state.json" not in files or not any(name.endswith(".safetensors") for name in files):
            return False
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def publish(source: Path, folder: Path) -> Path:
    """Mark a finished checkpoint complete and rename it into place (after flushing it to disk)."""
    files = {str(p.relative_to(source)): p.stat().st_size for p in sorted(source.rglob("*")) if p.is_file()}
    for name in files:
        fsync_path(source / name)
    write_json_atomic(source / MARKER, {"step": checkpoint_step(source), "files": files})
    target = folder / source.name
    if target.exists():
        if not (target / MARKER).exists():
            raise RunFailed(f"{target} exists and was not written by lorafit", where=str(target),
                            hint="move it out of the checkpoints folder, then resume with --resume")
        old = source.parent / f"{source.name}.replaced"  # a resumed run re-saving a step it had saved before
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)
    fsync_path(folder)
    return target


def rotate(folder: Path, keep: int | None) -> None:
    """Delete the oldest of lorafit's own complete checkpoints beyond `keep`; nothing else is ever touched."""
    if not keep:
        return
    ours = complete_checkpoints(folder)
    for path in ours[: max(len(ours) - keep, 0)]:
        shutil.rmtree(path)
