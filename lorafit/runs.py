"""`lorafit runs [DIR ...]`: every run folder under the given folders, one row each, to compare and plot.

A folder is a run only by lorafit's marker (`lorafit.json`, kind run); anything else under DIR is ignored. A row is read from
what the run folder holds: `recipe.yaml` (base, method, r, alpha, learning rate), `metrics.json` (a finished
run's losses, tokens/s, time), the newest checkpoint's `trainer_state.json` (an interrupted run's steps and
losses so far) and `eval/report.json` (`lorafit eval`'s scores, when it was run).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorafit import run_folder
from lorafit.errors import LorafitError

# Columns `--sort` accepts; lower is better for losses and time, higher for the rest, so the best run is first.
SORT_KEYS = {
    "name": False, "base": False, "method": False, "r": False, "alpha": False, "lr": False, "steps": True,
    "train_loss": False, "eval_loss": False, "eval_score": True, "tokens_per_second": True,
    "train_seconds": False, "status": False,
}
_MAX_DEPTH = 6


@dataclass
class RunInfo:
    """One run folder, as `lorafit runs` shows it; None where the run folder does not say."""

    path: Path
    name: str
    status: str  # finished | interrupted | failed | running
    base: str | None = None
    method: str | None = None
    r: int | None = None
    alpha: float | None = None
    lr: float | None = None
    steps: int | None = None
    max_steps: int | None = None
    train_loss: float | None = None  # the last logged training loss
    train_reward: float | None = None  # grpo / rloo: the last logged mean reward (the loss says little in RL)
    eval_loss: float | None = None
    eval_metric: str | None = None  # exact_match (generation) or accuracy (classifier), from `lorafit eval`
    eval_score: float | None = None  # the adapter's
    eval_base_score: float | None = None  # the base model's, same metric
    benchmarks: dict[str, float | None] | None = None  # `lorafit eval --benchmark`: "task metric" -> adapter - base
    benchmark_regressions: int | None = None  # how many of those dropped by more than the noise
    tokens_per_second: float | None = None
    train_seconds: float | None = None
    history: list[dict[str, float]] = field(default_factory=list, repr=False)  # step, loss, eval_loss, learning_rate


def run_runs(folders: list[Path], *, sort: str | None = None, plot: Path | None = None) -> tuple[list[RunInfo], str | None]:
    """The runs under `folders` (sorted by `sort`), and, with `plot`, their loss curves drawn into that PNG.

    Returns the rows and a warning when the chart could not be written (a chart never fails the command).
    """
    if sort is not None and sort not in SORT_KEYS:
        raise LorafitError(f"unknown column {sort!r}", where="--sort", hint=f"one of: {', '.join(SORT_KEYS)}")
    for folder in folders:
        if not folder.exists():
            raise LorafitError("folder not found", where=str(folder), hint="pass a folder that holds run folders")
        if not folder.is_dir():
            raise LorafitError("is a file, not a folder", where=str(folder), hint="pass a folder such as runs/")
    rows: list[RunInfo] = []
    for folder in folders:
        for path in find_runs([folder]):
            info = read_run(path)
            if info is not None:  # named by its path below the folder given, e.g. quickstart/lr=2e-4
                info.name = path.name if path == folder else str(path.relative_to(folder))
                rows.append(info)
    if sort is not None:
        rows = sort_runs(rows, sort)
    warning = None
    if plot is not None:
        from lorafit.plots import write_runs_chart

        warning = write_runs_chart([(row.name, row.history) for row in rows], plot)
    return rows, warning


def find_runs(folders: list[Path]) -> list[Path]:
    """Run folders at or below each of `folders` (a run's own subfolders are not searched), in path order."""
    found: list[Path] = []
    seen: set[Path] = set()

    def visit(folder: Path, depth: int) -> None:
        resolved = folder.resolve()
        if resolved in seen:
            return
        seen.add(resolved)
        if run_status(folder) is not None:
            found.append(folder)
            return
        if depth >= _MAX_DEPTH:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:  # unreadable: not ours to report on
            return
        for child in children:
            visit(child, depth + 1)

    for folder in folders:
        visit(folder, 0)
    return found


def run_status(folder: Path) -> str | None:
    """A run folder's status (finished, running, interrupted, failed) from lorafit's marker; None: not a run.

    A run marked running whose process is gone (killed, power loss: its folder lock is no longer held) is reported
    as interrupted: `--resume` continues it from its last checkpoint.
    """
    marker = run_folder.read_marker(folder)
    if marker is None or marker.kind != "run":
        return None
    if marker.status == "running" and not run_folder.is_locked(folder):
        return "interrupted"
    return marker.status or "interrupted"


def read_run(folder: Path) -> RunInfo | None:
    """Everything `lorafit runs` shows about one run folder; None when the folder is not a run."""
    status = run_status(folder)
    if status is None:
        return None
    info = RunInfo(path=folder, name=folder.name, status=status)
    recipe = _yaml_or_none(folder / run_folder.RECIPE)
    if recipe is not None:
        _from_recipe(info, recipe)
    metrics = run_folder.read_json_object(folder / run_folder.METRICS) if status == "finished" else None
    if metrics is not None:
        _from_metrics(info, metrics)
    else:
        _from_checkpoint(info, folder)
    _from_eval_report(info, folder)
    return info


def sort_runs(rows: list[RunInfo], key: str) -> list[RunInfo]:
    """Rows ordered by `key` (best first: low losses, high scores); rows without a value go last."""
    descending = SORT_KEYS[key]
    present = [row for row in rows if getattr(row, key) is not None]
    missing = [row for row in rows if getattr(row, key) is None]
    return sorted(present, key=lambda row: getattr(row, key), reverse=descending) + missing


def as_json(info: RunInfo) -> dict[str, Any]:
    """A row as a JSON-ready dict (the loss history included, for plotting elsewhere)."""
    payload = asdict(info)
    payload["path"] = str(info.path)
    return payload


def _from_recipe(info: RunInfo, recipe: dict[str, Any]) -> None:
    model, adapter, training = (recipe.get(key) if isinstance(recipe.get(key), dict) else {}
                                for key in ("model", "adapter", "training"))
    info.base = model.get("path")
    method = adapter.get("method")
    if method == "lora":
        method = "dora" if adapter.get("use_dora") else "rslora" if adapter.get("use_rslora") else "lora"
    info.method = f"q{method}" if recipe.get("quantization") and method else method
    if adapter.get("method") == "lora":
        info.r, info.alpha = adapter.get("r"), adapter.get("alpha")
    elif adapter.get("method") == "adalora":  # its rank per module once pruned, on average
        info.r, info.alpha = adapter.get("target_r"), adapter.get("alpha")
    info.lr = training.get("learning_rate")
    info.max_steps = training.get("max_steps")


def _from_metrics(info: RunInfo, metrics: dict[str, Any]) -> None:
    info.steps = metrics.get("global_step")
    info.train_loss = _number(metrics.get("train_loss_final"))
    info.train_reward = _number((metrics.get("rl") or {}).get("reward"))
    info.eval_loss = _number(metrics.get("eval_loss"))
    info.tokens_per_second = _number(metrics.get("tokens_per_second"))
    info.train_seconds = _number(metrics.get("train_seconds"))
    if info.base is None:
        info.base = metrics.get("base_model")
    info.history = _history(metrics.get("loss_history") or [])


def _from_checkpoint(info: RunInfo, folder: Path) -> None:
    """An unfinished run: steps and losses so far, from the newest complete checkpoint."""
    from lorafit.checkpoints import complete_checkpoints

    checkpoints = complete_checkpoints(folder / run_folder.CHECKPOINTS)
    state = run_folder.read_json_object(checkpoints[-1] / "trainer_state.json") if checkpoints else None
    if state is None:
        return
    logged = state.get("log_history") or []
    info.steps = state.get("global_step")
    info.history = _history(logged)
    info.train_loss = next((e["loss"] for e in reversed(info.history) if "loss" in e), None)
    info.eval_loss = next((e["eval_loss"] for e in reversed(info.history) if "eval_loss" in e), None)


def _history(entries: list[Any]) -> list[dict[str, Any]]:
    history = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), (int, float)):
            continue
        point = {key: float(entry[key]) for key in ("loss", "eval_loss", "learning_rate")
                 if _number(entry.get(key)) is not None}
        if point:
            history.append({"step": int(entry["step"]), **point})
    return history


def _from_eval_report(info: RunInfo, folder: Path) -> None:
    report = run_folder.read_json_object(folder / run_folder.EVAL / run_folder.EVAL_REPORT)
    scores = report.get("scores") if report else None
    if not isinstance(scores, list):
        return
    own = (folder / run_folder.ADAPTER).resolve()
    adapters = [s for s in scores if isinstance(s, dict) and s.get("adapter")]
    mine = next((s for s in adapters if Path(str(s["adapter"])).resolve() == own), adapters[0] if adapters else None)
    base = next((s for s in scores if isinstance(s, dict) and not s.get("adapter")), None)
    if mine is None:
        return
    info.eval_metric = "accuracy" if mine.get("accuracy") is not None else "exact_match"
    info.eval_score = _number(mine.get(info.eval_metric))
    info.eval_base_score = _number(base.get(info.eval_metric)) if base else None
    _from_benchmarks(info, report.get("benchmarks"), mine.get("name"))


def _from_benchmarks(info: RunInfo, rows: Any, name: Any) -> None:
    """This run's adapter in the report's --benchmark rows: each metric's difference from the base."""
    if not isinstance(rows, list) or not rows:
        return
    mine = [(row, model) for row in rows if isinstance(row, dict) for model in row.get("models") or []
            if isinstance(model, dict) and model.get("name") == name]
    info.benchmarks = {f"{row.get('task')} {row.get('metric')}": _number(model.get("difference"))
                       for row, model in mine}
    info.benchmark_regressions = sum(bool(model.get("regression")) for _, model in mine)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _yaml_or_none(path: Path) -> dict[str, Any] | None:
    import yaml

    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None
