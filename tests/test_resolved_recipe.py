"""What is shown is what applies: the resolved recipe a run writes (recipe.yaml) and `--dry-run` prints lists the keys
the run's adapter method and task use, marks the defaults lorafit filled in, and loads back to the same recipe, so
`lorafit train runs/x/recipe.yaml` re-runs the run and --resume fingerprints match, also for runs written before.
"""

from __future__ import annotations

import pytest
import yaml
from cli_helpers import QUICK, write_recipe
from typer.testing import CliRunner

from lorafit import checkpoints
from lorafit.cli import app
from lorafit.recipe import dump_recipe, load_recipe, validate_recipe

ADALORA_KEYS = ("init_r:", "target_r:", "tinit:", "tfinal:", "deltaT:", "beta1:", "beta2:", "orth_reg_weight:")
OPTIONAL_SECTIONS = ("quantization:", "preference:", "rewards:", "generation:", "rl:")
CASES = {
    "lora": {},
    "adalora": {"adapter": {"method": "adalora", "init_r": 8, "target_r": 4}},
    "ia3": {"adapter": {"method": "ia3"}},
    "prefix": {"adapter": {"method": "prefix", "num_virtual_tokens": 8}},
    "qlora": {"quantization": {"bits": 4}},
    "dpo": {"task": "dpo"},
    "dpo-with-preference": {"task": "dpo", "preference": {"beta": 0.2}},
    "kto": {"task": "kto"},
    "classification": {"task": "sequence-classification", "data": {"labels": ["neg", "pos"]}},
    "system-prompt": {"template": {"system_prompt": 'Say "yes": #1\nthen stop'}},
}


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def _dumped(make_recipe, tmp_path, case: str):
    recipe = validate_recipe(make_recipe("m", str(tmp_path / "t.jsonl"), **CASES[case]))
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(recipe))
    return recipe, path


def test_a_lora_run_lists_no_adalora_schedule_and_no_section_it_does_not_use(make_recipe, tmp_path):
    """A LoRA causal-lm run's resolved recipe has no AdaLoRA schedule keys, no prefix-tuning key and none of the
    optional sections (quantization, preference, rewards, generation, rl) it does not use."""
    _, path = _dumped(make_recipe, tmp_path, "lora")
    lines = _lines(path.read_text())
    assert not [line for line in lines if line.startswith((*ADALORA_KEYS, "num_virtual_tokens:", *OPTIONAL_SECTIONS))]
    assert "r: 16  # default" in lines and "method: lora  # default" in lines


def test_each_method_and_task_lists_its_own_keys(make_recipe, tmp_path):
    """AdaLoRA lists its schedule and not r / use_dora / init; prefix tuning lists num_virtual_tokens and no
    target_modules; QLoRA lists quantization; a preference section given under dpo is listed, one left unset is
    named in a comment (writing its defaults would change the run's record)."""
    def lines(case):
        return _lines(_dumped(make_recipe, tmp_path, case)[1].read_text())

    adalora = lines("adalora")
    assert "init_r: 8" in adalora and "target_r: 4" in adalora and "tinit: 0  # default" in adalora
    assert not [line for line in adalora if line.startswith(("r:", "use_dora:", "init:", "use_rslora:"))]
    prefix = lines("prefix")
    assert "num_virtual_tokens: 8" in prefix and not [line for line in prefix if line.startswith("target_modules:")]
    assert "quantization:" in lines("qlora")
    assert "preference:" in lines("dpo-with-preference") and "beta: 0.2" in lines("dpo-with-preference")
    assert "# preference: not set; task dpo uses this section's defaults" in lines("dpo")


def test_defaults_are_marked_and_what_the_recipe_set_is_not(make_recipe, tmp_path):
    """'# default' follows exactly the values the recipe left at their defaults."""
    raw = make_recipe("m", str(tmp_path / "t.jsonl"), training={"learning_rate": 1e-4, "seed": 42})
    lines = _lines(dump_recipe(validate_recipe(raw)))
    assert "learning_rate: 0.0001" in lines and "seed: 42  # default" in lines and "name: tiny" in lines


@pytest.mark.parametrize("case", list(CASES))
def test_the_resolved_recipe_loads_back_to_the_same_run(make_recipe, tmp_path, case):
    """Loading the written recipe gives the same recipe as the full dump older lorafit wrote, and the same --resume
    fingerprint as the recipe it was written from: the re-run is the same run, and old runs' checkpoints resume."""
    recipe, path = _dumped(make_recipe, tmp_path, case)
    again = load_recipe(path)
    older = tmp_path / "older.yaml"  # what lorafit wrote before: every key of every section, null sections too
    older.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    assert again.model_dump() == load_recipe(older).model_dump()
    data = {"t.jsonl": "0" * 64}
    resolved = validate_recipe(recipe.model_dump(mode="json") | {"data": again.data.model_dump(mode="json")})
    assert checkpoints.fingerprint(again, data) == checkpoints.fingerprint(resolved, data)
    assert checkpoints.fingerprint(again, data) == checkpoints.fingerprint(load_recipe(older), data)


def test_dry_run_shows_the_recipe_as_it_applies(make_recipe, tiny_llama, toy_data, tmp_path, cli_in_this_process):
    """`train --dry-run` prints the resolved recipe with the defaults marked and no AdaLoRA schedule for LoRA."""
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK))
    result = CliRunner().invoke(app, ["train", str(recipe), "--dry-run"])
    text = result.stdout
    assert result.exit_code == 0, result.stderr
    assert "# default" in text and "tinit" not in text and "orth_reg_weight" not in text
