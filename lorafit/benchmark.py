"""`lorafit eval --benchmark`: did the fine-tune break the model? EleutherAI's lm-evaluation-harness on the base and
on each adapter, under the same settings, each task's metric side by side with the difference and its noise.

The harness is an optional extra (`pip install 'lorafit[bench]'`). Each model is loaded by the harness itself
(`HFLM`): the base from the recipe's model, each adapter through the harness's own PEFT support (`peft=`, no
merge), a QLoRA adapter on the base quantized as in training (lorafit/benchmark_model.py). Every model sees the
same documents (`--limit`: the first N of each task), so the difference is paired: its standard error is that of
the per-document differences, and a drop larger than two of them is flagged as a regression rather than noise.

Tasks are the harness's names (hellaswag, arc_easy, ...; their data comes from the Hub) or task YAML files of the
harness's format; a YAML's local `data_files` / `dataset_path` are read relative to the YAML's folder, so a local
task works offline from any working directory (configs/benchmarks/reverse_words.yaml is one).

`check_benchmarks` runs before any model loads: a missing extra, a missing YAML or an unknown task name is one line.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.errors import LorafitError, first_line

if TYPE_CHECKING:
    from lorafit.adapters import TrainedAdapter
    from lorafit.models import Precision
    from lorafit.recipe import Recipe

INSTALL_HINT = "pip install 'lorafit[bench]' (EleutherAI's lm-evaluation-harness)"
NOISE_STDERRS = 2.0  # a drop larger than this many standard errors of the difference is a regression
_BOOTSTRAP_ITERS = 1000  # for the few metrics the harness bootstraps (not accuracy: its error is analytic)


@dataclass(frozen=True)
class BenchmarkPlan:
    """The checked --benchmark list: the harness's task names and the local task configs (YAML read, paths made
    absolute), in the order given."""

    names: list[str]  # as given, for the report
    tasks: list[str | dict[str, Any]]  # what the harness loads: a task name, or a local task's config
    limit: int | None
    needs_index: bool  # a harness task name: the harness's own task index must be built (slow: ~15k YAMLs)


@dataclass
class BenchmarkModel:
    """One model's value on one benchmark metric; for an adapter, also its difference from the base."""

    name: str  # "base" or the adapter's label, as in the eval scores
    value: float | None
    stderr: float | None
    difference: float | None = None  # adapter minus base
    difference_stderr: float | None = None  # of the paired per-document differences (or both errors combined)
    regression: bool = False  # worse than the base by more than NOISE_STDERRS standard errors of the difference


@dataclass
class BenchmarkRow:
    """One task's metric for every model (the base first, then the adapters in --adapter order)."""

    task: str
    metric: str  # e.g. acc, acc_norm, or "exact_match (strict-match)" for a filtered metric
    higher_is_better: bool
    documents: int  # how many documents each model was scored on
    models: list[BenchmarkModel] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Before any model loads


def check_benchmarks(specs: list[str], limit: int | None) -> BenchmarkPlan:
    """The --benchmark list checked: the extra installed, each YAML present and readable, each name a task the
    harness knows. Raises a LorafitError (one line) otherwise."""
    names = [part.strip() for spec in specs for part in spec.split(",") if part.strip()]
    if not names:
        raise LorafitError("no task given", where="--benchmark", hint="e.g. --benchmark hellaswag,arc_easy")
    if limit is not None and limit <= 0:
        raise LorafitError(f"must be a positive number, got {limit}", where="--limit")
    if not harness_installed():
        raise LorafitError("needs lm-evaluation-harness, which is not installed", where="--benchmark",
                           hint=INSTALL_HINT)
    tasks: list[str | dict[str, Any]] = []
    for name in names:
        tasks.append(_local_task(Path(name).expanduser()) if _is_file_spec(name) else name)
    known = [name for name in tasks if isinstance(name, str)]
    if known:
        index = task_index(include_defaults=True)
        for name in known:
            if name not in index.all_tasks:
                import difflib

                close = difflib.get_close_matches(name, index.all_tasks, n=3)
                raise LorafitError(f"unknown lm-eval task {name!r}", where="--benchmark",
                                   hint=(f"did you mean {', '.join(close)}? " if close else "")
                                   + "`lm-eval ls tasks` lists them; or pass a task YAML file")
    local = [t["task"] for t in tasks if isinstance(t, dict)]
    if len(set(local)) != len(local):
        raise LorafitError("two task YAMLs share one task name", where="--benchmark", hint="give each its own task:")
    return BenchmarkPlan(names, tasks, limit, needs_index=bool(known))


def harness_installed() -> bool:
    """Whether lm-evaluation-harness can be imported (found without importing it: that takes seconds)."""
    return importlib.util.find_spec("lm_eval") is not None


def _is_file_spec(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or "/" in name or Path(name).exists()


def _local_task(path: Path) -> dict[str, Any]:
    """A task YAML of the harness's format, read with the harness's loader (its `include:` and `!function` work),
    local data paths made absolute against the YAML's folder."""
    from lm_eval.tasks._yaml_loader import load_yaml

    where = f"--benchmark {path}"
    if not path.is_file():
        raise LorafitError("task file not found", where=where, hint="a task YAML of lm-evaluation-harness's format")
    try:
        config = load_yaml(path)
    except Exception as exc:  # noqa: BLE001 - yaml, include and !function errors all mean "cannot read this file"
        raise LorafitError(f"cannot read the task YAML: {first_line(exc)}", where=where) from None
    if not isinstance(config.get("task"), str):
        raise LorafitError("a task YAML needs a `task:` name (group YAMLs are not supported here)", where=where)
    folder = path.resolve().parent
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("data_files") is not None:
        kwargs["data_files"] = _absolute(kwargs["data_files"], folder)
    dataset = config.get("dataset_path")
    if isinstance(dataset, str) and (folder / dataset).exists():
        config["dataset_path"] = str((folder / dataset).resolve())
    return config


def _absolute(files: Any, folder: Path) -> Any:
    """data_files (a path, a list, or split -> path(s)) with relative local paths resolved against `folder`."""
    if isinstance(files, dict):
        return {split: _absolute(value, folder) for split, value in files.items()}
    if isinstance(files, list):
        return [_absolute(value, folder) for value in files]
    if isinstance(files, str) and "://" not in files and not Path(files).is_absolute():
        return str((folder / files).resolve())
    return files


def task_index(*, include_defaults: bool):
    """The harness's TaskManager (with its own ~15k task YAMLs indexed only when a task name needs them)."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it logs every config it indexes
    return TaskManager(include_defaults=include_defaults)


# ----------------------------------------------------------------------------------------------------
# Running


def run_benchmarks(plan: BenchmarkPlan, recipe: Recipe, source: str, precision: Precision,
                   trained: list[TrainedAdapter], names: list[str], batch_size: int) -> list[BenchmarkRow]:
    """Every task on the base, then on each adapter (base + adapter, loaded by the harness); one row per metric."""
    from lm_eval import simple_evaluate

    from lorafit.benchmark_model import harness_model

    index = task_index(include_defaults=plan.needs_index)
    runs: dict[str, dict[str, Any]] = {}
    for name, adapter in [("base", None), *zip(names, trained, strict=True)]:
        model = harness_model(recipe, source, precision, adapter, batch_size)
        try:
            runs[name] = simple_evaluate(model=model, tasks=copy.deepcopy(plan.tasks), limit=plan.limit,
                                         task_manager=index, log_samples=True, bootstrap_iters=_BOOTSTRAP_ITERS)
        except (ConnectionError, OSError) as exc:  # a named task's data set could not be fetched (offline)
            raise LorafitError(f"cannot read a task's data: {first_line(exc)}", where="--benchmark",
                               hint="named tasks download their data from the Hub; offline, pass a task YAML "
                                    "that reads local files") from None
        finally:
            del model
            _free_memory()
    return compare(runs)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare(runs: dict[str, dict[str, Any]]) -> list[BenchmarkRow]:
    """The harness's results per model ("base" first) -> one row per task and metric, each adapter's difference
    from the base with its standard error, drops beyond the noise flagged."""
    base = runs["base"]
    rows = []
    for task in _reported_tasks(base):
        for key, value in base["results"][task].items():
            if "," not in key or "_stderr," in key or not _is_number(value):
                continue
            metric, kept_by = key.split(",", 1)
            higher = base.get("higher_is_better", {}).get(task, {}).get(metric, True)
            row = BenchmarkRow(task, metric if kept_by == "none" else f"{metric} ({kept_by})", bool(higher),
                               _documents(base, task))
            base_docs = _per_document(base, task, metric, kept_by)
            for name, result in runs.items():
                stats = result["results"].get(task, {})
                model = BenchmarkModel(name, _number(stats.get(key)), _number(stats.get(f"{metric}_stderr,{kept_by}")))
                if name != "base":
                    _difference(model, row.models[0], base_docs, _per_document(result, task, metric, kept_by), higher)
                row.models.append(model)
            rows.append(row)
    return rows


def _reported_tasks(result: dict[str, Any]) -> list[str]:
    """Every task in the results, except the subtasks of a group that is itself reported (mmlu: one row)."""
    hidden = {sub for group, subs in (result.get("group_subtasks") or {}).items() if group in result["results"]
              and any("," in k for k in result["results"][group]) for sub in subs}
    return [task for task in result["results"] if task not in hidden]


def _documents(result: dict[str, Any], task: str) -> int:
    counts = (result.get("n-samples") or {}).get(task) or {}
    return int(counts.get("effective", 0)) or len((result.get("samples") or {}).get(task) or [])


def _per_document(result: dict[str, Any], task: str, metric: str, kept_by: str) -> dict[Any, float]:
    """Each document's value of a mean metric (doc id -> value); empty when the metric is not per-document."""
    values = {}
    for sample in (result.get("samples") or {}).get(task) or []:
        if sample.get("filter", "none") == kept_by and _is_number(sample.get(metric)):
            values[sample["doc_id"]] = float(sample[metric])
    return values


def _difference(model: BenchmarkModel, base: BenchmarkModel, base_docs: dict[Any, float],
                docs: dict[Any, float], higher_is_better: bool) -> None:
    if model.value is None or base.value is None:
        return
    model.difference = model.value - base.value
    shared = [key for key in docs if key in base_docs]
    if len(shared) >= 2 and len(shared) == len(docs) == len(base_docs):  # paired: the same documents
        diffs = [docs[key] - base_docs[key] for key in shared]
        model.difference_stderr = statistics.stdev(diffs) / math.sqrt(len(diffs))
    elif model.stderr is not None and base.stderr is not None:  # not per-document (e.g. corpus BLEU): independent
        model.difference_stderr = math.hypot(model.stderr, base.stderr)
    worse = -model.difference if higher_is_better else model.difference
    if model.difference_stderr is not None and worse > 0:
        model.regression = worse > NOISE_STDERRS * model.difference_stderr


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def regressions(rows: list[BenchmarkRow]) -> list[str]:
    """One line per adapter metric that dropped by more than the noise, for the report's notes."""
    return [f"warning: {m.name} is worse than the base on {row.task} {row.metric}: {m.difference:+.3f} "
            f"(standard error {m.difference_stderr:.3f}, {row.documents} documents)"
            for row in rows for m in row.models if m.regression]
