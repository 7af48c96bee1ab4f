"""`lorafit train recipe.yaml --sweep KEY=V1,V2 ...`: a grid of runs, one after another, and a summary.

    runs/<name>/                 the sweep folder (the recipe's output.dir)
      lr=1e-4,r=8/               a normal run folder per grid point, named after its values
      lr=2e-4,r=8/ ...
      sweep.json                 the grid, each run's status and scores, the best run
      sweep.md                   the same as a table to paste anywhere

Every grid point is a `--set` override list, so its values are typed and checked by the recipe schema
exactly like `--set`; the whole grid is validated, every run folder checked, and every point checked as deeply
as `--dry-run` can without loading weights (model, data and template, target modules on the meta device) before
the first run starts. A run that fails (NaN loss, out of memory) is recorded and the sweep goes on; Ctrl-C stops the
sweep after writing the interrupted run's checkpoint. `--resume` skips finished runs and resumes the rest.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit import run_folder
from lorafit.errors import Interrupted, LorafitError, RunFailed
from lorafit.recipe import Recipe, load_recipe, read_yaml_file, validate_recipe

if TYPE_CHECKING:
    from rich.console import Console

# Folder names stay short and readable: lr=2e-4,r=16 rather than training.learning_rate=2e-4,adapter.r=16.
_SHORT_KEYS = {
    "training.learning_rate": "lr", "training.batch_size": "bs", "training.grad_accum": "accum",
    "training.max_steps": "steps", "training.epochs": "epochs", "training.scheduler": "sched",
    "training.warmup_ratio": "warmup", "training.weight_decay": "wd", "training.seed": "seed",
    "training.optimizer": "optim", "adapter.r": "r", "adapter.alpha": "alpha", "adapter.dropout": "dropout",
    "adapter.target_modules": "targets", "adapter.method": "method", "data.max_length": "len",
}
# Keys that decide where the runs go: the sweep chooses those itself.
_NOT_SWEEPABLE = ("name", "output.dir", "output")
_MAX_FOLDER_NAME = 120


@dataclass(frozen=True)
class SweepAxis:
    """One `--sweep KEY=V1,V2` option: the recipe key, its short name, and the values as the user wrote them."""

    key: str
    short: str
    texts: tuple[str, ...]


@dataclass
class SweepRun:
    """One grid point: its folder, its values (typed by the schema) and, once run, how it went."""

    name: str
    run_dir: Path
    overrides: list[str]
    values: dict[str, Any]
    before: str  # state found before the sweep ran it: new | finished | started
    plan: str = "train"  # what the sweep does with it: train | resume | skip | train again
    status: str = "pending"  # pending | finished | failed | interrupted
    error: str | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    steps: int | None = None
    tokens_per_second: float | None = None
    train_seconds: float | None = None
    recipe: Recipe | None = field(default=None, repr=False)


@dataclass
class SweepResult:
    """The grid and what became of each run; `summary_path`/`table_path` are None after a dry run."""

    sweep_dir: Path
    axes: dict[str, list[Any]]  # recipe key -> its values, typed by the schema
    runs: list[SweepRun]
    dry_run: bool
    short_keys: dict[str, str] = field(default_factory=dict)  # recipe key -> the name used in folder names
    best: str | None = None
    summary_path: Path | None = None
    table_path: Path | None = None

    @property
    def failed(self) -> list[SweepRun]:
        """Runs that ended with an error."""
        return [run for run in self.runs if run.status == "failed"]


def run_sweep(recipe_path: Path, overrides: list[str], sweeps: list[str], console: Console, *,
              dry_run: bool = False, resume: bool = False, overwrite: bool = False, quiet: bool = False,
              allow_code: bool = False,
              resume_command: str = "lorafit train <recipe.yaml> --sweep ... --resume") -> SweepResult:
    """Run every point of the grid that `sweeps` spans over the recipe (one after another) and write the summary.

    With dry_run, only list the grid and what would happen to each point. `resume_command` is shown when a run is
    interrupted; it re-runs the same sweep with --resume. `allow_code` (--allow-code) reaches every run.
    """
    axes = parse_sweeps(sweeps, overrides)
    base = load_recipe(recipe_path, overrides)
    sweep_dir = base.run_dir
    run_folder.check_sweep_folder(sweep_dir, resume=resume, overwrite=overwrite)
    runs = _grid(recipe_path, overrides, axes, sweep_dir)
    for run in runs:  # every folder checked before the first run starts: no sweep dies at its third point
        try:
            run_folder.check_run_folder(run.recipe, resume=resume, overwrite=overwrite, dry_run=False)
            if resume and run.before == "finished":
                _check_unchanged(run)
        except LorafitError as exc:
            if not dry_run:
                raise
            run.plan = f"refused: {exc.message}"  # a dry run shows every refusal at once
            continue
        run.plan = _plan(run.before, resume=resume, overwrite=overwrite)
    _check_points(runs, allow_code=allow_code, dry_run=dry_run)
    result = SweepResult(sweep_dir, {axis.key: _typed_values(axis, runs) for axis in axes}, runs, dry_run,
                         short_keys={axis.key: axis.short for axis in axes})
    if dry_run:
        return result

    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch every rank runs the grid; rank 0 writes
        return _run_grid(result, recipe_path, console, overwrite=overwrite, quiet=quiet, allow_code=allow_code,
                         resume_command=resume_command)
    with run_folder.folder_lock(sweep_dir, where=f"output.dir: {sweep_dir}"):  # one sweep per folder
        run_folder.write_marker(sweep_dir, "sweep", files=[run_folder.SWEEP_SUMMARY, run_folder.SWEEP_TABLE],
                                status="running")
        try:
            _run_grid(result, recipe_path, console, overwrite=overwrite, quiet=quiet, allow_code=allow_code,
                      resume_command=resume_command)
        except BaseException as exc:
            stopped = isinstance(exc, (Interrupted, KeyboardInterrupt))
            run_folder.update_marker(sweep_dir, status="interrupted" if stopped else "failed")
            raise
        run_folder.update_marker(sweep_dir, status="failed" if result.failed else "finished")
    return result


def _run_grid(result: SweepResult, recipe_path: Path, console: Console, *, overwrite: bool, quiet: bool,
              allow_code: bool, resume_command: str) -> SweepResult:
    """Each grid point's run, one after another; the summary is rewritten whatever happens."""
    from lorafit.train import run_train

    runs = result.runs
    try:
        for index, run in enumerate(runs, start=1):
            if run.plan == "skip":
                _read_scores(run)
                if not quiet:
                    console.print(f"[dim][{index}/{len(runs)}] {run.name}: finished before, skipped[/dim]")
                continue
            if not quiet:
                console.rule(f"[{index}/{len(runs)}] {run.name}", style="cyan")
            try:
                trained = run_train(run.recipe, console, resume=run.plan == "resume",
                                    overwrite=overwrite, quiet=quiet, allow_code=allow_code,
                                    resume_command=resume_command)
            except Interrupted:
                run.status = "interrupted"
                raise
            except RunFailed as exc:  # this point diverged or ran out of memory; the others may well not
                run.status, run.error = "failed", str(exc)
                if not quiet:
                    console.print(f"[red]{run.name} failed:[/red] {exc}")
                continue
            except LorafitError as exc:  # a setup problem (data, model) that every later point would hit too
                run.status, run.error = "failed", str(exc)
                raise LorafitError(f"sweep stopped at {run.name}: {exc.message}", where=exc.where,
                                   hint=exc.hint) from None
            for note in [] if quiet else trained.notes:
                if note.startswith("warning"):
                    console.print(f"[yellow]{note}[/yellow]")
            _read_scores(run)
    finally:
        result.best = _best(runs)
        if os.environ.get("RANK", "0") == "0":
            result.summary_path, result.table_path = _write_summary(result, recipe_path)
    return result


def _check_points(runs: list[SweepRun], *, allow_code: bool, dry_run: bool) -> None:
    """Every grid point that will train, checked as deeply as --dry-run can without loading weights (settings, model,
    data and template, target modules on the meta device), before the first one trains: a typo in the last point
    stops the sweep now, not hours in. A dry run shows each point's refusal instead."""
    from lorafit.train import check_plan

    seen: dict[str, Any] = {}  # points that share their data prepare it once
    for run in runs:
        if run.plan == "skip" or run.plan.startswith("refused"):
            continue
        try:
            check_plan(run.recipe, allow_code=allow_code, seen=seen)
        except LorafitError as exc:
            if dry_run:
                run.plan = f"refused: {exc.message}" + (f" ({exc.where})" if exc.where else "")
                continue
            where = f"--sweep {' '.join(run.overrides)}" + (f": {exc.where}" if exc.where else "")
            raise LorafitError(exc.message, where=where, hint=exc.hint) from None


def _plan(before: str, *, resume: bool, overwrite: bool) -> str:
    """What happens to a grid point that run_folder.check_run_folder accepted."""
    if before == "new":
        return "train"
    if resume:
        return "skip" if before == "finished" else "resume"
    return "train again"  # --overwrite, or a run that stopped before its first checkpoint (nothing to keep)


def parse_sweeps(sweeps: list[str], overrides: list[str] = ()) -> list[SweepAxis]:
    """`KEY=V1,V2` options as axes; commas inside [...] / {...} / quotes belong to one value."""
    axes: list[SweepAxis] = []
    set_keys = {item.partition("=")[0].strip() for item in overrides}
    for spec in sweeps:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LorafitError(f"--sweep {spec!r}: expected section.key=V1,V2,...",
                               hint="e.g. --sweep training.learning_rate=1e-4,2e-4")
        if key in _NOT_SWEEPABLE or key.startswith("output."):
            raise LorafitError(f"--sweep {key}: the sweep decides the run folders itself (runs/<name>/<values>/)",
                               hint="set output.dir or name in the recipe (or with --set) to move the whole sweep")
        if key in set_keys:
            raise LorafitError(f"--sweep {key}: also given with --set; pass the key to one of them")
        if any(axis.key == key for axis in axes):
            raise LorafitError(f"--sweep {key}: given twice; list all its values in one option",
                               hint=f"--sweep {key}=V1,V2,V3")
        texts = tuple(value.strip() for value in _split_values(text))
        if not texts or any(not value for value in texts):
            raise LorafitError(f"--sweep {spec!r}: empty value", hint="separate values with commas: KEY=V1,V2")
        if len(set(texts)) != len(texts):
            raise LorafitError(f"--sweep {key}: a value is listed twice ({text})")
        axes.append(SweepAxis(key, _SHORT_KEYS.get(key, key.rsplit(".", 1)[-1]), texts))
    shorts = [axis.short for axis in axes]
    return [SweepAxis(a.key, a.key if shorts.count(a.short) > 1 else a.short, a.texts) for a in axes]


def _split_values(text: str) -> list[str]:
    values, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current))
            current = []
            continue
        current.append(char)
    values.append("".join(current))
    return values


def _folder_value(text: str) -> str:
    """A value as it reads in a folder name: [q_proj,v_proj] -> q_proj+v_proj, path separators replaced."""
    text = re.sub(r"[\[\]{}'\" ]", "", text).replace(",", "+")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "_"


def _grid(recipe_path: Path, overrides: list[str], axes: list[SweepAxis], sweep_dir: Path) -> list[SweepRun]:
    from lorafit.runs import run_status

    runs: list[SweepRun] = []
    seen: dict[str, str] = {}
    for texts in itertools.product(*(axis.texts for axis in axes)):
        name = ",".join(f"{axis.short}={_folder_value(text)}" for axis, text in zip(axes, texts, strict=True))
        if len(name) > _MAX_FOLDER_NAME:
            raise LorafitError(f"--sweep: the run folder name {name[:60]}... is too long",
                               hint="sweep fewer keys or shorter values")
        if name in seen:
            raise LorafitError(f"--sweep: {seen[name]} and {texts} both give the run folder {name}",
                               hint="list distinct values")
        seen[name] = str(texts)
        point = [f"{axis.key}={text}" for axis, text in zip(axes, texts, strict=True)]
        run_dir = sweep_dir / name
        try:
            recipe = load_recipe(recipe_path, [*overrides, *point, f"output.dir={run_dir}"])
        except LorafitError as exc:
            raise LorafitError(exc.message, where=f"--sweep {' '.join(point)}", hint=exc.hint) from None
        values = {axis.key: _value_at(recipe, axis.key) for axis in axes}
        status = run_status(run_dir)
        before = "new" if status is None else "finished" if status == "finished" else "started"
        runs.append(SweepRun(name, run_dir, point, values, before, recipe=recipe))
    by_values: dict[str, str] = {}
    for run in runs:  # 1e-4 and 0.0001 are one grid point
        key = json.dumps(run.values, sort_keys=True, default=str)
        if key in by_values:
            raise LorafitError(f"--sweep: {by_values[key]} and {run.name} are the same values",
                               hint="list distinct values")
        by_values[key] = run.name
    return runs


def _value_at(recipe: Recipe, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


def _typed_values(axis: SweepAxis, runs: list[SweepRun]) -> list[Any]:
    values: list[Any] = []
    for run in runs:
        if run.values[axis.key] not in values:
            values.append(run.values[axis.key])
    return values


def _check_unchanged(run: SweepRun) -> None:
    """A finished run is only skipped when it was trained from this grid point's recipe."""
    saved_path = run.run_dir / run_folder.RECIPE
    try:
        saved = validate_recipe(read_yaml_file(saved_path), source=str(saved_path))
    except LorafitError:
        raise LorafitError(f"refusing to skip this finished run: its {run_folder.RECIPE} is missing or unreadable",
                           where=str(run.run_dir), hint="pass --overwrite to train the grid again") from None
    old, new = _flat(saved.model_dump(mode="json")), _flat(run.recipe.model_dump(mode="json"))
    changes = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key) and not key.startswith("output.")
               and not (key == "data.labels" and new.get(key) is None)]  # classes are filled in at training
    if changes:
        raise LorafitError("refusing to skip this finished run: it was trained with a different recipe: "
                           + "; ".join(changes), where=str(run.run_dir),
                           hint="pass --overwrite to train the grid again, or resume with the original recipe")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def _read_scores(run: SweepRun) -> None:
    from lorafit.runs import read_run

    info = read_run(run.run_dir)
    if info is None:
        return
    run.status = "finished" if info.status == "finished" else run.status
    run.train_loss, run.eval_loss, run.steps = info.train_loss, info.eval_loss, info.steps
    run.tokens_per_second, run.train_seconds = info.tokens_per_second, info.train_seconds


def _best(runs: list[SweepRun]) -> str | None:
    """The finished run with the lowest eval loss (train loss when no run was evaluated)."""
    finished = [run for run in runs if run.status == "finished"]
    key = "eval_loss" if any(run.eval_loss is not None for run in finished) else "train_loss"
    scored = [run for run in finished if getattr(run, key) is not None]
    return min(scored, key=lambda run: getattr(run, key)).name if scored else None


def _write_summary(result: SweepResult, recipe_path: Path) -> tuple[Path, Path]:
    payload = {
        "recipe": str(recipe_path),
        "sweep_dir": str(result.sweep_dir),
        "axes": result.axes,
        "best": result.best,
        "runs": [_run_record(run) for run in result.runs],
    }
    summary = result.sweep_dir / run_folder.SWEEP_SUMMARY
    table = result.sweep_dir / run_folder.SWEEP_TABLE
    run_folder.write_json_atomic(summary, payload)
    run_folder.write_atomic(table, summary_table(result))
    return summary, table


def _run_record(run: SweepRun) -> dict[str, Any]:
    record = {key: value for key, value in asdict(run).items() if key not in ("recipe", "before", "overrides")}
    record["run_dir"] = str(run.run_dir)
    return record


def summary_table(result: SweepResult) -> str:
    """The sweep as a Markdown table, one row per run, the best one marked."""
    keys = list(result.axes)
    header = ["run", *(result.short_keys.get(key, key) for key in keys), "status", "steps", "train loss", "eval loss", "tokens/s", "train time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in result.runs:
        cells = [f"**{run.name}** (best)" if run.name == result.best else run.name,
                 *(cell(run.values[key]) for key in keys), run.status, cell(run.steps),
                 _number(run.train_loss, ".4f"), _number(run.eval_loss, ".4f"),
                 _number(run.tokens_per_second, ",.0f"), _number(run.train_seconds, ".1f", " s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cell(value: Any) -> str:
    """A grid value or a result as a table cell: floats short, lists joined, None as -."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    return "-" if value is None else str(value)


def _number(value: float | None, spec: str, unit: str = "") -> str:
    return f"{value:{spec}}{unit}" if isinstance(value, (int, float)) else "-"
