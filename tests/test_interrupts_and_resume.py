"""Interrupts and resume: Ctrl-C, SIGTERM (train, merge, eval), SIGKILL at any step, the exact resume
command, resume with another recipe, and resumed adapters equal to uninterrupted ones bit for bit.
Each test's name and docstring say the case it covers.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch
from cli_helpers import (QUICK, QUIET, adapter_weights, assert_one_line_error, checkpoint_steps, cli, digest_tree,
                         save_untrained_adapter, write_recipe)
from run_signals import signal_at_step

from lorafit import models, run_folder
from lorafit.errors import EXIT_INTERRUPTED, Interrupted
from lorafit.recipe import load_recipe, validate_recipe
from lorafit.train import run_train

pytestmark = pytest.mark.usefixtures("cli_in_this_process")


def test_interrupt_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(make_recipe, tiny_llama, toy_data,
                                                                              tmp_path, monkeypatch):
    """Ctrl-C saves a checkpoint at the step boundary; --resume ends with the adapter of a run never stopped."""
    straight = run_train(validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "straight", QUICK)), QUIET)
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))

    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK))
    signal_at_step(monkeypatch, 3, sig=signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        run_train(recipe, QUIET, resume_command="lorafit train r.yaml --resume")
    assert str(info.value) == "interrupted at step 3; checkpoint saved; resume with: lorafit train r.yaml --resume"
    assert info.value.exit_code == EXIT_INTERRUPTED
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert checkpoint_steps(tmp_path / "run") == [2, 3]  # stopped at the step boundary, with a checkpoint
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "metrics.json").exists()
    assert load_recipe(tmp_path / "run" / "recipe.yaml") == recipe  # the run folder alone can resume it
    monkeypatch.undo()

    resumed = run_train(recipe, QUIET, resume=True)
    assert resumed.metrics.global_step == straight.metrics.global_step == 6
    expected, got = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "run")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name


def test_second_interrupt_stops_at_once_keeping_the_last_complete_checkpoint(make_recipe, tiny_llama, toy_data,
                                                                             tmp_path, monkeypatch):
    """A second Ctrl-C stops at once; the last complete checkpoint is kept and resume continues from it."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK))
    signal_at_step(monkeypatch, 3, times=2)
    with pytest.raises(Interrupted, match=r"interrupted again: stopped at once at step 3; the last complete "
                                          r"checkpoint \(.*checkpoint-2\) is kept; resume with"):
        run_train(recipe, QUIET)
    assert checkpoint_steps(tmp_path / "run") == [2]
    monkeypatch.undo()
    assert run_train(recipe, QUIET, resume=True).metrics.global_step == 6


def test_interrupt_marks_the_run_interrupted(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch):
    """Ctrl-C leaves the marker's status at interrupted; resuming sets it to finished."""
    run = tmp_path / "run"
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, run, QUICK, training={"max_steps": 4}))
    signal_at_step(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run_train(recipe, QUIET)
    assert run_folder.read_marker(run).status == "interrupted"
    monkeypatch.undo()
    run_train(recipe, QUIET, resume=True)
    assert run_folder.read_marker(run).status == "finished"


def test_cli_interrupt_exits_130_with_the_resume_command(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch):
    """An interrupted `lorafit train` exits 130 with one line giving the exact resume command."""
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK))
    signal_at_step(monkeypatch, 2)
    code, lines = cli("train", str(recipe), "--set", "training.max_steps=5")
    expected = f"interrupted at step 2; checkpoint saved; resume with: lorafit train {recipe} --set " \
               f"training.max_steps=5 --resume"
    assert_one_line_error(code, lines, expected, exit_code=EXIT_INTERRUPTED)
    monkeypatch.undo()
    code, lines = cli(*shlex.split(expected.split("resume with: ")[1])[1:])
    assert code == 0, lines
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"] == 5


@pytest.mark.slow
def test_sigterm_to_the_cli_process_saves_and_resumes(make_recipe, tiny_llama, toy_data, tmp_path):
    """SIGTERM to the CLI process saves a checkpoint, exits 130, and --resume finishes the run."""
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                                          training={"max_steps": 400, "save_steps": 1000}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen(["lorafit", "train", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr
    assert f"checkpoint saved; resume with: lorafit train {recipe} --resume" in stderr
    step = checkpoint_steps(tmp_path / "run")[-1]
    assert 2 <= step < 400
    done = subprocess.run(["lorafit", "train", str(recipe), "--resume", "--set", f"training.max_steps={step + 2}"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"] == step + 2


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_sigterm_during_merge_or_eval_exits_130_and_leaves_nothing(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                   monkeypatch, command):
    """SIGTERM while merge or eval writes its output exits 130 with one line, removes the
    staging folder and leaves nothing that looks complete (no output folder at all here)."""
    from lorafit import merge as merge_module

    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    out = tmp_path / "out"

    def terminate(*args, **kwargs):
        assert (out / run_folder.STAGING).is_dir()  # the output is being written
        os.kill(os.getpid(), signal.SIGTERM)
        return "never used"

    if command == "merge":
        monkeypatch.setattr(merge_module, "_model_card", terminate)
        code, lines = cli("merge", str(adapter), "--out", str(out))
    else:
        monkeypatch.setattr(run_folder, "write_atomic", terminate)
        recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                                              data={"eval": str(toy_data)}))
        code, lines = cli("eval", str(recipe), "--adapter", str(adapter), "--samples", "2", "--out", str(out))
    assert_one_line_error(code, lines, "interrupted", str(out), exit_code=EXIT_INTERRUPTED)
    assert not out.exists()


def test_resume_with_a_different_recipe_is_refused_with_the_diff(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                 monkeypatch):
    """--resume with another model/adapter/data than the checkpoints were trained with is refused, showing the diff."""
    run = tmp_path / "run"
    raw = make_recipe(tiny_llama, toy_data, run, QUICK, training={"max_steps": 2})
    signal_at_step(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run_train(validate_recipe(raw), QUIET)
    monkeypatch.undo()
    before = digest_tree(run)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe was compared")

    monkeypatch.setattr(models, "load_base_model", refuse)
    changed = {**raw, "adapter": {**raw["adapter"], "r": 8}, "data": {**raw["data"], "max_length": 32}}
    recipe = write_recipe(tmp_path / "changed.yaml", changed)
    message = assert_one_line_error(*cli("train", str(recipe), "--resume"), "refusing to resume", "different recipe")
    assert "adapter.r: 4 -> 8" in message and "data.max_length: 48 -> 32" in message and "adapter.alpha" in message
    # The data file itself is fingerprinted too.
    extra_row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    toy_data.write_text(toy_data.read_text().rstrip("\n") + "\n" + json.dumps(extra_row) + "\n")
    message = assert_one_line_error(*cli("train", str(write_recipe(tmp_path / "same.yaml", raw)), "--resume"))
    assert f"data file {toy_data}: contents changed" in message
    assert digest_tree(run) == before


_KILL_AT = """
import os, signal, sys
point, recipe = sys.argv[1], sys.argv[2]
from lorafit import run_record
from lorafit.progress import ProgressCallback
if point == "export":  # after the last step and its checkpoint: while the run folder is being exported
    run_record.export_run = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
else:  # at the end of optimizer step N, before that step's checkpoint (if any) is saved
    step, original = int(point), ProgressCallback.on_step_end
    def on_step_end(self, args, state, control, **kwargs):
        result = original(self, args, state, control, **kwargs)
        if state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    ProgressCallback.on_step_end = on_step_end
from lorafit.cli import main
sys.argv = ["lorafit", "train", recipe, "--quiet"]
main()
"""


def _kill_and_resume(make_recipe, tiny_llama, toy_data, tmp_path, point: str) -> None:
    """Train uninterrupted; train again killed with SIGKILL at `point`, then resume: the same adapter, bit for bit,
    no step run twice or past max_steps."""
    straight = tmp_path / "straight"
    raw = make_recipe(tiny_llama, toy_data, straight, QUICK)
    run_train(validate_recipe(raw), QUIET)
    run = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "k.yaml", make_recipe(tiny_llama, toy_data, run, QUICK))
    killed = subprocess.run([sys.executable, "-c", _KILL_AT, point, str(recipe)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "metrics.json").exists()
    resumed = run_train(validate_recipe(make_recipe(tiny_llama, toy_data, run, QUICK)), QUIET, resume=True)
    assert resumed.metrics.global_step == 6 and max(checkpoint_steps(run)) == 6
    assert not (run / "checkpoints" / "checkpoint-7").exists()
    mine, theirs = adapter_weights(run), adapter_weights(straight)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert run_folder.read_marker(run).status == "finished"


def test_kill_after_the_last_step_resumes_without_training_past_max_steps(make_recipe, tiny_llama, toy_data, tmp_path):
    """SIGKILL after the last step's checkpoint (during the export), then --resume: only the export runs —
    no checkpoint-7 for a 6-step recipe — and the adapter equals an uninterrupted run's bit for bit."""
    _kill_and_resume(make_recipe, tiny_llama, toy_data, tmp_path, "export")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["1", "3", "4", "6"])
def test_kill_at_any_step_resumes_bit_exactly(make_recipe, tiny_llama, toy_data, tmp_path, point):
    """SIGKILL before the first checkpoint (step 1), between checkpoints (3), right at a checkpoint step
    before its save (4), and at the last step before the final save (6); each resumed adapter equals an
    uninterrupted run's bit for bit. (Kills mid-save: the *_during_a_save_* tests.)"""
    _kill_and_resume(make_recipe, tiny_llama, toy_data, tmp_path, point)
