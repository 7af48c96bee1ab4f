"""`lorafit init`: a commented starter recipe that validates and fits the model and data it was made for."""

from __future__ import annotations

import json
import subprocess
import sys

from rich.console import Console

from lorafit.recipe import AdapterSection, load_recipe
from lorafit.train import run_train


def test_init_detects_format_and_targets_and_writes_a_recipe_that_runs(tiny_model_factory, toy_data_factory, tmp_path):
    model = tiny_model_factory("gpt2")
    data = toy_data_factory("prompt-completion", n=8)
    out = tmp_path / "starter.yaml"
    proc = subprocess.run([sys.executable, "-m", "lorafit", "init", str(model), str(data), "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["data_format"] == "prompt-completion"
    assert payload["resolved_targets"] == ["c_attn", "c_fc", "c_proj"]

    text = out.read_text()
    assert text.startswith(f"# Run: lorafit train {out}")
    # comments are the schema's own descriptions
    assert f"# {AdapterSection.model_fields['r'].description}" in text
    recipe = load_recipe(out, ["output.dir=" + str(tmp_path / "run")])
    assert recipe.data.format == "prompt-completion" and recipe.adapter.target_modules == "attention+mlp"
    result = run_train(recipe, Console(quiet=True), dry_run=True)
    assert result.report.train_examples > 0 and result.trainable_params > 0


def test_init_refuses_to_replace_a_file(tiny_llama, toy_data, tmp_path):
    out = tmp_path / "recipe.yaml"
    out.write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "lorafit", "init", str(tiny_llama), str(toy_data), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "file already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == "mine"
