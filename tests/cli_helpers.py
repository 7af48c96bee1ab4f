"""Helpers shared by the tests of what bad input and faults get: running the CLI in-process, checking its
one-line errors, reading run folders, and faults simulated by patching torch or our own progress callback.
A plain module, like run_signals.py and tiny_models.py, so test files never import from each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorafit import checkpoints
from lorafit.cli import app
from lorafit.errors import EXIT_USER_ERROR
from lorafit.progress import ProgressCallback
from lorafit.recipe import validate_recipe
from lorafit.train import run_train


QUIET = Console(quiet=True)
MINIMAL = "name: demo\nmodel:\n  path: smollm2-135m-instruct\ndata:\n  train: train.jsonl\n"


# A few quick steps on a tiny model (conftest's make_recipe): 6 steps, a checkpoint every 2, rank 4, 48 tokens.
QUICK = {"name": "rel", "adapter": {"r": 4}, "data": {"max_length": 48}}


def write_recipe(path: Path, raw: dict) -> Path:
    """Write a raw recipe dict to `path` as a recipe file."""
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def cli(*args: str) -> tuple[int, list[str]]:
    """Run the CLI in-process; the exit code and the non-empty stderr lines."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_line_error(code: int, lines: list[str], *expected: str, exit_code: int = EXIT_USER_ERROR) -> str:
    """Assert the CLI failed with `exit_code` and one line, no traceback, holding each `expected` text; the line."""
    assert code == exit_code, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    """The tensors of the adapter a run exported."""
    return load_file(run / "adapter" / "adapter_model.safetensors")


def checkpoint_steps(run: Path) -> list[int]:
    """The steps of a run's complete checkpoints, in order."""
    return [int(p.name.split("-")[1]) for p in checkpoints.complete_checkpoints(run / "checkpoints")]


def digest_tree(folder: Path) -> dict[str, str]:
    """Each file under `folder` (relative path) -> its sha256, to show that nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fail_at_step(monkeypatch, step: int, exc: BaseException) -> None:
    """Raise `exc` at the end of optimizer step `step`, before that step's checkpoint (if any) is saved."""
    original = ProgressCallback.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            raise exc
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(ProgressCallback, "on_step_end", on_step_end)


def fail_saving(monkeypatch, checkpoint_name: str, exc: BaseException) -> None:
    """Make torch.save fail half-way through writing `checkpoint_name` (after its adapter weights are written)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if checkpoint_name in str(f):
            raise exc
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def copy_model(source: Path, target: Path) -> Path:
    """A copy of a model folder to change; the shared tiny model stays read-only."""
    import shutil

    shutil.copytree(source, target)
    return target


def save_untrained_adapter(base: Path, folder: Path) -> Path:
    """A PEFT adapter for `base` without training (shapes are all that matter here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(folder)
    return folder


def tiny_lora_run(make_recipe, model_dir: Path, data_file: Path, run: Path, **adapter) -> Path:
    """Train a 2-step adapter on the tiny model; returns its adapter folder."""
    raw = make_recipe(model_dir, data_file, run, QUICK, training={"max_steps": 2, "save_steps": 10})
    if adapter:
        raw["adapter"] = adapter
    run_train(validate_recipe(raw), QUIET)
    return run / "adapter"


def hold_folder_lock(folder: Path) -> subprocess.Popen:
    """Another process holding lorafit's lock on `folder` for up to 60 s; it prints "locked" once it holds it."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from lorafit.run_folder import folder_lock
        with folder_lock(Path({str(folder)!r}), where="test"):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
