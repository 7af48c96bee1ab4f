"""`lorafit runs`: real run folders (finished + evaluated, interrupted, failed) in one table; other folders ignored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from run_signals import signal_at_step
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.errors import EXIT_USER_ERROR, Interrupted, RunFailed
from lorafit.evaluate import run_eval
from lorafit.recipe import validate_recipe
from lorafit.train import run_train

QUIET = Console(quiet=True)


# On top of conftest's quick steps: what each run in the table trains with (4 steps, a held-out quarter).
RUN = {"adapter": {"r": 4, "alpha": 8}, "data": {"eval": 0.25, "max_length": 48},
       "training": {"max_steps": 4, "max_nonfinite_steps": 2}}


def recipe(make_recipe, model: Path, data: Path, out: Path, **training):
    """A validated recipe for the run in folder `out`, named after it: conftest's factory, RUN, then `training`."""
    return validate_recipe(make_recipe(model, data, out, RUN, name=out.name, training=training))


def cli(*args: str) -> tuple[int, str, list[str]]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, make_recipe):
    """runs/ holding a finished and evaluated run, an interrupted one, a failed one, and folders that are no runs."""
    from tiny_models import build_tiny_model, write_toy_dataset

    root = tmp_path_factory.mktemp("runs_cmd")
    model = build_tiny_model(root / "base", "llama")
    data = write_toy_dataset(root / "toy.jsonl", n=48)
    runs = root / "runs"

    done = recipe(make_recipe, model, data, runs / "done", learning_rate=2e-2)
    run_train(done, QUIET, quiet=True)
    run_eval(done, [runs / "done" / "adapter"], samples=4, max_new_tokens=4)  # -> runs/done/eval/

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Interrupted):  # the fixture is module-scoped
        signal_at_step(patch, 3)
        run_train(recipe(make_recipe, model, data, runs / "sweep" / "lr=5e-3", learning_rate=5e-3), QUIET, quiet=True)
    with pytest.raises(RunFailed, match="NaN"):
        run_train(recipe(make_recipe, model, data, runs / "sweep" / "lr=1e30", learning_rate=1e30), QUIET, quiet=True)

    (runs / "empty").mkdir()
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("try r=32")
    (runs / "lookalike").mkdir()  # the file names of a run, but not written by lorafit
    (runs / "lookalike" / "metrics.json").write_text('{"global_step": 9, "train_loss_final": 0.1}')
    (runs / "lookalike" / "recipe.yaml").write_text("name: x\n")
    run_eval(done, [runs / "done" / "adapter"], samples=2, max_new_tokens=2, out_dir=runs / "an-eval")  # eval output
    return runs


def test_one_row_per_run_folder_other_folders_ignored(runs_root):
    """Finished, interrupted and failed runs each get a row with their recipe values, steps and losses; eval
    scores when `lorafit eval` was run; empty folders, notes, look-alikes and eval outputs get none."""
    code, out, lines = cli("runs", str(runs_root), "--json")
    assert code == 0, lines
    rows = {row["name"]: row for row in json.loads(out)["runs"]}
    assert sorted(rows) == ["done", "sweep/lr=1e30", "sweep/lr=5e-3"]
    done, interrupted, failed = rows["done"], rows["sweep/lr=5e-3"], rows["sweep/lr=1e30"]
    assert [done["status"], interrupted["status"], failed["status"]] == ["finished", "interrupted", "failed"]
    assert (done["method"], done["r"], done["alpha"], done["lr"]) == ("lora", 4, 8.0, 2e-2)
    assert interrupted["lr"] == 5e-3 and failed["lr"] == 1e30
    metrics = json.loads((runs_root / "done" / "metrics.json").read_text())
    assert done["steps"] == 4 and done["train_loss"] == metrics["train_loss_final"]
    assert done["eval_loss"] == metrics["eval_loss"] and done["tokens_per_second"] == metrics["tokens_per_second"]
    assert done["train_seconds"] == metrics["train_seconds"]
    report = json.loads((runs_root / "done" / "eval" / "report.json").read_text())
    assert done["eval_metric"] == "exact_match"
    assert done["eval_score"] == report["scores"][1]["exact_match"]
    assert done["eval_base_score"] == report["scores"][0]["exact_match"]
    assert interrupted["steps"] == 3 and interrupted["train_loss"] is not None  # from its last checkpoint
    assert [e["step"] for e in interrupted["history"] if "loss" in e] == [1, 2, 3]
    assert interrupted["eval_score"] is None and failed["eval_loss"] is None

    code, out, lines = cli("runs", str(runs_root))
    assert code == 0, lines
    for text in ("done", "sweep/lr=5e-3", "interrupted", "failed", "finished", "EM", "3/4"):
        assert text in out, text
    assert "lookalike" not in out and "an-eval" not in out and "notes" not in out


def test_sort_puts_the_best_first_and_rows_without_the_value_last(runs_root):
    """--sort train_loss: lowest first; --sort eval_loss: runs with no eval loss last; a bad key names the valid ones."""
    code, out, _ = cli("runs", str(runs_root), "--sort", "train_loss", "--json")
    rows = json.loads(out)["runs"]
    losses = [row["train_loss"] for row in rows if row["train_loss"] is not None]
    assert code == 0 and losses == sorted(losses)
    code, out, _ = cli("runs", str(runs_root), "--sort", "eval_loss", "--json")
    assert [row["name"] for row in json.loads(out)["runs"]][0] == "done"
    code, _, lines = cli("runs", str(runs_root), "--sort", "loss")
    assert code == EXIT_USER_ERROR and len(lines) == 1 and "--sort: unknown column 'loss'" in lines[0], lines
    assert "eval_loss" in lines[0]


def test_plot_draws_every_listed_run(runs_root, tmp_path):
    """--plot FILE: a PNG with one colored curve per run that logged a loss (the NaN run logged none that is finite)."""
    chart = tmp_path / "runs.png"
    code, out, lines = cli("runs", str(runs_root), "--plot", str(chart), "--json")
    assert code == 0, lines
    assert json.loads(out)["plot"] == str(chart)
    with Image.open(chart) as image:
        assert image.format == "PNG"
        rgb = np.asarray(image.convert("RGB")).astype(int)
    for color in ((31, 119, 180), (255, 127, 14)):  # matplotlib's C0 and C1: the first two runs
        assert (np.abs(rgb - np.array(color)).sum(axis=-1) < 30).mean() > 0.001, color


def test_a_missing_folder_is_a_user_error(tmp_path):
    """`lorafit runs nowhere/`: one line naming the folder, exit 1; an empty folder: no rows, exit 0."""
    code, _, lines = cli("runs", str(tmp_path / "nowhere"))
    assert code == EXIT_USER_ERROR and len(lines) == 1 and "nowhere: folder not found" in lines[0], lines
    code, out, _ = cli("runs", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["runs"] == []
