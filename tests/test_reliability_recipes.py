"""What a bad recipe gets: unsafe YAML, unknown/misspelled/duplicate keys, out-of-range or contradictory
values, names the libraries reject, bad --set items, missing or unreadable recipe files, `~` and `..` in paths.
Each test's name and docstring say the case it covers.

The rule checked throughout: a non-zero exit code, one message naming the field, file or value and what to
do, no traceback (unless --debug), and nothing the user had is lost or changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import MINIMAL, QUICK, assert_one_line_error, cli, write_recipe

from lorafit.recipe import load_recipe, validate_recipe

pytestmark = pytest.mark.usefixtures("cli_in_this_process")


def test_unsafe_yaml_tags_are_refused_and_never_executed(tmp_path):
    """A recipe with a !!python/object/apply tag: validate and train refuse it, and the command never runs."""
    marker = tmp_path / "pwned"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MINIMAL + f"output:\n  dir: !!python/object/apply:os.system ['touch {marker}']\n")
    for command in ("validate", "train"):
        assert_one_line_error(*cli(command, str(recipe)), str(recipe), "python/object/apply")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [(MINIMAL + "adapter:\n  lora_r: 8\n", "adapter.lora_r: unknown key; did you mean 'r'?"),
     (MINIMAL + "training:\n  learnig_rate: 0.1\n",
      "training.learnig_rate: unknown key; did you mean 'learning_rate'?"),
     (MINIMAL + "training:\n  epochs: 1\n  epochs: 2\n", "duplicate key 'epochs'")],
)
def test_unknown_misspelled_and_duplicate_keys(tmp_path, text, expected):
    """An unknown key, a misspelled key (with the suggestion) and a duplicate key are one-line errors."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert_one_line_error(*cli("train", str(recipe)), expected)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("section", "expected"),
    [({"adapter": {"r": 0}}, "adapter.r: must be greater than 0"),
     ({"adapter": {"dropout": 1.0}}, "adapter.dropout: must be less than 1"),
     ({"training": {"learning_rate": 0}}, "training.learning_rate: must be greater than 0"),
     ({"training": {"learning_rate": "INF"}}, "training.learning_rate: must be a finite number"),
     ({"training": {"bf16": True, "fp16": True}}, "did you mean 'precision'"),
     ({"quantization": {"bits": 4}, "adapter": {"init": "pissa"}}, "cannot start from a quantized model"),
     ({"training": {"precision": "fp16"}}, "training.precision: fp16: fp16 mixed precision needs a GPU")],
)
def test_out_of_range_or_contradictory_values_fail_before_any_model_load(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                         no_model_load, section, expected):
    """Out-of-range or contradictory values are refused naming the key, before any model loads or folder is made."""
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, **section))
    recipe.write_text(recipe.read_text().replace('"INF"', ".inf"))  # YAML's spelling of infinity; JSON has none
    assert_one_line_error(*cli("train", str(recipe)), expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "directory", "not-utf8", "truncated"])
def test_missing_empty_directory_binary_or_truncated_recipe(tmp_path, case):
    """A recipe path that is missing, empty, a folder, not UTF-8 or cut off mid-value: one line naming the file."""
    path = tmp_path / "r.yaml"
    if case == "empty":
        path.write_text("")
    elif case == "directory":
        path.mkdir()
    elif case == "not-utf8":
        path.write_bytes(b"name: caf\xe9\n")
    elif case == "truncated":
        path.write_text(MINIMAL + 'training:\n  scheduler: "cos')  # cut off in the middle of a value
    expected = {"missing": "file not found", "empty": "the file is empty", "directory": "is a directory",
                "not-utf8": "not UTF-8", "truncated": "line 7"}[case]
    assert_one_line_error(*cli("train", str(path)), str(path), expected)


@pytest.mark.parametrize(
    ("override", "expected"),
    [("adapter.lora_r=8", "adapter.lora_r: unknown key; did you mean 'r'?"),
     ("training.max_steps=many", "training.max_steps: must be a valid integer"),
     ("training.learning_rate=[1, 2]", "training.learning_rate: must be a valid number"),
     ("max_steps", "expected section.key=value"),
     ("name.sub=1", "'name' is not a section")],
)
def test_bad_set_overrides(tmp_path, override, expected):
    """--set with an unknown key, a wrong type or a malformed item fails like the same mistake in the file."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MINIMAL)
    assert_one_line_error(*cli("train", str(recipe), "--set", override), expected)


def _uninstalled_tracker() -> str | None:
    """A tracker transformers knows but that is not installed here (None if every one is)."""
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    return next((name for name in INTEGRATION_TO_CALLBACK if name not in get_available_reporting_integrations()
                 and name != "azure_ml"), None)


@pytest.mark.parametrize(("section", "value", "where"), [
    ("training", {"scheduler": "cosine_annealing"}, "training.scheduler"),
    ("training", {"optimizer": "adamw_turbo"}, "training.optimizer"),
    ("output", {"report_to": ["not_a_tracker"]}, "output.report_to"),
    ("output", {"report_to": ["UNINSTALLED"]}, "output.report_to"),
    ("model", {"attn_implementation": "flash_attention_2"}, "model.attn_implementation"),
])
def test_names_the_libraries_reject_fail_in_validate_and_dry_run(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                 no_model_load, section, value, where):
    """Scheduler/optimizer names transformers does not have, trackers that are unknown or not installed,
    and flash_attention_2 without flash-attn are refused by validate and --dry-run, naming the key, before any
    model loads (the flash case only where flash-attn is missing)."""
    import importlib.util

    if value.get("report_to") == ["UNINSTALLED"]:
        tracker = _uninstalled_tracker()
        if tracker is None:
            pytest.skip("every tracker is installed here")
        value = {"report_to": [tracker]}
    if "attn_implementation" in value and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, **{section: value})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert_one_line_error(*cli("validate", str(recipe)), where)
    assert_one_line_error(*cli("train", str(recipe), "--dry-run"), where)
    assert not (tmp_path / "run").exists()


def test_home_and_dotdot_in_paths(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch, no_model_load):
    """`~` in output.dir, model.path and data.train means the home folder (never a folder named
    `~`), and `name: ../../x` cannot place the run outside runs/."""
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (home / "data" / "toy.jsonl").write_bytes(toy_data.read_bytes())
    recipe = validate_recipe({"name": "r", "model": {"path": str(tiny_llama)}, "data": {"train": "~/data/toy.jsonl"},
                              "output": {"dir": "~/runs/r"}})
    assert recipe.run_dir == home / "runs" / "r" and recipe.data.train == str(home / "data" / "toy.jsonl")
    (tmp_path / "r.yaml").write_text("name: r\nmodel:\n  path: m\ndata:\n  train: ~/data/toy.jsonl\n")
    assert load_recipe(tmp_path / "r.yaml").data.train == str(home / "data" / "toy.jsonl")
    escaping = write_recipe(tmp_path / "esc.yaml", {**make_recipe(tiny_llama, toy_data, tmp_path / "x", QUICK),
                                                     "name": "../../x", "output": {"report_to": ["none"]}})
    assert_one_line_error(*cli("validate", str(escaping)), "name", "outside runs/")
    assert not (tmp_path / "~").exists()


def test_set_paths_are_resolved_against_the_current_folder(tiny_llama, toy_data, tmp_path, monkeypatch):
    """`--set data.train=rel.jsonl` and `--set model.path=models/x` mean those paths as
    seen from the current folder, and the resolved (absolute) paths are what the recipe records."""
    import shutil

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    shutil.copytree(tiny_llama, work / "models" / "x")
    shutil.copy(toy_data, work / "rel.jsonl")
    elsewhere = tmp_path / "recipes"
    elsewhere.mkdir()
    (elsewhere / "r.yaml").write_text("name: r\nmodel:\n  path: placeholder\ndata:\n  train: placeholder.jsonl\n")
    monkeypatch.chdir(work)
    recipe = load_recipe(elsewhere / "r.yaml", ["model.path=models/x", "data.train=rel.jsonl"])
    assert recipe.model.path == str(work / "models" / "x") and recipe.data.train == str(work / "rel.jsonl")
    monkeypatch.chdir(tmp_path)  # somewhere else: the recorded paths still name the same files
    assert Path(recipe.model.path).is_dir() and Path(recipe.data.train).is_file()
