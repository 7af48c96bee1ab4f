"""`lorafit init`: a commented starter recipe that validates and fits the model and data it was made for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
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


PAIRS = [{"prompt": f"Say {i}", "chosen": f"{i}.", "rejected": f"No {i}."} for i in range(12)]
JUDGED = [{"prompt": f"Say {i}", "completion": f"{i}." if i % 2 else f"No {i}.", "label": bool(i % 2)}
          for i in range(12)]


@pytest.mark.parametrize(("rows", "task", "fields", "data_format"), [
    (PAIRS, "dpo", {}, "auto"),
    ([{"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in PAIRS], "dpo",
     {"prompt": "question"}, "auto"),
    (JUDGED, "kto", {}, "auto"),
    ([{"prompt": f"q {i}", "response": f"a {i}", "label": bool(i % 2)} for i in range(12)], "kto",
     {"completion": "response"}, "auto"),
    ([{"question": f"q {i}", "answer": f"a {i}"} for i in range(12)], "causal-lm",
     {"prompt": "question", "completion": "answer"}, "prompt-completion"),
    ([{"input": f"q {i}", "output": f"a {i}"} for i in range(12)], "causal-lm",
     {"prompt": "input", "completion": "output"}, "prompt-completion"),
    ([{"prompt": f"q {i}", "response": f"a {i}"} for i in range(12)], "causal-lm", {"completion": "response"},
     "prompt-completion"),
    ([{"instruction": f"q {i}", "output": f"a {i}"} for i in range(12)], "causal-lm", {}, "alpaca"),
], ids=["pairs", "pairs-question", "kto", "kto-response", "question-answer", "input-output", "prompt-response",
        "instruction-output"])
def test_init_recognises_preference_rows_and_common_column_names(tiny_llama, tmp_path, rows, task, fields, data_format):
    """init on preference pairs writes task: dpo, on answers labelled true/false task: kto (never an SFT recipe
    that would train the undesirable answers), and on the common column names (question/answer, input/output,
    prompt/response) a prompt-completion recipe whose data.fields maps them, with a comment; each recipe dry-runs."""
    from lorafit.starter import run_init

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "r.yaml"
    result = run_init(str(tiny_llama), str(data), out)
    recipe = load_recipe(out, ["output.dir=" + str(tmp_path / "run")])
    assert (recipe.task, recipe.data.fields, recipe.data.format) == (task, fields, data_format), out.read_text()
    assert result.task == task
    assert ("# data.fields maps" in out.read_text()) == bool(fields)
    dry = run_train(recipe, Console(quiet=True), dry_run=True)
    assert dry.report.train_examples > 0


@pytest.mark.parametrize("data", ["rows.jsonl.gz", "rows.csv.gz"])
def test_init_reads_compressed_data(tiny_llama, tmp_path, data):
    """init on a .jsonl.gz or .csv.gz file detects the format from the rows inside, like the plain file."""
    import csv
    import gzip
    import io

    rows = [{"prompt": f"q {i}", "completion": f"a {i}"} for i in range(12)]
    if ".csv" in data:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
        raw = text.getvalue()
    else:
        raw = "".join(json.dumps(row) + "\n" for row in rows)
    path = tmp_path / data
    path.write_bytes(gzip.compress(raw.encode()))
    from lorafit.starter import run_init

    assert run_init(str(tiny_llama), str(path), tmp_path / "r.yaml").data_format == "prompt-completion"


def test_init_on_rows_it_cannot_place_says_exactly_what_to_write(tiny_llama, tmp_path):
    """Columns that name no format (e.g. a and b) are one user error listing them and the fields to write."""
    from lorafit.errors import LorafitError
    from lorafit.starter import run_init

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"a": f"x{i}", "b": f"y{i}"}) + "\n" for i in range(4)))
    with pytest.raises(LorafitError, match=r"columns \(a, b\)") as caught:
        run_init(str(tiny_llama), str(data), tmp_path / "r.yaml")
    assert "format: prompt-completion" in caught.value.hint and "fields: {prompt:" in caught.value.hint
    assert not (tmp_path / "r.yaml").exists()
