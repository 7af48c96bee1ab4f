"""The trainers lorafit builds and the training loop that runs them (`fit`).

- `SFTTrainer` (causal LM), `ClassifierTrainer` (sequence classification), `DPOTrainer` and `KTOTrainer`
  (preference tuning), `GRPOTrainer` and `RLOOTrainer` (online RL) (reference model = the adapter switched off:
  `AdapterReference`; task orpo's trainer, which
  has no reference, is in lorafit/orpo_trainer.py, apart because TRL keeps it under `trl.experimental`) are TRL's
  and transformers' trainers with behaviours added at `compute_loss`, the documented extension point: `NonFiniteGuard`
  skips NaN/inf losses and stops after `training.max_nonfinite_steps` in a row; `TrainedPositionsLoss`
  (lorafit/loss.py) projects only trained positions through the LM head where TRL's fused head has no kernel;
  `AdaLoraTraining` (lorafit/adalora.py) runs AdaLoRA's rank budget schedule and regulariser.
- `fit` runs `trainer.train()` so that checkpoints are published atomically and rotated among lorafit's own
  (lorafit/checkpoints.py does both), Ctrl-C / SIGTERM finish the step, save and stop with the resume command
  (a second signal stops at once), and no checkpoint is saved during a NaN/inf streak or with non-finite weights.
- `ThroughputMeter` records time to the first step and tokens/s after it (metrics.json); `EvaluateAtEnd`
  evaluates once at the last step, inside training, so the eval loss reaches every tracker.
- `explained_failures` turns out-of-memory and disk-full into messages with the knobs to turn.

This module imports transformers and TRL at the top: import it inside the function that trains, so
`lorafit --help` stays instant.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import transformers
import trl

from lorafit import adalora, checkpoints
from lorafit.adalora import AdaLoraTraining
from lorafit.distributed import TrainableOnlyCheckpoints
from lorafit.errors import Interrupted, LorafitError, RunFailed, first_line
from lorafit.loss import TrainedPositionsLoss
from lorafit.recipe import Recipe

if TYPE_CHECKING:
    from torch import nn


class NonFiniteGuard:
    """Trainer mixin that refuses to keep stepping on NaN/inf losses.

    A non-finite loss is replaced by a zero loss (zero gradients, so the weights stay finite); after
    `max_nonfinite_steps` in a row the run stops, leaving the last good checkpoint (`fit` never saves while
    `nonfinite_in_a_row` is above zero, nor non-finite weights). Under FSDP the whole optimizer step's gradients
    are zeroed instead, on every rank (`nonfinite_fallback`).
    """

    def __init__(self, *args, max_nonfinite_steps: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_in_a_row = 0
        self.nonfinite_step = False  # a NaN/inf loss was backpropagated in this optimizer step (FSDP)
        self.add_callback(_DropNonFiniteStep(self))

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
                f"{self.state.global_step}); {checkpoints.last_saved(Path(self.args.output_dir).parent.parent)}; "
                "no adapter was exported",
                where="training", hint=f"lower training.learning_rate (now {self.args.learning_rate:g}) or check "
                "the data; training.max_nonfinite_steps sets how many are tolerated",
            )
        if self.is_fsdp_enabled:
            self.nonfinite_step = True
        fallback = nonfinite_fallback(model, loss, sharded=self.is_fsdp_enabled)
        return (fallback, *result[1:]) if return_outputs else fallback


def nonfinite_fallback(model: nn.Module, loss, *, sharded: bool):
    """The loss to backpropagate in place of a NaN/inf `loss`.

    Unsharded: not `loss * 0`, since backpropagating through a NaN graph still gives NaN gradients (0 * NaN). A zero
    built from the trainable weights alone has exact zero gradients, so this batch pushes nothing into them; the
    detached loss is added only so the logs show the NaN/inf honestly.
    Sharded (FSDP): `loss` itself. FSDP2 reduce-scatters each layer's gradients from hooks on the forward graph, and
    its parameters outside forward are DTensor shards: a loss built from them leaves this rank out of the
    collectives the other ranks wait in, and every rank hangs (reproduced with 2 CPU processes,
    tests/test_gpu_paths.py). The NaN gradients of the step are zeroed on every rank before the optimizer step
    instead (`_DropNonFiniteStep`), the way fp16 loss scaling drops an overflowed step.
    """
    if sharded:
        return loss
    return sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad) + loss.detach()


def drop_gradients_on_every_rank(model: nn.Module, dropped: bool, args) -> bool:
    """Zero every gradient of `model` on all ranks when `dropped` is true on any of them; says whether it did.

    Every rank must call it (one all-reduce)."""
    if not on_any_rank(dropped, args):
        return False
    for parameter in model.parameters():
        if parameter.grad is not None:
            parameter.grad.zero_()
    return True


class _DropNonFiniteStep(transformers.TrainerCallback):
    """NonFiniteGuard's FSDP half: before each optimizer step, the gradients are zeroed on every rank when any rank
    backpropagated a NaN/inf loss during the step (after clipping, which NaN gradients turn into NaN too)."""

    def __init__(self, guard: NonFiniteGuard):
        self.guard = guard

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.guard.is_fsdp_enabled:
            return
        dropped, self.guard.nonfinite_step = self.guard.nonfinite_step, False
        drop_gradients_on_every_rank(model, dropped, args)


class SFTTrainer(NonFiniteGuard, TrainableOnlyCheckpoints, AdaLoraTraining, TrainedPositionsLoss, trl.SFTTrainer):
    """TRL's SFTTrainer with the NaN/inf guard, AdaLoRA's schedule and, off CUDA, the trained-positions loss."""


class ClassifierTrainer(NonFiniteGuard, TrainableOnlyCheckpoints, AdaLoraTraining, transformers.Trainer):
    """The transformers Trainer (sequence classification) with the NaN/inf guard and AdaLoRA's schedule."""

    # Its loss is the model's own (from `labels`), to which AdaLoraModel.forward adds the regulariser.
    model_adds_orthogonal_regularisation = True


class AdapterReference:
    """Preference-trainer mixin: the reference model is the trained PEFT model itself, never a second copy.

    Given a PEFT model, TRL's DPO/KTO trainers copy its adapter into a frozen "ref" adapter and score the reference
    with it. `reference: init-adapter` keeps that copy (the adapter the run started from, e.g. the SFT adapter);
    `adapter-disabled` deletes it (PEFT's delete_adapter), and TRL then scores the reference with the adapter
    switched off: the base model, in the same weights.
    """

    def __init__(self, *args, reference: str = "adapter-disabled", **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference
        if reference == "adapter-disabled" and "ref" in self.model.peft_config:
            self.model.delete_adapter("ref")


class DPOTrainer(NonFiniteGuard, TrainableOnlyCheckpoints, AdapterReference, trl.DPOTrainer):
    """TRL's DPOTrainer with the NaN/inf guard, its reference the adapter switched off (or its frozen start)."""

    def _set_signature_columns_if_needed(self):
        # The Trainer drops every column the model does not take before it builds the sampler, and with it the
        # `length` column (lorafit/preference_data.py) that data.group_by_length sorts pairs by; TRL's rows have
        # no input_ids to measure instead. The collator reads only the columns it knows, so `length` can stay.
        super()._set_signature_columns_if_needed()
        if "length" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "length"]


class KTOTrainer(NonFiniteGuard, TrainableOnlyCheckpoints, AdapterReference, trl.KTOTrainer):
    """TRL's KTOTrainer with the NaN/inf guard, its reference the adapter switched off (or its frozen start)."""


class GRPOTrainer(NonFiniteGuard, TrainableOnlyCheckpoints, AdapterReference, trl.GRPOTrainer):
    """TRL's GRPOTrainer (online RL from rewards) with the NaN/inf guard; with a KL term its reference is the adapter
    switched off (or its frozen start). TRL adds the "ref" copy only when rl.beta > 0."""


class RLOOTrainer(NonFiniteGuard, TrainableOnlyCheckpoints, AdapterReference, trl.RLOOTrainer):
    """TRL's RLOOTrainer (leave-one-out baseline) with the NaN/inf guard and the same reference rule as GRPO."""


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters holding NaN/inf (empty when all are finite).

    A sharded parameter (FSDP2 DTensor) is checked on this rank's shard: combine the answer across ranks with
    `on_any_rank`, so every rank stops together.
    """
    import torch

    with torch.no_grad():
        return [name for name, p in model.named_parameters()
                if p.requires_grad and not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]


# ----------------------------------------------------------------------------------------------------
# The training loop


def fit(trainer: transformers.Trainer, recipe: Recipe, *, resume_from: Path | None, resume_command: str):
    """`trainer.train()` with atomic checkpoints, own-only rotation and clean Ctrl-C / SIGTERM handling."""
    staging = checkpoints.staging_dir(recipe.run_dir)
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted save (reported by check_resume)
    if resume_from is not None:
        finished = _completed_training(trainer, resume_from)
        if finished is not None:
            return finished
    stop = _StopRequests()
    guard = _CheckpointGuard(staging.parent, recipe.training.save_total_limit, stop,
                             in_nonfinite_streak=lambda: getattr(trainer, "nonfinite_in_a_row", 0) > 0)
    trainer.add_callback(guard)  # the documented hook: Trainer has no other place to act around a save
    try:
        with _signals_handled_by(stop):
            output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted again: stopped at once at step {trainer.state.global_step}; "
                          f"{checkpoints.last_saved(recipe.run_dir)}; resume with: {resume_command}") from None
    finally:
        trainer.remove_callback(guard)
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # empty but for TRL's model card once all saves finished
    if stop.count:
        step = trainer.state.global_step
        complete = checkpoints.complete_checkpoints(staging.parent)
        saved = ("checkpoint saved" if complete and checkpoints.checkpoint_step(complete[-1]) == step
                 else checkpoints.last_saved(recipe.run_dir))
        raise Interrupted(f"interrupted at step {step}; {saved}; resume with: {resume_command}")
    return output


def _completed_training(trainer: transformers.Trainer, checkpoint: Path):
    """The training result read back from `checkpoint` when it already holds every planned step, else None.

    A run killed after its last step (during the final save's aftermath, the export) resumes from the checkpoint of
    that last step. HF's Trainer would still enter its loop and run one more step (global_step 61 of 60) unless the
    step count happens to fill whole epochs; so instead the checkpoint's weights and state are loaded as they are,
    and only what is missing (the export) runs. Its log history already holds the final evaluation: the Trainer
    evaluates before it saves.
    """
    state = transformers.TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    args = trainer.args
    planned = args.max_steps if args.max_steps > 0 else \
        trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1]
    if state.global_step < planned:
        return None
    model = trainer.model
    # As the Trainer itself loads a PEFT checkpoint on resume: into the active adapter, kept trainable.
    model.load_adapter(str(checkpoint), adapter_name=model.active_adapter, is_trainable=True)
    if adalora.is_adalora(model):  # the final rank pattern, which the exported adapter is cut to
        adalora.restore_state(model, checkpoint)
    trainer.state = state
    return transformers.trainer_utils.TrainOutput(state.global_step, None, {})


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


class _CheckpointGuard(transformers.TrainerCallback):
    """Stops at a step boundary on request, saves only good weights, publishes and rotates checkpoints."""

    def __init__(self, folder: Path, keep: int | None, stop: _StopRequests, in_nonfinite_streak):
        self.folder = folder
        self.keep = keep
        self.stop = stop
        self.in_nonfinite_streak = in_nonfinite_streak

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if on_any_rank(self.stop.count > 0, args):
            control.should_save = True
            control.should_training_stop = True
        if control.should_save and on_any_rank(self.in_nonfinite_streak(), args):
            control.should_save = False  # the last good checkpoint is the one from before the NaN/inf losses
        if control.should_save and model is not None:
            bad = nonfinite_parameters(model)
            if on_any_rank(bool(bad), args):
                raise RunFailed(
                    f"the weights became NaN/inf by step {state.global_step} ({bad[0] if bad else 'on another rank'}"
                    f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); not saved, "
                    f"{checkpoints.last_saved(self.folder.parent)}, no adapter was exported",
                    where="training", hint=f"lower training.learning_rate (now {args.learning_rate:g}) or "
                    "training.max_grad_norm, or check the data",
                )
        return control

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has written its part (rng state, shards) before the checkpoint is published
        if args.should_save:
            checkpoints.publish(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.folder)
            checkpoints.rotate(self.folder, self.keep)
        _barrier()


def on_any_rank(flag: bool, args) -> bool:
    """True on every rank when it is true on one, so all ranks stop at the same step (no hang in DDP/FSDP).

    Every rank must call it (one all-reduce).
    """
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
# Callbacks the run adds: the speed it records, the evaluation at the last step


class ThroughputMeter(transformers.TrainerCallback):
    """Time to the first optimizer step, counted from process start, and tokens/s after it (warm-up excluded).

    Both go into metrics.json; scripts/bench.py compares them with TRL and a hand-written loop.
    """

    def __init__(self):
        self.first_step_seconds: float | None = None
        self._first: tuple[float, int] | None = None  # (perf_counter, tokens seen) at the end of the first step
        self._last: tuple[float, int] | None = None

    def on_step_end(self, args, state, control, **kwargs):
        now = (time.perf_counter(), state.num_input_tokens_seen or 0)
        if self._first is None:
            self._first = now
            started = _process_start_time()
            self.first_step_seconds = time.time() - started if started is not None else None
        self._last = now

    @property
    def tokens_per_second_after_first_step(self) -> float | None:
        if self._first is None or self._last is None or self._last[0] <= self._first[0]:
            return None
        return (self._last[1] - self._first[1]) / (self._last[0] - self._first[0])


def _process_start_time() -> float | None:
    """Wall-clock time this process started (psutil ships with accelerate), or None when unknown."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a missing or failing psutil only costs this one metric
        return None


class EvaluateAtEnd(transformers.TrainerCallback):
    """Evaluate once at the last step, inside training, so the eval loss reaches the progress display and every
    tracker (HF closes tensorboard writers at train end; an evaluate() afterwards would log nowhere)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control


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
            f"out of memory ({first_line(exc)}) with training.batch_size={t.batch_size}, "
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
        shutil.rmtree(checkpoints.staging_dir(run_dir), ignore_errors=True)  # a partial save of ours; give it back
        free = _free_space(run_dir)
        raise RunFailed(
            f"disk full while writing {getattr(exc, 'filename', None) or 'the run folder'} ({free} free); "
            f"{checkpoints.last_saved(run_dir)}",
            where=f"output.dir: {run_dir}",
            hint=f"free some space, lower training.save_total_limit (now {recipe.training.save_total_limit}) or "
                 f"set output.dir on a bigger disk, then resume with: {resume_command}",
        ) from None


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    text = str(exc).lower()
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
            or "can't allocate memory" in text)


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.exists():
            free = shutil.disk_usage(folder).free
            return f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.0f} MiB"
    return "unknown"
