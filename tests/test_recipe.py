"""The recipe loader: defaults, strictness, overrides, extends, and errors that name the key and the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorafit.errors import LorafitError
from lorafit.recipe import Recipe, dump_recipe, load_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[1]
MINIMAL = "name: demo\nmodel:\n  path: smollm2-135m-instruct\ndata:\n  train: train.jsonl\n"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(LorafitError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_minimal_recipe_gets_practitioner_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.adapter.r == 16 and recipe.adapter.alpha == 32 and recipe.adapter.dropout == 0.05
    assert recipe.adapter.target_modules == "all-linear"
    assert recipe.training.learning_rate == 2e-4 and recipe.training.scheduler == "cosine"
    assert recipe.training.warmup_ratio == 0.03 and recipe.training.precision == "auto"
    assert recipe.template.train_on == "completions"
    assert recipe.quantization is None
    assert recipe.run_dir == Path("runs/demo")
    # relative data paths are resolved against the recipe file
    assert recipe.data.train == str((tmp_path / "train.jsonl").resolve())


def test_alpha_follows_r_unless_given(tmp_path):
    assert load_recipe(write(tmp_path, MINIMAL + "adapter:\n  r: 8\n")).adapter.alpha == 16
    assert load_recipe(write(tmp_path, MINIMAL + "adapter:\n  r: 8\n  alpha: 8\n")).adapter.alpha == 8


def test_name_defaults_to_file_stem(tmp_path):
    text = MINIMAL.replace("name: demo\n", "")
    assert load_recipe(write(tmp_path, text, "my-exp.yaml")).name == "my-exp"


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_says_how_to_run_it(config):
    recipe = load_recipe(config)
    assert isinstance(recipe, Recipe)
    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("# Run: lorafit "), f"{config.name} must start with the command that runs it"


@pytest.mark.parametrize(
    ("section", "key", "suggestion"),
    [("adapter", "lora_r", "did you mean 'r'"), ("training", "learnig_rate", "did you mean 'learning_rate'"),
     ("training", "gradient_accumulation_steps", "did you mean 'grad_accum'"),
     ("template", "learning_rate", "'learning_rate' belongs under 'training:'")],
)
def test_unknown_keys_name_the_key_and_the_closest_valid_one(tmp_path, section, key, suggestion):
    message = error_of(write(tmp_path, MINIMAL + f"{section}:\n  {key}: 1\n"))
    assert f"{section}.{key}: unknown key" in message
    assert suggestion in message


def test_misspelled_section(tmp_path):
    message = error_of(write(tmp_path, MINIMAL + "trainig:\n  epochs: 1\n"))
    assert "trainig: unknown key; did you mean 'training'?" in message


def test_duplicate_keys_are_an_error_not_last_one_wins(tmp_path):
    message = error_of(write(tmp_path, MINIMAL + "training:\n  epochs: 1\n  epochs: 2\n"))
    assert "duplicate key 'epochs'" in message and "line 8" in message


def test_python_tags_are_rejected_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = MINIMAL + f"extra: !!python/object/apply:os.system ['touch {marker}']\n"
    message = error_of(write(tmp_path, text))
    assert "python/object/apply" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "adapter:\n  r: 0\n", "adapter.r: must be greater than 0"),
        (MINIMAL + "adapter:\n  dropout: 1.0\n", "adapter.dropout: must be less than 1"),
        (MINIMAL + "adapter:\n  dropout: -0.1\n", "adapter.dropout: must be greater than or equal to 0"),
        (MINIMAL + "training:\n  learning_rate: 0\n", "training.learning_rate: must be greater than 0"),
        (MINIMAL + "training:\n  precision: fp8\n", "training.precision: must be 'auto', 'fp32', 'bf16' or 'fp16'"),
        (MINIMAL + "quantization:\n  bits: 3\n", "quantization.bits: must be 4 or 8"),
        (MINIMAL + "quantization:\n  bits: 4\nadapter:\n  init: pissa\n", "cannot start from a quantized model"),
        (MINIMAL + "data:\n  train: a.jsonl\n  eval: 1.5\n", None),  # duplicate section 'data' -> YAML error
        (MINIMAL.replace("  train: train.jsonl\n", "  eval: 0.5\n"), "data.train: required key is missing"),
        (MINIMAL + "template:\n  name: custom\n", "name: custom needs template.custom"),
    ],
)
def test_bad_values_name_the_field_path(tmp_path, text, expected):
    message = error_of(write(tmp_path, text))
    assert str(tmp_path / "recipe.yaml") in message
    if expected:
        assert expected in message


def test_held_out_fraction_must_be_a_fraction(tmp_path):
    message = error_of(write(tmp_path, MINIMAL.replace("  train: train.jsonl\n", "  train: t.jsonl\n  eval: 1.5\n")))
    assert "data.eval: a held-out fraction must be between 0 and 1" in message


@pytest.mark.parametrize("case", ["missing", "empty", "directory", "not-utf8", "truncated", "not-a-mapping"])
def test_unreadable_recipe_files(tmp_path, case):
    path = tmp_path / "recipe.yaml"
    expected = {
        "missing": "file not found",
        "empty": "the file is empty",
        "directory": "is a directory",
        "not-utf8": "not UTF-8",
        "truncated": "line",
        "not-a-mapping": "expected a mapping",
    }[case]
    if case == "empty":
        path.write_text("  \n")
    elif case == "directory":
        path.mkdir()
    elif case == "not-utf8":
        path.write_bytes(b"name: caf\xe9\n")
    elif case == "truncated":
        path.write_text('name: demo\nmodel:\n  path: "unterminated\n')
    elif case == "not-a-mapping":
        path.write_text("- a\n- b\n")
    message = error_of(path)
    assert expected in message and str(path) in message


def test_set_overrides_are_typed_by_the_schema(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ("training.max_steps=50", "adapter.target_modules=[q_proj,v_proj]",
                                                    "training.learning_rate=1e-4", "data.packing=true"))
    assert recipe.training.max_steps == 50
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.training.learning_rate == 1e-4
    assert recipe.data.packing is True


@pytest.mark.parametrize(
    ("override", "expected"),
    [("training.learnig_rate=1", "training.learnig_rate: unknown key; did you mean 'learning_rate'?"),
     ("training.max_steps=many", "training.max_steps: must be a valid integer"),
     ("max_steps", "expected section.key=value"),
     ("name.sub=1", "'name' is not a section")],
)
def test_bad_overrides_get_the_same_quality_of_error(tmp_path, override, expected):
    assert expected in error_of(write(tmp_path, MINIMAL), (override,))


def test_extends_deep_merges_and_resolves_paths_against_the_file_that_names_them(tmp_path):
    base_dir = tmp_path / "shared"
    base_dir.mkdir()
    write(base_dir, MINIMAL + "training:\n  epochs: 3\n  learning_rate: 1.0e-4\nadapter:\n  r: 8\n", "base.yaml")
    child_dir = tmp_path / "exp"
    child_dir.mkdir()
    child = write(child_dir, "extends: ../shared/base.yaml\ntraining:\n  epochs: 1\n", "small.yaml")
    recipe = load_recipe(child)
    assert recipe.training.epochs == 1  # changed by the child
    assert recipe.training.learning_rate == 1e-4  # kept from the base (deep merge)
    assert recipe.adapter.r == 8 and recipe.adapter.alpha == 16
    assert recipe.data.train == str((base_dir / "train.jsonl").resolve())
    assert recipe.name == "small"  # a child is its own experiment


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "extends: b.yaml\n" + MINIMAL, "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    assert "extends forms a cycle" in error_of(tmp_path / "a.yaml")


def test_dumped_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL + "adapter:\n  target_modules: [q_proj, v_proj]\n"))
    dumped = write(tmp_path, dump_recipe(recipe), "resolved.yaml")
    assert load_recipe(dumped) == recipe


def test_validate_recipe_accepts_plain_dicts():
    recipe = validate_recipe({"name": "x", "model": {"path": "m"}, "data": {"train": "t.jsonl"}})
    assert recipe.adapter.alpha == 32
    assert os.path.basename(str(recipe.run_dir)) == "x"
