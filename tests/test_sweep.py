"""`lorafit train --sweep`: the grid's run folders, the summary, failures, Ctrl-C and --resume, on a tiny model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from run_signals import signal_at_step
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.errors import EXIT_INTERRUPTED, EXIT_RUN_FAILED, EXIT_USER_ERROR, Interrupted, LorafitError
from lorafit.progress import ProgressCallback
from lorafit.run_folder import read_marker, write_marker
from lorafit.sweep import parse_sweeps, run_sweep

QUIET = Console(quiet=True)


@pytest.fixture
def write_recipe(make_recipe, tmp_path, tiny_llama, toy_data):
    """``write(**training) -> Path``: a sweepable recipe file: 4 steps of a tiny model, a checkpoint every 2, eval
    on held-out rows, runs under tmp_path/runs/sw."""

    def write(**training) -> Path:
        raw = make_recipe(tiny_llama, toy_data, tmp_path / "runs" / "sw", name="sw",
                          adapter={"r": 4}, data={"eval": 0.25, "max_length": 48},
                          training={"max_steps": 4, **training})
        path = tmp_path / "sw.yaml"
        path.write_text(json.dumps(raw))  # JSON is YAML
        return path

    return write


def cli(*args: str) -> tuple[int, str, list[str]]:
    """Run the CLI in-process: exit code, stdout, non-empty stderr lines."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, [line for line in result.stderr.splitlines() if line.strip()]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_starts(monkeypatch) -> dict[str, int]:
    """run folder name -> the step each training run started from (0: fresh, N: resumed from checkpoint-N)."""
    starts: dict[str, int] = {}
    original = ProgressCallback.on_train_begin

    def on_train_begin(self, args, state, control, **kwargs):
        starts[Path(args.output_dir).parent.parent.name] = state.global_step  # <run>/checkpoints/.incomplete
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(ProgressCallback, "on_train_begin", on_train_begin)
    return starts


def test_sweep_options_are_parsed_into_axes():
    """Short folder names for known keys, commas inside a list value, and the option mistakes a user can make."""
    axes = parse_sweeps(["training.learning_rate=1e-4, 2e-4", "adapter.target_modules=[q_proj,v_proj],all-linear",
                         "training.seed=1,2"])
    assert [(a.key, a.short, a.texts) for a in axes] == [
        ("training.learning_rate", "lr", ("1e-4", "2e-4")),
        ("adapter.target_modules", "targets", ("[q_proj,v_proj]", "all-linear")),
        ("training.seed", "seed", ("1", "2")),
    ]
    for sweeps, overrides, message in [
        (["adapter.r"], [], "expected section.key=V1,V2"),
        (["adapter.r=8,,16"], [], "empty value"),
        (["adapter.r=8,8"], [], "listed twice"),
        (["adapter.r=8", "adapter.r=16"], [], "given twice"),
        (["output.dir=a,b"], [], "the sweep decides the run folders"),
        (["adapter.r=8,16"], ["adapter.r=4"], "also given with --set"),
    ]:
        with pytest.raises(LorafitError, match=message):
            parse_sweeps(sweeps, overrides)


def test_every_grid_point_is_checked_before_any_run_starts(write_recipe, tmp_path):
    """A bad value or key in the grid is a one-line error naming the grid point; nothing is created."""
    recipe = write_recipe()
    code, _, lines = cli("train", str(recipe), "--sweep", "training.learning_rate=1e-2,2e-3",
                         "--sweep", "adapter.r=8,-1")
    assert code == EXIT_USER_ERROR and len(lines) == 1, lines
    assert "--sweep training.learning_rate=1e-2 adapter.r=-1: adapter.r: must be greater than 0" in lines[0]
    code, _, lines = cli("train", str(recipe), "--sweep", "adapter.rr=8,16")
    assert code == EXIT_USER_ERROR and "adapter.rr: unknown key; did you mean 'r'?" in lines[0], lines
    code, _, lines = cli("train", str(recipe), "--sweep", "training.learning_rate=1e-4,0.0001")
    assert code == EXIT_USER_ERROR and "are the same values" in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_a_typo_only_the_model_or_data_reveals_stops_the_sweep_before_the_first_point_trains(write_recipe, tmp_path,
                                                                                            no_model_load):
    """Every grid point is checked as deeply as --dry-run can without weights before any trains: a target module the
    model does not have (found on the meta device), or a data.fields mapping that leaves no prompt, in the LAST point
    is a one-line error naming that point, and no model is loaded, no run folder made."""
    recipe = write_recipe()
    code, _, lines = cli("train", str(recipe), "--sweep", "adapter.target_modules=[q_proj],[q_prj]")
    assert code == EXIT_USER_ERROR and len(lines) == 1, lines
    assert "--sweep adapter.target_modules=[q_prj]: adapter.target_modules" in lines[0]
    assert "q_prj match no module of this model" in lines[0]
    code, _, lines = cli("train", str(recipe), "--sweep", "data.max_length=48,2")
    assert code == EXIT_USER_ERROR and len(lines) == 1, lines
    assert "--sweep data.max_length=2: data.train: no trainable rows remain" in lines[0]
    assert not (tmp_path / "runs").exists()
    code, out, lines = cli("train", str(recipe), "--sweep", "adapter.target_modules=[q_proj],[q_prj]", "--dry-run",
                           "--json")
    assert code == 0, lines
    plans = [run["plan"] for run in json.loads(out)["runs"]]
    assert plans[0] == "train" and plans[1].startswith("refused: q_prj match no module"), plans


def test_dry_run_lists_the_grid_and_writes_nothing(write_recipe, tmp_path):
    """--dry-run --json: every grid point with its folder and typed values; no folder is created."""
    recipe = write_recipe()
    code, out, lines = cli("train", str(recipe), "--sweep", "training.learning_rate=1e-2,2e-3",
                           "--sweep", "adapter.target_modules=[q_proj,v_proj],all-linear", "--dry-run", "--json")
    assert code == 0, lines
    payload = json.loads(out)
    assert payload["ok"] and payload["dry_run"] and payload["summary"] is None
    assert [(run["name"], run["found"], run["status"]) for run in payload["runs"]] == [
        ("lr=1e-2,targets=q_proj+v_proj", "new", "pending"), ("lr=1e-2,targets=all-linear", "new", "pending"),
        ("lr=2e-3,targets=q_proj+v_proj", "new", "pending"), ("lr=2e-3,targets=all-linear", "new", "pending")]
    assert payload["runs"][0]["values"] == {"training.learning_rate": 0.01, "adapter.target_modules": ["q_proj", "v_proj"]}
    assert payload["axes"] == {"training.learning_rate": [0.01, 0.002],
                               "adapter.target_modules": [["q_proj", "v_proj"], "all-linear"]}
    assert not (tmp_path / "runs").exists()


def test_sweep_trains_each_grid_point_into_its_own_run_folder(write_recipe, tmp_path):
    """2 learning rates x 2 ranks: four finished run folders holding their values, a loss chart each, the summary."""
    recipe = write_recipe()
    code, out, lines = cli("train", str(recipe), "--sweep", "training.learning_rate=1e-2,2e-3",
                           "--sweep", "adapter.r=4,8", "--json")
    assert code == 0, lines
    payload = json.loads(out)
    sweep = tmp_path / "runs" / "sw"
    names = ["lr=1e-2,r=4", "lr=1e-2,r=8", "lr=2e-3,r=4", "lr=2e-3,r=8"]
    assert sorted(p.name for p in sweep.iterdir()) == sorted([*names, "lorafit.json", "sweep.json", "sweep.md"])
    marker = read_marker(sweep)
    assert (marker.kind, marker.status, marker.files) == ("sweep", "finished", ["sweep.json", "sweep.md"])
    for name, (lr, r) in zip(names, [(1e-2, 4), (1e-2, 8), (2e-3, 4), (2e-3, 8)], strict=True):
        saved = yaml.safe_load((sweep / name / "recipe.yaml").read_text())
        assert (saved["training"]["learning_rate"], saved["adapter"]["r"]) == (lr, r)
        assert saved["output"]["dir"] == str(sweep / name)
        assert json.loads((sweep / name / "metrics.json").read_text())["global_step"] == 4
        adapter_config = json.loads((sweep / name / "adapter" / "adapter_config.json").read_text())
        assert adapter_config["r"] == r
        assert (sweep / name / "loss.png").read_bytes()[:4] == b"\x89PNG"
        assert "](loss.png)" in (sweep / name / "README.md").read_text()

    summary = json.loads((sweep / "sweep.json").read_text())
    assert summary == {key: summary[key] for key in ("recipe", "sweep_dir", "axes", "best", "runs")}
    assert summary["axes"] == {"training.learning_rate": [0.01, 0.002], "adapter.r": [4, 8]}
    assert [(run["name"], run["status"], run["steps"]) for run in summary["runs"]] == [(n, "finished", 4) for n in names]
    best = min(summary["runs"], key=lambda run: run["eval_loss"])
    assert summary["best"] == payload["best"] == best["name"]
    table = (sweep / "sweep.md").read_text().splitlines()
    assert table[0] == "| run | lr | r | status | steps | train loss | eval loss | tokens/s | train time |"
    assert len(table) == 2 + len(names) and f"**{best['name']}** (best)" in "".join(table)


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(write_recipe, tmp_path):
    """A learning rate that makes the loss NaN fails its run (exit 2, named); the other run still finishes."""
    recipe = write_recipe(max_nonfinite_steps=2)
    code, out, lines = cli("train", str(recipe), "--sweep", "training.learning_rate=1e30,1e-2", "--json")
    assert code == EXIT_RUN_FAILED, lines
    payload = json.loads(out)
    assert not payload["ok"] and payload["exit_code"] == EXIT_RUN_FAILED
    assert payload["error"].startswith("1 of 2 sweep runs failed: lr=1e30: training: loss was NaN/inf")
    assert [(run["name"], run["status"]) for run in payload["runs"]] == [("lr=1e30", "failed"), ("lr=1e-2", "finished")]
    sweep = tmp_path / "runs" / "sw"
    assert not (sweep / "lr=1e30" / "adapter").exists() and (sweep / "lr=1e-2" / "adapter").is_dir()
    assert json.loads((sweep / "sweep.json").read_text())["best"] == "lr=1e-2"


def test_resumed_sweep_skips_finished_runs_and_resumes_the_interrupted_one(write_recipe, tmp_path, monkeypatch):
    """Ctrl-C in the 2nd of 3 runs stops the sweep (exit 130, summary written); --resume leaves the 1st run as it
    was, continues the 2nd from its checkpoint and trains the 3rd from step 0."""
    recipe = write_recipe()
    sweeps = ["training.learning_rate=1e-2,5e-3,2e-3"]
    sweep = tmp_path / "runs" / "sw"
    starts = record_starts(monkeypatch)
    signal_at_step(monkeypatch, 3, run_name="lr=5e-3")
    with pytest.raises(Interrupted) as info:
        run_sweep(recipe, [], sweeps, QUIET, quiet=True, resume_command="lorafit train sw.yaml --sweep x --resume")
    assert info.value.exit_code == EXIT_INTERRUPTED
    assert "resume with: lorafit train sw.yaml --sweep x --resume" in str(info.value)
    assert starts == {"lr=1e-2": 0, "lr=5e-3": 0}
    summary = json.loads((sweep / "sweep.json").read_text())
    assert [run["status"] for run in summary["runs"]] == ["finished", "interrupted", "pending"]
    first = {name: digest(sweep / "lr=1e-2" / name) for name in ("metrics.json", "adapter/adapter_model.safetensors")}

    monkeypatch.undo()
    starts = record_starts(monkeypatch)
    code, out, lines = cli("train", str(recipe), "--sweep", sweeps[0], "--resume", "--dry-run", "--json")
    assert [(run["found"], run["plan"]) for run in json.loads(out)["runs"]] == [
        ("finished", "skip"), ("started", "resume"), ("new", "train")], lines
    result = run_sweep(recipe, [], sweeps, QUIET, resume=True, quiet=True)
    assert starts == {"lr=5e-3": 3, "lr=2e-3": 0}  # the finished run is not trained again
    assert [(run.name, run.status, run.steps) for run in result.runs] == [
        ("lr=1e-2", "finished", 4), ("lr=5e-3", "finished", 4), ("lr=2e-3", "finished", 4)]
    assert first == {name: digest(sweep / "lr=1e-2" / name) for name in first}
    assert [run["status"] for run in json.loads((sweep / "sweep.json").read_text())["runs"]] == ["finished"] * 3

    # A finished run is skipped only when it was trained from this grid point's recipe.
    code, _, lines = cli("train", str(recipe), "--sweep", sweeps[0], "--set", "training.seed=7", "--resume")
    assert code == EXIT_USER_ERROR and len(lines) == 1, lines
    assert "refusing to skip this finished run: it was trained with a different recipe: training.seed: 42 -> 7" \
        in lines[0]
    # Without --resume or --overwrite, the finished grid is refused before anything runs (a dry run says so per run).
    code, out, lines = cli("train", str(recipe), "--sweep", sweeps[0], "--dry-run", "--json")
    assert [run["plan"] for run in json.loads(out)["runs"]] == ["refused: this folder already holds a finished run"] * 3
    code, _, lines = cli("train", str(recipe), "--sweep", sweeps[0])
    assert code == EXIT_USER_ERROR and "already holds a finished run" in lines[0], lines
    assert first == {name: digest(sweep / "lr=1e-2" / name) for name in first}


def test_a_sweep_never_goes_inside_a_single_run_or_over_files_lorafit_did_not_write(write_recipe, tmp_path):
    """The sweep folder holding a run (by its marker), or a sweep.json of the user's: refused with one line, nothing
    written; a plain run into an earlier sweep's folder is refused too."""
    recipe = write_recipe()
    sweep = tmp_path / "runs" / "sw"
    sweep.mkdir(parents=True)
    write_marker(sweep, "run", files=["recipe.yaml"], status="finished")
    code, _, lines = cli("train", str(recipe), "--sweep", "adapter.r=4,8")
    assert code == EXIT_USER_ERROR and len(lines) == 1, lines
    assert "this folder holds a single run" in lines[0] and "--set output.dir=" in lines[0]
    assert sorted(p.name for p in sweep.iterdir()) == ["lorafit.json"]

    (sweep / "lorafit.json").unlink()
    (sweep / "sweep.json").write_text("{}")
    code, _, lines = cli("train", str(recipe), "--sweep", "adapter.r=4,8")
    assert code == EXIT_USER_ERROR and "already holds sweep.json, which lorafit did not write" in lines[0], lines
    assert sorted(p.name for p in sweep.iterdir()) == ["sweep.json"]

    (sweep / "sweep.json").unlink()
    write_marker(sweep, "sweep", files=["sweep.json", "sweep.md"], status="finished")
    code, _, lines = cli("train", str(recipe))
    assert code == EXIT_USER_ERROR and "holds a lorafit sweep output, not a run" in lines[0], lines
