"""`lorafit train`: recipe -> base model -> adapter -> the task's rows -> the task's trainer -> run folder.

Read `run_train` top to bottom: `_prepare` (precision, tokenizer, data, model with its adapter: all that
`--dry-run` checks and shows), then `_fit_and_export` (the trainer, the training loop in lorafit/training_loop.py, the
run folder); each step in them is one call into the module that owns it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit import distributed, models, run_folder, tasks
from lorafit.errors import Interrupted, LorafitError, RunFailed
from lorafit.tasks.base import last_logged
from lorafit.recipe import Recipe, TrainingSection, dump_recipe

if TYPE_CHECKING:
    from peft import PeftModel
    from rich.console import Console
    from transformers import PreTrainedTokenizerBase

    from lorafit.data import DataReport, PreparedData
    from lorafit.distributed import Layout
    from lorafit.models import Precision

@dataclass
class TrainMetrics:
    """What a finished run measured: `as_json()` is metrics.json; the CLI and the model card read the attributes."""

    name: str
    base_model: str
    global_step: int
    train_loss_final: float | None
    train_loss_mean: float | None
    eval_loss: float | None
    loss_history: list[dict[str, float]]  # one entry per logged step: step, loss / eval_loss, learning_rate...
    tokens_seen: int
    tokens_per_second: float | None
    tokens_per_second_after_first_step: float | None
    first_step_seconds: float | None  # from process start: imports, data, model, step 1
    train_seconds: float
    wall_seconds: float
    peak_memory_mb: float
    precision: str
    device: str
    device_kind: str  # the GPU model, or "cpu: <model name>" (lorafit.distributed.device_kind)
    distributed: dict[str, Any]  # strategy as run, world_size, per_device_batch, grad_accum, global_batch
    seed: int
    trainable_params: int
    total_params: int
    target_modules: list[str]
    train_examples: int
    eval_examples: int
    supervised_token_share: float | None  # None for a classifier: it learns one label per row, not tokens
    data_fingerprint: dict[str, str]  # data file -> sha256
    data_sources: list[dict[str, Any]]  # per data.train entry: weight, and the rows and tokens it contributed
    data_cache: dict[str, Any]  # state (built | from cache | off | streamed), path, prepare_seconds
    recipe_git_commit: str | None
    versions: dict[str, str | None]
    hardware: dict[str, Any]
    # Sequence classification only (absent from a causal LM's metrics.json):
    labels: list[str] | None = None
    label_counts: dict[str, int] | None = None
    eval_accuracy: float | None = None
    eval_f1: float | None = None
    # preference tasks only: the last logged train and eval rewards, under TRL's names (the task's logged_metrics
    # and their eval_ twins: lorafit/tasks/preference.py)
    preference: dict[str, float | None] | None = None
    # task grpo / rloo only: the last logged rewards (mean, std, each reward's mean), completion lengths, clipped
    # share, KL and entropy, under TRL's names (lorafit/tasks/grpo.py)
    rl: dict[str, float | None] | None = None
    # adapter.method adalora only: each adapted module's rank after pruning (the adapter's rank pattern)
    adapter_ranks: dict[str, int] | None = None

    def as_json(self) -> dict[str, Any]:
        """metrics.json's content: every field, the classification / preference / RL / AdaLoRA ones only for those."""
        values = asdict(self)
        if self.labels is None:
            for key in ("labels", "label_counts", "eval_accuracy", "eval_f1"):
                del values[key]
        if self.preference is None:
            del values["preference"]
        if self.rl is None:
            del values["rl"]
        if self.adapter_ranks is None:
            del values["adapter_ranks"]
        return values


@dataclass
class TrainResult:
    """What a train (or dry) run produced."""

    run_dir: Path
    precision: Precision
    report: DataReport
    trainable_params: int
    total_params: int
    target_modules: list[str]
    dry_run: bool
    metrics: TrainMetrics | None = None  # None for a dry run
    notes: list[str] = field(default_factory=list)
    recipe: Recipe | None = None  # as resolved for the run (sequence-classification: data.labels filled in)


def run_train(recipe: Recipe, console: Console, *, dry_run: bool = False, resume: bool = False,
              overwrite: bool = False, quiet: bool = False, allow_code: bool = False,
              resume_command: str = "lorafit train <recipe.yaml> --resume") -> TrainResult:
    """Train the recipe's adapter and write the run folder (or, with dry_run, only check and describe it).

    `resume_command` is the exact command line shown when the run is interrupted; `allow_code` is --allow-code,
    the user's consent to run Python the recipe names (custom rewards). The run folder is locked for the
    whole run (one writer per folder) and its marker's status follows the run: running, then finished,
    interrupted or failed.
    """
    check_settings(recipe)
    replace = run_folder.check_run_folder(recipe, resume=resume, overwrite=overwrite, dry_run=dry_run)
    if dry_run or not distributed.is_main_process():
        return _train(recipe, console, dry_run=dry_run, resume=resume, replace=replace, quiet=quiet,
                      allow_code=allow_code, resume_command=resume_command)
    run_dir = recipe.run_dir
    with run_folder.folder_lock(run_dir, where=f"output.dir: {run_dir}"):
        # Again under the lock: another lorafit may have written here between the first check and the lock.
        replace = run_folder.check_run_folder(recipe, resume=resume, overwrite=overwrite, dry_run=dry_run)
        started_at = _marker_updated(run_dir)
        try:
            return _train(recipe, console, dry_run=dry_run, resume=resume, replace=replace, quiet=quiet,
                          allow_code=allow_code, resume_command=resume_command)
        except BaseException as exc:
            if _marker_updated(run_dir) != started_at:  # this process marked the folder running: say how it ended
                stopped = isinstance(exc, (Interrupted, KeyboardInterrupt))
                run_folder.update_marker(run_dir, status="interrupted" if stopped else "failed")
            raise


def check_settings(recipe: Recipe) -> None:
    """Refuse names the schema accepts but the libraries (or this machine) would reject once training starts:
    the scheduler and optimizer names transformers knows, trackers that are installed, an attention kernel whose
    package is there. Run by `validate` and `train` (also --dry-run) before any model loads."""
    import importlib.util

    t = recipe.training
    # The defaults need no check; other names are looked up in transformers (importing it takes a moment).
    if t.scheduler != TrainingSection.model_fields["scheduler"].default:
        from transformers.trainer_utils import SchedulerType

        names = [s.value for s in SchedulerType]
        if t.scheduler not in names:
            raise LorafitError(f"unknown scheduler {t.scheduler!r}", where="training.scheduler",
                               hint=f"transformers has: {', '.join(names)}")
    if t.optimizer != TrainingSection.model_fields["optimizer"].default:
        from transformers.training_args import OptimizerNames

        names = [o.value for o in OptimizerNames]
        if t.optimizer not in names:
            raise LorafitError(f"unknown optimizer {t.optimizer!r}", where="training.optimizer",
                               hint=f"transformers has: {', '.join(names)}")
    wanted = recipe.output.report_to if isinstance(recipe.output.report_to, list) else []
    for name in [w for w in wanted if w not in ("none", "all")]:
        if name == "tensorboard":
            if importlib.util.find_spec("tensorboard") is None:
                raise LorafitError("tensorboard is not installed", where="output.report_to",
                                   hint="pip install tensorboard, or set report_to: [none]")
            continue
        from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                                 get_available_reporting_integrations)

        if name not in INTEGRATION_TO_CALLBACK:
            raise LorafitError(f"unknown tracker {name!r}", where="output.report_to",
                               hint=f"transformers knows: {', '.join(INTEGRATION_TO_CALLBACK)}, or none")
        if name not in get_available_reporting_integrations():
            raise LorafitError(f"the tracker {name!r} is not installed", where="output.report_to",
                               hint=f"pip install {name.replace('_', '-')}, or remove it from report_to")
    if recipe.model.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise LorafitError("flash_attention_2 needs the flash-attn package, which is not installed",
                               where="model.attn_implementation",
                               hint="pip install flash-attn (CUDA GPUs only), or use sdpa / auto")


def check_plan(recipe: Recipe, *, allow_code: bool = False, seen: dict[str, Any] | None = None) -> None:
    """Everything a dry run checks that needs no weights: the settings, the model source and tokenizer, the data
    read, rendered and linted with the template as training will, and the adapter's target modules against the
    model's config on the meta device. `lorafit train --sweep` runs it for every grid point before the first one
    trains; `seen` remembers the data prepared for earlier points (the same data is checked once)."""
    import json

    from lorafit import inspect_modules

    check_settings(recipe)
    source = models.resolve_model_source(recipe.model)
    parts = ("model", "data", "template", "task", "rewards", "generation")
    key = json.dumps([recipe.model_dump(mode="json", include=set(parts)), recipe.training.seed], sort_keys=True)
    if seen is None or key not in seen:
        tokenizer = models.load_tokenizer(recipe, source)
        prepared = tasks.task_of(recipe).prepare_data(recipe, tokenizer, allow_code=allow_code)
        if seen is not None:
            seen[key] = prepared.labels
    labels = seen[key] if seen is not None else prepared.labels
    inspect_modules.check_adapter(recipe, source, labels)


def _marker_updated(run_dir: Path) -> str | None:
    marker = run_folder.read_marker(run_dir)
    return None if marker is None else f"{marker.updated}/{marker.status}"


def _train(recipe: Recipe, console: Console, *, dry_run: bool, resume: bool, replace: bool, quiet: bool,
           allow_code: bool, resume_command: str) -> TrainResult:
    """`_prepare` (all that a dry run checks and shows), then, unless it is a dry run, `_fit_and_export`."""
    started = time.perf_counter()
    run = _prepare(recipe, resume=resume, dry_run=dry_run, allow_code=allow_code)
    if not dry_run:
        _fit_and_export(run, console, replace=replace, quiet=quiet, resume_command=resume_command, started=started)
    return run.result


@dataclass
class _PreparedRun:
    """What `_prepare` built and `_fit_and_export` trains: the model with its adapter, its tokenizer and data."""

    result: TrainResult  # what a dry run returns
    source: str  # where the base model is loaded from
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    model: PeftModel
    gradient_checkpointing: bool
    checkpoint: Path | None  # --resume: the checkpoint training continues from
    args: Any  # the HF TrainingArguments (None for a dry run)
    layout: Layout  # how the launcher spread the run over processes


def _prepare(recipe: Recipe, *, resume: bool, dry_run: bool, allow_code: bool = False) -> _PreparedRun:
    """Everything a dry run checks and shows: precision, tokenizer, data, the resume check, the wrapped model."""
    from lorafit import adapter_init, adapters, checkpoints

    notes: list[str] = []
    # 1. Everything that can be checked without loading weights.
    precision, precision_warning = models.choose_precision(recipe.training.precision)
    notes.append(f"precision {precision.name} on {precision.device} ({precision.reason})")
    if precision_warning:
        notes.append(f"warning: {precision_warning}")
    source = models.resolve_model_source(recipe.model)
    tokenizer = models.load_tokenizer(recipe, source)

    # 2. The data, rendered and linted with the template, before spending compute.
    task = tasks.task_of(recipe)
    prepared = task.prepare_data(recipe, tokenizer, allow_code=allow_code)
    if prepared.labels is not None:  # the class ids, recorded in the run's recipe.yaml for eval and merge
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"labels": prepared.labels})})
    notes.append(f"data: {prepared.report.summary()}")
    notes.extend(f"data: {warning}" for warning in prepared.report.warnings())
    stop_ids = models.generation_stop_ids(recipe, source) if task.generates else set()
    if stop_ids and tokenizer.eos_token_id not in stop_ids:
        notes.append(f"warning: the model's generation_config stops on token ids {sorted(stop_ids)}, not on the "
                     f"trained end-of-turn {tokenizer.eos_token!r} ({tokenizer.eos_token_id}); pass "
                     "eos_token_id=tokenizer.eos_token_id when generating with the adapter (lorafit merge and eval do)")
    checkpoint = None
    if resume and not dry_run:  # a resume with another model/adapter/data is refused before any weights load
        checkpoint, resume_notes = checkpoints.check_resume(recipe, prepared.report.fingerprint)
        notes.extend(resume_notes)

    # 3. The training arguments, which set up the process group under torchrun / accelerate launch, then the model,
    # wrapped with the adapter: the layout decides how it loads and is wrapped, and under ZeRO-3 transformers
    # partitions the weights as they load only when the arguments already exist (lorafit/distributed.py).
    gradient_checkpointing = adapters.gradient_checkpointing_on(recipe, on_gpu=precision.device == "cuda",
                                                                quantized=recipe.quantization is not None)
    args, layout = None, distributed.Layout("none", 1)
    if not dry_run:
        args = _training_arguments(recipe, prepared, precision)
        layout = distributed.read_layout(args)
        if layout.strategy != "none":
            notes.append(f"distributed: {layout.strategy} over {layout.world_size} processes")
    total_steps = _adalora_steps(recipe, prepared, layout, notes) if recipe.adapter.method == "adalora" else None
    # The adapter's random init (LoRA A) and a new classifier head (sequence classification, created as the model
    # loads) must follow the recipe's seed too, not only the data order: the Trainer seeds only when it is built.
    from transformers import set_seed

    set_seed(recipe.training.seed)
    base = models.load_base_model(recipe, source, precision, pad_token_id=tokenizer.pad_token_id,
                                  sharded=layout.shards_weights, zero3=layout.zero3)
    # adapter.init eva / corda start the adapter from the first training batches (lorafit/adapter_init.py).
    batches = adapter_init.init_batches(recipe, tokenizer, prepared.train) if (
        recipe.adapter.init in adapter_init.DATA_DRIVEN) else None
    model = adapters.wrap_model(recipe, base, gradient_checkpointing=gradient_checkpointing, precision=precision.name,
                                zero3=layout.zero3, total_steps=total_steps, init_batches=batches)
    start = adapter_init.start_of(model)
    if start is not None:
        notes.append(start.note)
    trainable, total = model.get_nb_trainable_parameters()
    targets = sorted(getattr(model.peft_config["default"], "target_modules", None) or [])
    if _one_packed_row_per_forward(recipe):
        notes.append(f"packing: one packed row per forward pass ({model.config._attn_implementation} attention has no "
                     f"variable-length kernel); {recipe.training.batch_size} rows are accumulated per step")
    result = TrainResult(recipe.run_dir, precision, prepared.report, trainable, total, targets, dry_run, notes=notes,
                         recipe=recipe)
    return _PreparedRun(result, source, tokenizer, prepared, model, gradient_checkpointing, checkpoint, args, layout)


def _fit_and_export(run: _PreparedRun, console: Console, *, replace: bool, quiet: bool, resume_command: str,
                    started: float) -> None:
    """Train (atomic checkpoints, clean Ctrl-C, out-of-memory / disk-full explained), then write the run folder;
    `run.result.metrics` is filled in."""
    from lorafit import checkpoints, run_record
    from lorafit.training_loop import ThroughputMeter, explained_failures, fit, nonfinite_parameters, on_any_rank

    result, recipe = run.result, run.result.recipe
    run_dir = recipe.run_dir
    # 4. Train.
    _prepare_run_dir(run_dir, replace=replace)
    if distributed.is_main_process():
        checkpoints.record_run(run_dir, recipe, run.data.report.fingerprint)
        # Written now, not only at export: `lorafit train runs/x/recipe.yaml --overwrite` must not lose the file it
        # runs from if training then fails, and an interrupted run can be resumed from its own folder.
        run_folder.write_atomic(run_dir / run_folder.RECIPE, dump_recipe(recipe))
    trainer = _build_trainer(recipe, run.model, run.tokenizer, run.data, run.args, console, quiet=quiet)
    throughput = ThroughputMeter()
    trainer.add_callback(throughput)
    explained = functools.partial(explained_failures, recipe, gradient_checkpointing=run.gradient_checkpointing,
                                  precision=result.precision.name, resume_command=resume_command)
    with explained():
        train_started = time.perf_counter()
        output = fit(trainer, recipe, resume_from=run.checkpoint, resume_command=resume_command)
        train_seconds = time.perf_counter() - train_started
    nonfinite = nonfinite_parameters(run.model)
    if on_any_rank(bool(nonfinite), trainer.args):
        raise RunFailed(f"the trained weights hold NaN/inf ({', '.join(nonfinite[:3]) or 'on another rank'}); "
                        "no adapter was exported",
                        where="training", hint=f"lower training.learning_rate (now {recipe.training.learning_rate:g}); "
                        f"{checkpoints.last_saved(run_dir)}")

    # 5. Export the run folder.
    result.metrics = _measured(result, recipe, run.source, trainer, output, throughput, run.layout,
                               train_seconds=train_seconds, wall_seconds=time.perf_counter() - started)
    if result.metrics.distributed["strategy"] != run.layout.strategy:
        result.notes.append(f"warning: the launcher asked for {run.layout.strategy}, but the trainer ran "
                            f"{result.metrics.distributed['strategy']}")
    # Sharded weights (FSDP, ZeRO-3) are gathered by every rank together; rank 0 alone writes the run folder.
    adapter_state = distributed.gathered_state_dict(trainer.model, trainer)
    if trainer.is_world_process_zero():
        with explained():
            run_record.export_run(run_dir, run.model, run.tokenizer, recipe, result.metrics, notes=result.notes,
                              state_dict=adapter_state)


def _prepare_run_dir(run_dir: Path, *, replace: bool) -> None:
    """Claim the folder with the run marker (status running), after removing an earlier run's entries if replaced."""
    if not distributed.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        return
    marker = run_folder.read_marker(run_dir)
    if replace and marker is not None:
        # Only what lorafit wrote; anything else the user put there (even inside checkpoints/) stays.
        run_folder.remove_owned(run_dir, marker)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_folder.write_marker(run_dir, "run", files=[run_folder.RECIPE, run_folder.CHECKPOINTS], status="running")


def _adalora_steps(recipe: Recipe, prepared, layout: Layout, notes: list[str]) -> int:
    """The optimizer steps AdaLoRA's budget schedule spans, checked against tinit / tfinal before the model loads.

    max_steps, or epochs x the steps of one epoch, counted as the Trainer counts them (set_initial_training_values):
    the batches of one process, then one step per grad_accum of them, the last one short. The Trainer's own count
    still decides once training begins (adalora.RankBudget).
    """
    import math

    from lorafit.recipe import adalora_schedule_problem

    if layout.shards_weights:
        # PEFT's rank allocator scores every weight of every A, E and B from its gradient: each process must hold
        # them whole.
        raise LorafitError(f"method adalora cannot run under {layout.strategy}, which shards the weights its rank "
                           "allocator scores", where="adapter.method",
                           hint="launch it with DDP (accelerate launch or torchrun without FSDP / ZeRO-3), or use "
                                "method: lora")
    t = recipe.training
    if t.max_steps:
        steps, source = t.max_steps, f"training.max_steps: {t.max_steps}"
    else:
        row_per_forward = _one_packed_row_per_forward(recipe)
        rows_per_forward = 1 if row_per_forward else t.batch_size
        accumulation = t.grad_accum * t.batch_size if row_per_forward else t.grad_accum
        batches = math.ceil(math.ceil(len(prepared.train) / rows_per_forward) / layout.world_size)
        steps = math.ceil(t.epochs * max(math.ceil(batches / accumulation), 1))
        source = (f"training.epochs {t.epochs:g} x {len(prepared.train)} rows / (batch_size {t.batch_size} x "
                  f"grad_accum {t.grad_accum}{f' x {layout.world_size} processes' if layout.world_size > 1 else ''})")
    problem = adalora_schedule_problem(recipe.adapter, steps, source)
    if problem:
        raise LorafitError(problem, where="adapter")
    notes.append(f"adalora: ranks pruned from init_r {recipe.adapter.init_r} to an average of target_r "
                 f"{recipe.adapter.target_r} over {steps} optimizer steps")
    return steps


def _one_packed_row_per_forward(recipe: Recipe) -> bool:
    """Packing without a variable-length attention kernel: each forward pass takes one packed row.

    TRL's padding-free collator concatenates a batch's packed rows into one long row. FlashAttention splits it at
    the sequence boundaries, but SDPA and eager attention compute the whole (batch_size x max_length)^2 score
    matrix under a block-diagonal mask: on a CPU, batch 8 x 512 spent more time in attention than in all the
    linear layers. One row per forward keeps attention at max_length^2, and accumulating batch_size rows per
    optimizer step keeps the step the same (docs/performance.md).
    """
    # model.attn_implementation "auto" never picks FlashAttention (transformers chooses SDPA, else eager).
    return recipe.data.packing and "flash" not in recipe.model.attn_implementation


def _training_arguments(recipe: Recipe, prepared, precision: Precision):
    """The task's HF TrainingArguments (SFTConfig, DPOConfig...) of the recipe; creating them sets up distributed
    state (the process group under torchrun / accelerate launch)."""
    from lorafit import checkpoints

    arguments, _trainer_class, task_options = tasks.task_of(recipe).trainer_classes(recipe)
    t = recipe.training
    row_per_forward = _one_packed_row_per_forward(recipe)
    report_to = _trackers(recipe)
    options = dict(
        # Checkpoints are written into a staging folder and renamed into place once complete; HF's rotation
        # (which deletes any checkpoint-* it finds) is off: trainer.fit rotates only lorafit's own.
        output_dir=str(checkpoints.staging_dir(recipe.run_dir)),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=1 if row_per_forward else t.batch_size,
        per_device_eval_batch_size=1 if row_per_forward else t.batch_size,
        gradient_accumulation_steps=t.grad_accum * t.batch_size if row_per_forward else t.grad_accum,
        train_sampling_strategy="group_by_length" if recipe.data.group_by_length else "random",
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        # Not a typo: transformers 5 deprecates warmup_ratio and reads a warmup_steps float in [0, 1) as the share
        # of all steps (TrainingArguments.get_warmup_steps); the recipe keeps warmup_ratio below 1.
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        # TRL defaults to bf16=True; precision is chosen from the hardware instead (see models.choose_precision).
        bf16=precision.name == "bf16",
        fp16=precision.name == "fp16",
        use_cpu=precision.device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # With no eval_steps, EvaluateAtEnd still evaluates once, at the last step.
        eval_strategy="steps" if prepared.eval is not None else "no",
        eval_steps=t.eval_steps or 10**9,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,
        report_to=report_to,
        # Gradient checkpointing is already set up by adapters.wrap_model (non-reentrant, PEFT-aware).
        gradient_checkpointing=False,
        disable_tqdm=True,
        logging_nan_inf_filter=False,  # show a NaN/inf loss as it is (trainer.NonFiniteGuard stops on them)
        # Padding-free (packed) batches hold no padding, and counting "non_padding" there would skip every real
        # token equal to the pad id (often eos).
        include_num_input_tokens_seen="all" if recipe.data.packing else "non_padding",
        dataloader_num_workers=0,
        # Every adapter parameter takes part in every forward pass; the unused-parameter search HF enables by
        # default costs an extra autograd traversal per step under DDP.
        ddp_find_unused_parameters=False,
    )
    return arguments(**(options | task_options))  # a task's own setting wins (KTO reads its rows in order)


def _build_trainer(recipe: Recipe, model, tokenizer, prepared, args, console: Console, *, quiet: bool):
    """The task's trainer over the wrapped model, with `args` from `_training_arguments`."""
    from transformers import PrinterCallback

    from lorafit import adapters
    from lorafit.progress import ProgressCallback
    from lorafit.training_loop import EvaluateAtEnd

    task = tasks.task_of(recipe)
    _arguments, trainer_class, _task_options = task.trainer_classes(recipe)
    t = recipe.training
    callbacks = _tensorboard_callbacks(recipe)
    callbacks.append(ProgressCallback(console, quiet=quiet))
    if prepared.eval is not None:
        callbacks.append(EvaluateAtEnd())
    with adapters.trainable_dtypes_kept(model):  # TRL casts a quantized model's trainable parameters to bf16
        trainer = trainer_class(
            max_nonfinite_steps=t.max_nonfinite_steps,
            model=model,
            args=args,
            train_dataset=prepared.train,
            eval_dataset=prepared.eval,
            processing_class=tokenizer,
            callbacks=callbacks,
            **task.trainer_options(recipe, tokenizer, prepared),
        )
    # With tqdm disabled HF prints raw log dicts; ProgressCallback already shows the same numbers readably.
    trainer.remove_callback(PrinterCallback)
    return trainer


def _trackers(recipe: Recipe) -> list[str]:
    """report_to for HF: the recipe's trackers, with tensorboard left to `_tensorboard_callbacks`."""
    import importlib.util

    wanted = recipe.output.report_to
    if wanted == "auto":
        wanted = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    wanted = [w for w in wanted if w != "none"]
    if "tensorboard" in wanted and importlib.util.find_spec("tensorboard") is None:
        raise LorafitError("tensorboard is not installed", where="output.report_to",
                           hint="pip install tensorboard, or set report_to: [none]")
    return [w for w in wanted if w != "tensorboard"] or ["none"]


def _tensorboard_callbacks(recipe: Recipe) -> list:
    """Our own TensorBoardCallback writing to <run>/logs, on the main process only (one event file, not one per
    process). Built with the trainer, once the run folder is claimed: its marker lists logs/ before it is written."""
    import importlib.util

    wanted = recipe.output.report_to
    if wanted == "auto":
        wanted = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    if "tensorboard" not in wanted or not distributed.is_main_process():
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    run_folder.update_marker(recipe.run_dir, add_files=[run_folder.LOGS])  # listed before it is written
    return [TensorBoardCallback(tb_writer=SummaryWriter(str(recipe.run_dir / run_folder.LOGS)))]


def _measured(result: TrainResult, recipe: Recipe, source: str, trainer, output, throughput, layout: Layout, *,
              train_seconds: float, wall_seconds: float) -> TrainMetrics:
    """The finished run's TrainMetrics, from the trainer's log history and state."""
    from lorafit import adalora, run_record

    history, state, report = trainer.state.log_history, trainer.state, result.report
    task = tasks.task_of(recipe)
    logged = task.logged_metrics(recipe)
    history_keys = ("loss", "eval_loss", "eval_accuracy", "eval_f1", "learning_rate", "grad_norm",
                    *logged, *(f"eval_{key}" for key in logged))
    return TrainMetrics(
        name=recipe.name,
        base_model=source,
        global_step=state.global_step,
        train_loss_final=last_logged(history, "loss"),
        train_loss_mean=output.training_loss,
        eval_loss=last_logged(history, "eval_loss"),
        loss_history=[{"step": e["step"], **{k: e[k] for k in history_keys if k in e}}
                      for e in history if "loss" in e or "eval_loss" in e],
        tokens_seen=state.num_input_tokens_seen,
        tokens_per_second=state.num_input_tokens_seen / train_seconds if train_seconds else None,
        tokens_per_second_after_first_step=throughput.tokens_per_second_after_first_step,
        first_step_seconds=throughput.first_step_seconds,
        train_seconds=train_seconds,
        wall_seconds=wall_seconds,
        peak_memory_mb=models.peak_memory_mb(result.precision.device),
        precision=result.precision.name,
        device=result.precision.device,
        device_kind=distributed.device_kind(result.precision.device),
        distributed=distributed.run_record(trainer, layout),
        seed=recipe.training.seed,
        trainable_params=result.trainable_params,
        total_params=result.total_params,
        target_modules=result.target_modules,
        train_examples=report.train_examples,
        eval_examples=report.eval_examples,
        data_fingerprint=report.fingerprint,
        data_sources=report.sources,
        data_cache={"state": report.cache, "path": report.cache_path, "prepare_seconds": report.prepare_seconds},
        recipe_git_commit=run_record.git_commit_of(Path.cwd()),
        **run_record.environment_info(),
        **task.metric_fields(recipe, history, report),
        adapter_ranks=adalora.final_ranks(trainer.model) if adalora.is_adalora(trainer.model) else None,
    )


