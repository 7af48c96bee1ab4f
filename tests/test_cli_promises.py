"""What the CLI promises on its output: `train --quiet` prints the run summary, `--json` prints an object
even for an internal error, `init` detects the task, and merge checks its flags before any work.
"""

from __future__ import annotations

import json

import pytest
from cli_helpers import QUICK, assert_one_line_error, cli, save_untrained_adapter, write_recipe
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.errors import EXIT_RUN_FAILED
from lorafit.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("cli_in_this_process")


def test_train_quiet_prints_the_run_summary(make_recipe, tiny_llama, toy_data, tmp_path):
    """README promise: `train --quiet` prints the run summary (and nothing else on stdout)."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, training={"max_steps": 2, "save_steps": 10})
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw)), "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert "run rel" in result.stdout and "adapter" in result.stdout and "steps" in result.stdout
    assert "precision" not in result.stdout  # the notes stay quiet


def test_internal_errors_print_a_json_object_too(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch):
    """--json prints one {"ok": false} object even for an internal error (exit 2)."""
    import lorafit.train

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(lorafit.train, "run_train", broken)
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK))
    result = CliRunner().invoke(app, ["train", str(recipe), "--json"])
    assert result.exit_code == EXIT_RUN_FAILED
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and "simulated bug" in payload["error"] and payload["exit_code"] == EXIT_RUN_FAILED


def test_init_writes_the_task_and_detects_a_label_column(tiny_llama, tmp_path):
    """README promise: `lorafit init` on text/label data writes task: sequence-classification and maps the columns;
    on chat data it writes task: causal-lm."""
    rows = [{"review": f"film number {i} was {'great' if i % 2 else 'dull'}", "sentiment": "pos" if i % 2 else "neg"}
            for i in range(20)]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "r.yaml"
    assert CliRunner().invoke(app, ["init", str(tiny_llama), str(data), "--out", str(out)]).exit_code == 0
    recipe = load_recipe(out)
    assert recipe.task == "sequence-classification"
    assert recipe.data.fields == {"text": "review", "label": "sentiment"}
    assert "task: sequence-classification" in out.read_text()


def test_merge_checks_max_shard_size_before_any_work(tiny_llama, tmp_path, monkeypatch):
    """--max-shard-size is parsed up front (as save_pretrained will), so a typo costs no merge."""
    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    from lorafit import merge as merge_module

    monkeypatch.setattr(merge_module, "_load_full", lambda *a, **k: pytest.fail("the base model was loaded"))
    assert_one_line_error(*cli("merge", str(adapter), "--out", str(tmp_path / "m"), "--max-shard-size", "5 gigs"),
                          "--max-shard-size", "5GB")
    assert not (tmp_path / "m").exists()
