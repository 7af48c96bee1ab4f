"""Faults during training: a crash or kill -9 during a save, disk full, NaN losses and weights, out of
memory. Faults that cannot be caused for real on a CPU test machine are simulated by patching torch or our
own progress callback inside the test only. Each test's name and docstring say the case it covers.
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from cli_helpers import (QUICK, QUIET, assert_one_line_error, checkpoint_steps, cli, fail_at_step, fail_saving,
                         write_recipe)
from safetensors.torch import load_file

from lorafit import checkpoints
from lorafit.errors import EXIT_RUN_FAILED, RunFailed
from lorafit.progress import ProgressCallback
from lorafit.recipe import validate_recipe
from lorafit.train import run_train

pytestmark = pytest.mark.usefixtures("cli_in_this_process")


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_and_resume_skips_it(make_recipe, tiny_llama, toy_data,
                                                                                  tmp_path, monkeypatch):
    """A crash half-way through a save leaves the previous checkpoint intact; resume skips the incomplete one."""
    run = tmp_path / "run"
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, run, QUICK))
    fail_saving(monkeypatch, "checkpoint-4", RuntimeError("simulated crash in the middle of a save"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(recipe, QUIET)
    monkeypatch.undo()
    assert checkpoint_steps(run) == [2] and not (run / "checkpoints" / "checkpoint-4").exists()
    partial = run / "checkpoints" / checkpoints.STAGING / "checkpoint-4"
    assert (partial / "adapter_model.safetensors").exists() and not (partial / "trainer_state.json").exists()
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2

    result = run_train(recipe, QUIET, resume=True)
    assert any("skipped the incomplete checkpoint-4" in note for note in result.notes)
    assert result.metrics.global_step == 6 and checkpoint_steps(run) == [4, 6]
    assert not partial.exists()


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_and_resume_skips_it(make_recipe, tiny_llama, toy_data,
                                                                                  tmp_path):
    """kill -9 during a save leaves the previous checkpoint intact; resume skips and removes the incomplete one."""
    run = tmp_path / "run"
    raw = make_recipe(tiny_llama, toy_data, run, QUICK)
    child = textwrap.dedent("""
        import json, os, signal, sys
        import torch
        from rich.console import Console
        from lorafit.recipe import validate_recipe
        from lorafit.train import run_train

        real_save = torch.save

        def save(obj, f, *args, **kwargs):  # killed half-way through writing checkpoint-4
            real_save(obj, f, *args, **kwargs)
            if "checkpoint-4" in str(f):
                os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save
        run_train(validate_recipe(json.loads(sys.argv[1])), Console(quiet=True))
    """)
    proc = subprocess.run([sys.executable, "-c", child, json.dumps(raw)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert checkpoint_steps(run) == [2] and not (run / "checkpoints" / "checkpoint-4").exists()
    assert (run / "checkpoints" / checkpoints.STAGING / "checkpoint-4").exists()
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    result = run_train(validate_recipe(raw), QUIET, resume=True)
    assert any("skipped the incomplete checkpoint-4" in note for note in result.notes)
    assert result.metrics.global_step == 6


def test_disk_full_during_a_save_is_explained_and_the_last_checkpoint_kept(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                           monkeypatch):
    """Disk full during a save: the message gives the free space and the knobs, the last complete checkpoint is kept."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, run, QUICK))
    fail_saving(monkeypatch, "checkpoint-4", OSError(errno.ENOSPC, "No space left on device"))
    message = assert_one_line_error(*cli("train", str(recipe)), f"output.dir: {run}", "disk full", "free",
                                    "checkpoint-2) is kept", "save_total_limit", exit_code=EXIT_RUN_FAILED)
    assert f"resume with: lorafit train {recipe} --resume" in message
    assert checkpoint_steps(run) == [2] and not (run / "checkpoints" / checkpoints.STAGING).exists()


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_exports_nothing(make_recipe, tiny_llama, toy_data, tmp_path):
    """NaN losses stop the run after max_nonfinite_steps in a row, keep the last good checkpoint, export nothing."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(
        tiny_llama, toy_data, run, QUICK, training={"learning_rate": 1e30, "save_steps": 1, "max_nonfinite_steps": 2}))
    message = assert_one_line_error(*cli("train", str(recipe)), "training: loss was NaN/inf for 2 steps in a row",
                                    "no adapter was exported", "training.learning_rate", exit_code=EXIT_RUN_FAILED)
    assert "the last complete checkpoint" in message
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()
    steps = checkpoint_steps(run)
    assert steps and max(steps) < 6
    for checkpoint in checkpoints.complete_checkpoints(run / "checkpoints"):
        weights = load_file(checkpoint / "adapter_model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), checkpoint


def test_nan_weights_are_never_exported(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch):
    """Weights that turned NaN are never exported: the run fails naming the parameter."""
    original = ProgressCallback.on_train_end

    def poison(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
        return original(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(ProgressCallback, "on_train_end", poison)
    with pytest.raises(RunFailed, match="the trained weights hold NaN/inf .*lora_B.*no adapter was exported"):
        run_train(validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                              training={"max_steps": 2})), QUIET)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("MPS backend out of memory (MPS allocated: 17 GB)")])
def test_out_of_memory_names_the_knobs_and_their_values(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch,
                                                        error):
    """Out of memory: one message with the batch size, grad accum, max_length, checkpointing, quantization and
    precision in use."""
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                                          training={"precision": "fp32"}))
    fail_at_step(monkeypatch, 3, error)
    message = assert_one_line_error(*cli("train", str(recipe)), "out of memory", exit_code=EXIT_RUN_FAILED)
    for knob in ("training.batch_size=4", "training.grad_accum=1", "data.max_length=48",
                 "training.gradient_checkpointing=off", "quantization=none", "precision=fp32",
                 "lower training.batch_size", "quantization: {bits: 4}"):
        assert knob in message, knob
    assert checkpoint_steps(tmp_path / "run") == [2]
