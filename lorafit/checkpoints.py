"""Checkpoints a run can trust, and a training loop that stops cleanly.

`train` is the entry point: it runs `trainer.train()` so that

- every checkpoint is atomic: the Trainer writes into `checkpoints/.incomplete/checkpoint-N` (its
  output_dir); only when the save has finished is a marker written and the folder renamed to
  `checkpoints/checkpoint-N`. A crash or kill during a save never leaves a half-written checkpoint
  where resume looks;
- rotation (`training.save_total_limit`) deletes only checkpoints lorafit marked as its own; HF's own
  rotation, which deletes any `checkpoint-*` it finds, is switched off;
- Ctrl-C / SIGTERM finish the current step, save a checkpoint and stop with the resume command; a second
  signal stops at once, leaving the last complete checkpoint;
- NaN/inf losses are skipped (zero gradients) and stop the run after `training.max_nonfinite_steps` in a
  row (`GuardedSFTTrainer`, `GuardedTrainer`); no checkpoint is saved during such a streak or with non-finite weights.

Around it, `check_resume` (before any model is loaded) refuses to resume with a different recipe and
picks the newest complete checkpoint, `record_run` writes the recipe fingerprint it compares against,
`explained_failures` turns out-of-memory and disk-full into messages with the knobs to turn, and
`remove_own_checkpoints` is all that `--overwrite` deletes here.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from lorafit.errors import Interrupted, LorafitError, RunFailed
from lorafit.recipe import Recipe

if TYPE_CHECKING:
    from torch import nn

CHECKPOINTS = "checkpoints"
STAGING = ".incomplete"
MARKER = "lorafit-checkpoint.json"
RUN_RECORD = "lorafit-run.json"
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
    if recipe.task != "causal-lm":  # recorded only when not the default, so runs recorded before `task` still resume
        sections["task"] = recipe.task
    body = {"recipe": sections, "data_sha256": dict(sorted(data_sha256.items()))}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {"fingerprint": digest, **body}


def record_run(run_dir: Path, recipe: Recipe, data_sha256: dict[str, str]) -> None:
    """Write the fingerprint that a later --resume is checked against (kept when it is already there)."""
    path = run_dir / CHECKPOINTS / RUN_RECORD
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, fingerprint(recipe, data_sha256))


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
    if (run_dir / "metrics.json").exists():
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


def _step(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


def _scan(folder: Path) -> tuple[list[Path], list[str]]:
    complete, notes = [], []
    if not folder.is_dir():
        return complete, notes
    for path in sorted((p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)), key=_step):
        if _is_complete(path):
            complete.append(path)
        else:
            notes.append(f"resume: skipped {path.name}: not a complete lorafit checkpoint")
    staging = folder / STAGING
    if staging.is_dir():
        for path in sorted((p for p in staging.iterdir() if _NAME.match(p.name)), key=_step):
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


def _publish(source: Path, folder: Path) -> Path:
    """Mark a finished checkpoint complete and rename it into place (after flushing it to disk)."""
    files = {str(p.relative_to(source)): p.stat().st_size for p in sorted(source.rglob("*")) if p.is_file()}
    for name in files:
        _fsync(source / name)
    _write_json_atomic(source / MARKER, {"step": _step(source), "files": files})
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
    _fsync(folder)
    return target


def _rotate(folder: Path, keep: int | None) -> None:
    """Delete the oldest of lorafit's own complete checkpoints beyond `keep`; nothing else is ever touched."""
    if not keep:
        return
    ours = complete_checkpoints(folder)
    for path in ours[: max(len(ours) - keep, 0)]:
        shutil.rmtree(path)


def remove_own_checkpoints(run_dir: Path) -> None:
    """What --overwrite deletes from checkpoints/: lorafit's checkpoints, staging and run record, nothing else."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name == STAGING or (entry.is_dir() and (entry / MARKER).is_file()):
            shutil.rmtree(entry)
        elif entry.name == RUN_RECORD:
            entry.unlink()
    with contextlib.suppress(OSError):  # still holds files lorafit did not write: they stay
        folder.rmdir()


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    """Flush to disk so a rename after a power loss never points at empty files (best effort on odd filesystems)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------------
# Finite losses and weights


def GuardedSFTTrainer(**kwargs):  # reads like the class it builds; trl is imported lazily
    """An SFTTrainer that stops on repeated non-finite losses (see `_guarded_trainer_class`)."""
    return _guarded_trainer_class("sft")(**kwargs)


def GuardedTrainer(**kwargs):
    """A plain transformers Trainer (sequence classification) with the same guard."""
    return _guarded_trainer_class("plain")(**kwargs)


@functools.cache
def _guarded_trainer_class(kind: str):
    if kind == "sft":
        from lorafit.loss import sft_trainer_class

        base = sft_trainer_class()  # SFTTrainer, with a faster loss where TRL's fused LM head has no kernel (CPU)
    else:
        from transformers import Trainer as base

    class _Guarded(base):
        """A Trainer (SFT or plain) that refuses to keep stepping on NaN/inf losses.

        `compute_loss` is the documented extension point: a non-finite loss is replaced by a zero loss
        (zero gradients, so the weights stay finite) and after `max_nonfinite_steps` in a row the run stops,
        leaving the last good checkpoint (`_CheckpointGuard` never saves non-finite weights).
        """

        def __init__(self, *args, max_nonfinite_steps: int = 3, **kwargs):
            super().__init__(*args, **kwargs)
            self.max_nonfinite_steps = max_nonfinite_steps
            self.nonfinite_in_a_row = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if not model.training:
                return result
            loss = result[0] if return_outputs else result
            if math.isfinite(loss.detach().float().item()):
                self.nonfinite_in_a_row = 0
                return result
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise RunFailed(
                    f"loss was NaN/inf for {self.nonfinite_in_a_row} steps in a row (at step "
                    f"{self.state.global_step}); {last_saved(Path(self.args.output_dir).parent.parent)}; "
                    "no adapter was exported",
                    where="training", hint=f"lower training.learning_rate (now {self.args.learning_rate:g}) or check "
                    "the data; training.max_nonfinite_steps sets how many are tolerated",
                )
            # Not `loss * 0`: backpropagating through a NaN graph still gives NaN gradients (0 * NaN). A zero built
            # from the trainable weights alone has exact zero gradients, so this batch pushes nothing into them;
            # the detached loss is added only so the logs show the NaN/inf honestly.
            zero = sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad) + loss.detach()
            return (zero, *result[1:]) if return_outputs else zero

    return _Guarded


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters holding NaN/inf (empty when all are finite)."""
    import torch

    with torch.no_grad():
        return [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


# ----------------------------------------------------------------------------------------------------
# The guarded training loop


def train(trainer, recipe: Recipe, *, resume_from: Path | None, resume_command: str):
    """`trainer.train()` with atomic checkpoints, own-only rotation and clean Ctrl-C / SIGTERM handling."""
    folder = recipe.run_dir / CHECKPOINTS
    if trainer.args.should_save:
        shutil.rmtree(folder / STAGING, ignore_errors=True)  # an interrupted save (reported by check_resume)
    stop = _StopRequests()
    guard = _CheckpointGuard(folder, recipe.training.save_total_limit, stop,
                             in_nonfinite_streak=lambda: getattr(trainer, "nonfinite_in_a_row", 0) > 0)
    trainer.add_callback(guard)  # the documented hook: Trainer has no other place to act around a save
    try:
        with _signals_handled_by(stop):
            output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted again: stopped at once at step {trainer.state.global_step}; "
                          f"{last_saved(recipe.run_dir)}; resume with: {resume_command}") from None
    finally:
        trainer.remove_callback(guard)
    if trainer.args.should_save:
        shutil.rmtree(folder / STAGING, ignore_errors=True)  # empty but for TRL's model card once all saves finished
    if stop.count:
        step = trainer.state.global_step
        complete = complete_checkpoints(folder)
        saved = "checkpoint saved" if complete and _step(complete[-1]) == step else last_saved(recipe.run_dir)
        raise Interrupted(f"interrupted at step {step}; {saved}; resume with: {resume_command}")
    return output


class _StopRequests:
    """Signal handler state: the first SIGINT/SIGTERM asks for a clean stop, the second stops at once."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        # os.write, not print: a handler may run in the middle of another write to the same stream.
        os.write(2, f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                    "(send it again to stop at once)\n".encode())


@contextlib.contextmanager
def _signals_handled_by(handler: _StopRequests) -> Iterator[None]:
    """Install the stop handler for SIGINT and SIGTERM for the duration of training, then restore the old ones."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _CheckpointGuard(TrainerCallback):
    """Stops at a step boundary on request, saves only good weights, publishes and rotates checkpoints."""

    def __init__(self, folder: Path, keep: int | None, stop: _StopRequests, in_nonfinite_streak):
        self.folder = folder
        self.keep = keep
        self.stop = stop
        self.in_nonfinite_streak = in_nonfinite_streak

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if _on_any_rank(self.stop.count > 0, args):
            control.should_save = True
            control.should_training_stop = True
        if control.should_save and _on_any_rank(self.in_nonfinite_streak(), args):
            control.should_save = False  # the last good checkpoint is the one from before the NaN/inf losses
        if control.should_save and model is not None:
            bad = nonfinite_parameters(model)
            if bad:
                raise RunFailed(
                    f"the weights became NaN/inf by step {state.global_step} ({bad[0]}"
                    f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); not saved, "
                    f"{last_saved(self.folder.parent)}, no adapter was exported",
                    where="training", hint=f"lower training.learning_rate (now {args.learning_rate:g}) or "
                    "training.max_grad_norm, or check the data",
                )
        return control

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has written its part (rng state, shards) before the checkpoint is published
        if args.should_save:
            _publish(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.folder)
            _rotate(self.folder, self.keep)
        _barrier()


def _on_any_rank(flag: bool, args) -> bool:
    """True on every rank when it is true on one, so all ranks stop at the same step (no hang in DDP/FSDP)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=args.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# Out of memory, disk full


@contextlib.contextmanager
def explained_failures(recipe: Recipe, *, gradient_checkpointing: bool, precision: str,
                       resume_command: str) -> Iterator[None]:
    """Turn out-of-memory and disk-full errors into one message with the settings in use and what to change."""
    try:
        yield
    except LorafitError:
        raise
    except (RuntimeError, MemoryError) as exc:
        if not _is_out_of_memory(exc):
            raise
        t, d = recipe.training, recipe.data
        quant = f"{recipe.quantization.bits}-bit" if recipe.quantization else "none"
        raise RunFailed(
            f"out of memory ({_first_line(exc)}) with training.batch_size={t.batch_size}, "
            f"training.grad_accum={t.grad_accum}, data.max_length={d.max_length}, "
            f"training.gradient_checkpointing={'on' if gradient_checkpointing else 'off'}, quantization={quant}, "
            f"precision={precision}",
            where="training",
            hint="lower training.batch_size (raise grad_accum to keep the effective batch), lower data.max_length, "
                 "set training.gradient_checkpointing: true"
                 + (", or add quantization: {bits: 4}" if recipe.quantization is None else ""),
        ) from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        run_dir = recipe.run_dir
        shutil.rmtree(staging_dir(run_dir), ignore_errors=True)  # a partial save of ours; give its space back
        free = _free_space(run_dir)
        raise RunFailed(
            f"disk full while writing {getattr(exc, 'filename', None) or 'the run folder'} ({free} free); "
            f"{last_saved(run_dir)}",
            where=f"output.dir: {run_dir}",
            hint=f"free some space, lower training.save_total_limit (now {recipe.training.save_total_limit}) or "
                 f"set output.dir on a bigger disk, then resume with: {resume_command}",
        ) from None


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    text = str(exc).lower()
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
            or "can't allocate memory" in text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:160]


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.exists():
            free = shutil.disk_usage(folder).free
            return f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.0f} MiB"
    return "unknown"
