"""eval: base vs adapter(s) side by side on the eval rows; a trained adapter beats the base on a toy task."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from rich.console import Console
from tiny_models import build_tiny_model, write_lora_run, write_toy_dataset

from lorafit.errors import LorafitError
from lorafit.evaluate import normalize_answer, rouge_l, run_eval
from lorafit.recipe import load_recipe, validate_recipe
from lorafit.train import run_train


@pytest.fixture(scope="module")
def trained(make_recipe, tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama, one adapter really trained on the colour -> thing task, and one random adapter."""
    root = tmp_path_factory.mktemp("eval")
    base = build_tiny_model(root / "base", "llama")
    train = write_toy_dataset(root / "train.jsonl", n=64)
    held_out = write_toy_dataset(root / "eval.jsonl", n=12, seed=1)
    recipe = validate_recipe(make_recipe(base, train, root / "run", name="toy", data={"eval": str(held_out)},
                                         training={"max_steps": 40, "batch_size": 8, "logging_steps": 10,
                                                   "save_steps": 1000}))
    run_train(recipe, Console(quiet=True), quiet=True)
    random_adapter = write_lora_run(root / "random", base, r=4, seed=7)
    return {"root": root, "base": base, "recipe": root / "run" / "recipe.yaml", "adapter": root / "run" / "adapter",
            "random": random_adapter, "eval": held_out}


def test_trained_adapter_scores_better_than_the_base(trained, tmp_path):
    """A trained adapter beats the base on loss, exact match and ROUGE-L on held-out rows."""
    recipe = load_recipe(trained["recipe"])
    result = run_eval(recipe, [trained["adapter"]], out_dir=tmp_path / "eval")
    base, tuned = result.scores
    assert (base.name, tuned.name) == ("base", "run")  # the run folder's name labels its adapter
    assert tuned.loss < base.loss / 4 and tuned.perplexity < base.perplexity
    assert base.exact_match <= 0.2 and tuned.exact_match >= 0.9
    assert tuned.normalized_exact_match >= tuned.exact_match and tuned.rouge_l >= 0.9
    assert result.examples == 12 and base.completion_tokens == tuned.completion_tokens > 12


def test_report_and_samples_hold_every_model_side_by_side(trained, tmp_path):
    """report.json, samples.jsonl and scores.png hold base and every adapter side by side; the base scores as if
    alone."""
    recipe = load_recipe(trained["recipe"])
    out = tmp_path / "eval"
    result = run_eval(recipe, [trained["adapter"], trained["random"]], samples=5, out_dir=out)
    assert [s.name for s in result.scores] == ["base", "run", "random"]
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["scores"]] == ["base", "run", "random"]
    for score in report["scores"]:
        for key in ("loss", "perplexity", "exact_match", "normalized_exact_match", "rouge_l", "examples"):
            assert score[key] is not None, key
    assert report["examples"] == 5 and report["template"] == "model"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    assert set(rows[0]) == {"prompt", "reference", "base", "run", "random"}
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n")  # rendered with the training template
    # The chart next to report.json: one bar color per model (matplotlib's C0, C1, C2), on a non-blank image.
    assert result.chart_path == out / "scores.png"
    from PIL import Image

    with Image.open(result.chart_path) as image:
        assert image.format == "PNG"
        colors = {color for _, color in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert {(31, 119, 180), (255, 127, 14), (44, 160, 44)} <= colors
    # The base is measured with the adapters switched off: the same numbers as a plain base-only run.
    alone = run_eval(recipe, [trained["random"]], samples=5, out_dir=tmp_path / "alone")
    assert alone.scores[0].loss == pytest.approx(result.scores[0].loss, rel=1e-5)
    assert alone.scores[1].loss == pytest.approx(result.scores[2].loss, rel=1e-5)


def test_data_file_and_generation_length_can_be_given(trained, tmp_path):
    """--data and --max-new-tokens replace the recipe's eval rows and the generation length."""
    other = write_toy_dataset(tmp_path / "other.jsonl", n=6, fmt="prompt-completion", seed=3)
    recipe = load_recipe(trained["recipe"])
    result = run_eval(recipe, [trained["adapter"]], data_file=other, max_new_tokens=2, out_dir=tmp_path / "e")
    assert result.data == str(other) and result.examples == 6 and result.max_new_tokens == 2


def test_metrics():
    """Answer normalisation and ROUGE-L on known cases."""
    assert normalize_answer("  The Apple!  ") == "apple"
    assert rouge_l("bath key whale hook", "bath key whale hook") == 1.0
    assert rouge_l("hook whale key bath", "bath key whale hook") == pytest.approx(0.25)
    assert rouge_l("", "x") == 0.0 and rouge_l("", "") == 1.0


def test_bad_inputs_give_clean_errors(trained, tmp_path):
    """Missing adapters, bad options, no eval data and an adapter for another base are LorafitErrors, nothing
    written."""
    recipe = load_recipe(trained["recipe"])
    with pytest.raises(LorafitError, match="adapter folder not found"):
        run_eval(recipe, [tmp_path / "missing"])
    with pytest.raises(LorafitError, match="no adapter given"):
        run_eval(recipe, [])
    with pytest.raises(LorafitError, match="--samples"):
        run_eval(recipe, [trained["adapter"]], samples=0)
    no_eval = recipe.model_copy(update={"data": recipe.data.model_copy(update={"eval": None})})
    with pytest.raises(LorafitError, match="no eval data.*--data"):
        run_eval(no_eval, [trained["adapter"]], out_dir=tmp_path / "e")
    gpt2 = build_tiny_model(tmp_path / "gpt2", "gpt2")
    other_base = recipe.model_copy(update={"model": recipe.model.model_copy(update={"path": str(gpt2)})})
    with pytest.raises(LorafitError, match="model_type llama.*model_type gpt2"):
        run_eval(other_base, [trained["adapter"]], out_dir=tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_cli_prints_one_json_object(trained, tmp_path):
    """`lorafit eval --json` prints one JSON object; the table lists the models; an error is one line."""
    proc = subprocess.run(
        ["lorafit", "eval", str(trained["recipe"]), "--adapter", str(trained["random"]), "--samples", "3",
         "--out", str(tmp_path / "cli"), "--json"],
        capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["command"] == "eval" and payload["ok"] and "samples" not in payload
    assert [s["name"] for s in payload["scores"]] == ["base", "random"]
    assert Path(payload["samples_path"]).exists() and Path(payload["report_path"]).exists()

    from typer.testing import CliRunner

    from lorafit.cli import app

    text = CliRunner().invoke(app, ["eval", str(trained["recipe"]), "--adapter", str(trained["adapter"]),
                                    "--samples", "2", "--out", str(tmp_path / "t")], env={"COLUMNS": "150"})
    assert text.exit_code == 0, text.output
    assert "exact match" in text.output and "base" in text.output and "reference" in text.output
    error = CliRunner().invoke(app, ["eval", str(trained["recipe"]), "--adapter", str(tmp_path / "nope")])
    assert error.exit_code == 1 and error.output.strip().startswith("error:")
    assert len(error.output.strip().splitlines()) == 1
