"""Charts a person can look at: a run's loss curves, eval scores of base vs adapters, loss curves of many runs.

matplotlib draws them with its Agg (file-only) backend, through the object API (no pyplot, no global state,
no window), imported only when a chart is drawn so `lorafit --help` and `validate` stay instant. A chart is
never worth a failed run: each function returns a warning instead of raising. They take plain data (names,
numbers, log histories), not the results of the modules that call them.

    write_loss_chart   runs/<name>/loss.png     train loss, eval loss, (RL) rewards and learning rate against step
    write_eval_chart   <eval out>/scores.png    base vs each adapter: loss and scores
    write_runs_chart   lorafit runs --plot F    train and eval loss of every listed run
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_DPI = 100


def write_loss_chart(history: Sequence[dict[str, Any]], path: Path, *, title: str) -> str | None:
    """Train loss, eval loss (top), the rewards of an RL run (middle, when logged) and learning rate (bottom)
    against step, from the trainer's log history.

    `history` holds {"step", "loss" | "eval_loss" | "learning_rate" | "reward" | "rewards/<name>/mean", ...}
    entries. Returns a warning, or None.
    """
    try:
        train = _series(history, "loss")
        evals = _series(history, "eval_loss")
        rates = _series(history, "learning_rate")
        keys = dict.fromkeys(k for entry in history for k in entry
                             if k == "reward" or (k.startswith("rewards/") and k.endswith("/mean")))
        rewards = {key: _series(history, key) for key in keys}
        if not train and not evals:
            return f"warning: {path.name} not drawn: no loss was logged"
        figure = _figure(7, 7 if rewards else 5)
        if rewards:
            loss_axes, reward_axes, rate_axes = figure.subplots(3, 1, sharex=True, height_ratios=[3, 2, 1])
            for index, (key, series) in enumerate(rewards.items()):
                name = key.removeprefix("rewards/").removesuffix("/mean")
                label = "reward (weighted sum)" if key == "reward" else name
                reward_axes.plot(*zip(*series, strict=True), color=f"C{3 + index}", label=label,
                                 linewidth=2 if key == "reward" else 1)
            reward_axes.set_ylabel("mean reward")
            reward_axes.legend(fontsize="small")
            reward_axes.grid(alpha=0.3)
        else:
            loss_axes, rate_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        if train:
            loss_axes.plot(*zip(*train, strict=True), color="C0", label="train loss", marker="." if len(train) < 30
                           else None)
        if evals:
            loss_axes.plot(*zip(*evals, strict=True), color="C1", marker="o", label="eval loss")
        loss_axes.set_ylabel("loss")
        loss_axes.set_title(title)
        loss_axes.legend()
        loss_axes.grid(alpha=0.3)
        if rates:
            rate_axes.plot(*zip(*rates, strict=True), color="C2")
        rate_axes.set_ylabel("learning rate")
        rate_axes.set_xlabel("step")
        rate_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        rate_axes.grid(alpha=0.3)
        _save(figure, path)
    except Exception as exc:  # noqa: BLE001 - a chart must never fail the run that it illustrates
        return _warning(path, exc)
    return None


def write_eval_chart(losses: dict[str, float | None], scores: dict[str, Sequence[float | None]], path: Path, *,
                     title: str, rows: int) -> str | None:
    """Base vs each adapter, side by side: loss (left) and the scores in percent (right). Returns a warning or None.

    `losses` maps each model's name to its loss, in the order drawn; `scores` maps a score's label to one share
    (0..1, or None) per model in that order; a score no model has is left out. `rows`: how many eval rows were scored.
    """
    try:
        models, loss_values = list(losses), list(losses.values())
        shown = {label: list(values) for label, values in scores.items() if any(v is not None for v in values)}
        figure = _figure(8, 4)
        loss_axes, score_axes = figure.subplots(1, 2, width_ratios=[1, max(len(shown), 1)])
        colors = [f"C{i % 10}" for i in range(len(models))]
        loss_axes.bar(models, [v if v is not None else 0 for v in loss_values], color=colors)
        for index, value in enumerate(loss_values):
            loss_axes.annotate("-" if value is None else f"{value:.3f}", (index, value or 0), ha="center",
                               va="bottom", fontsize=8)
        loss_axes.set_title("loss (lower is better)")
        loss_axes.tick_params(axis="x", labelrotation=20)
        width = 0.8 / len(models)
        for index, name in enumerate(models):
            xs = [group + (index - (len(models) - 1) / 2) * width for group in range(len(shown))]
            values = [100 * (column[index] or 0) for column in shown.values()]
            bars = score_axes.bar(xs, values, width, color=colors[index], label=name)
            score_axes.bar_label(bars, fmt="%.0f", fontsize=8)
        score_axes.set_xticks(range(len(shown)), list(shown))
        score_axes.set_ylim(0, 105)
        score_axes.set_ylabel("%")
        score_axes.set_title(f"scores on {rows} rows (higher is better)")
        if shown:
            score_axes.legend(fontsize=8)
        figure.suptitle(title)
        _save(figure, path)
    except Exception as exc:  # noqa: BLE001 - the report is written; a chart must not fail the command
        return _warning(path, exc)
    return None


def write_runs_chart(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], path: Path) -> str | None:
    """Train loss (solid) and eval loss (dashed, dots) of every run, one color per run. Returns a warning or None.

    `runs` holds (name, log history) pairs, the history as for write_loss_chart; runs that logged no loss are left out.
    """
    try:
        drawn = [(name, history) for name, history in runs
                 if _series(history, "loss") or _series(history, "eval_loss")]
        if not drawn:
            return f"warning: {path} not drawn: none of the runs logged a loss"
        figure = _figure(8, 5)
        axes = figure.subplots()
        for index, (name, history) in enumerate(drawn):
            color = f"C{index % 10}"
            train, evals = _series(history, "loss"), _series(history, "eval_loss")
            if train:
                axes.plot(*zip(*train, strict=True), color=color, label=name)
            if evals:  # one legend entry per run: the color is the run, the line style train vs eval
                axes.plot(*zip(*evals, strict=True), color=color, linestyle="--", marker="o",
                          label="_nolegend_" if train else name)
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title(f"{len(drawn)} run{'s' if len(drawn) != 1 else ''}: train (solid) and eval (dashed) loss")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, ncol=2 if len(drawn) > 4 else 1)
        _save(figure, path)
    except Exception as exc:  # noqa: BLE001 - the table is the result; the chart is a view of it
        return _warning(path, exc)
    return None


def _series(history: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> None:
    """Render to memory, then write atomically: a reader never sees half a PNG."""
    from lorafit.run_folder import write_atomic

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())


def _warning(path: Path, exc: Exception) -> str:
    if isinstance(exc, ImportError):
        return f"warning: {path.name} not drawn: matplotlib is not installed (pip install matplotlib)"
    return f"warning: {path.name} not drawn: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
