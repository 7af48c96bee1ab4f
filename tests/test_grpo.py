"""Task grpo / rloo on tiny models: online RL raises the reward, resumes exactly, evaluates the rewards, merges; and
every mistake in rewards, generation settings or prompts is one line before any model loads."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from cli_helpers import QUIET, adapter_weights, assert_one_line_error, cli, write_recipe
from run_signals import signal_at_step

from lorafit.errors import Interrupted, LorafitError
from lorafit.recipe import validate_recipe
from lorafit.train import run_train

pytestmark = pytest.mark.usefixtures("cli_in_this_process")

# A dense reward a random tiny model earns about half of: the share of even token ids in the completion.
EVEN_TOKENS = """
def even_tokens(completions, completion_ids, **kwargs):
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]
"""


def rl_recipe(make_recipe, model_dir: Path, data_file: Path, out: Path, reward_file: Path, /, **sections) -> dict:
    """12 GRPO steps on a tiny model: 16 completions per step (2 prompts x 8), 8 tokens each, the even-token reward."""
    return make_recipe(model_dir, data_file, out, {
        "task": "grpo", "rewards": [{"function": f"{reward_file}:even_tokens"}],
        "generation": {"num_generations": 8, "max_completion_length": 8},
        "training": {"batch_size": 16, "learning_rate": 5e-2, "max_steps": 12, "save_steps": 4}}, **sections)


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text(EVEN_TOKENS)
    return path


@pytest.fixture(scope="module")
def grpo_run(make_recipe, tiny_llama, reward_file, tmp_path_factory) -> dict:
    """One finished 12-step GRPO run (eval held out), shared by the tests that read it."""
    from tiny_models import write_toy_dataset

    folder = tmp_path_factory.mktemp("grpo")
    data = write_toy_dataset(folder / "toy.jsonl", n=40, fmt="messages")
    recipe = validate_recipe(rl_recipe(make_recipe, tiny_llama, data, folder / "run", reward_file, data={"eval": 0.2}))
    result = run_train(recipe, QUIET, allow_code=True)
    return {"recipe": recipe, "result": result, "run": folder / "run", "data": data, "folder": folder}


def test_grpo_raises_the_reward_and_records_it(grpo_run, tiny_llama):
    """The mean reward of the last steps beats the first steps'; LoRA B moved, the base did not; metrics.json keeps
    TRL's rollout metrics and the reward under its own name; the adapter loads with plain PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    history = [e for e in grpo_run["result"].metrics.loss_history if "reward" in e]
    first, last = [e["reward"] for e in history[:3]], [e["reward"] for e in history[-3:]]
    assert sum(last) / 3 > sum(first) / 3 + 0.15, [e["reward"] for e in history]
    metrics = json.loads((grpo_run["run"] / "metrics.json").read_text())
    assert metrics["rl"]["rewards/even_tokens/mean"] == history[-1]["rewards/even_tokens/mean"]
    assert {"reward", "reward_std", "completions/mean_length", "completions/clipped_ratio"} <= set(metrics["rl"])
    assert "preference" not in metrics and metrics["supervised_token_share"] is None
    weights = adapter_weights(grpo_run["run"])
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, grpo_run["run"] / "adapter")
    after = model.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k.replace("base_layer.", "")] if k in after else before[k])
               for k in before if "lora" not in k)


def test_runs_lists_an_rl_run_by_its_reward(grpo_run):
    """lorafit runs: an RL run's row carries its last mean reward (its loss says little), in the table and --json."""
    from typer.testing import CliRunner

    from lorafit.cli import app

    result = CliRunner().invoke(app, ["runs", str(grpo_run["folder"]), "--json"])
    row = json.loads(result.stdout)["runs"][0]
    assert row["train_reward"] == grpo_run["result"].metrics.rl["reward"]
    table = CliRunner().invoke(app, ["runs", str(grpo_run["folder"])]).stdout
    assert "reward " in table


def test_grpo_eval_scores_each_reward_base_vs_adapter(grpo_run):
    """eval on the held-out prompts: the reward table beside loss and exact match, the adapter's reward above the
    base's (the same reward it trained on, scored on its greedy answers); custom code needs --allow-code here too."""
    recipe = grpo_run["run"] / "recipe.yaml"
    code, lines = cli("eval", str(recipe), "--adapter", str(grpo_run["run"] / "adapter"), "--out",
                      str(grpo_run["folder"] / "eval-refused"))
    assert_one_line_error(code, lines, "rewards[0].function", "--allow-code")
    code, lines = cli("eval", str(recipe), "--adapter", str(grpo_run["run"] / "adapter"), "--allow-code", "--json",
                      "--out", str(grpo_run["folder"] / "eval"))
    assert code == 0, lines
    report = json.loads((grpo_run["folder"] / "eval" / "report.json").read_text())
    base, tuned = report["scores"]
    assert set(base["rewards"]) == {"reward", "even_tokens"}
    assert tuned["rewards"]["even_tokens"] > base["rewards"]["even_tokens"]
    assert base["exact_match"] is not None and report["task"] == "grpo"


def test_grpo_adapter_merges_into_a_plain_model(grpo_run, tmp_path):
    """merge: the RL adapter is a plain LoRA; merge.json records a causal LM and the logits check passes."""
    code, lines = cli("merge", str(grpo_run["run"] / "adapter"), "--out", str(tmp_path / "merged"))
    assert code == 0, lines
    record = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert record["task"] == "causal-lm" and record["max_logit_diff"] <= record["tolerance"]


def test_grpo_resume_equals_an_uninterrupted_run(grpo_run, tmp_path, monkeypatch):
    """SIGTERM at step 5 and --resume: the sampling RNG, data order and optimizer come back from the checkpoint, so
    the adapter equals the uninterrupted run's and no step runs twice."""
    recipe = grpo_run["recipe"].model_copy(update={"output": grpo_run["recipe"].output.model_copy(
        update={"dir": str(tmp_path / "run")})})
    signal_at_step(monkeypatch, 5, sig=signal.SIGTERM)
    with pytest.raises(Interrupted, match="interrupted at step 5; checkpoint saved"):
        run_train(recipe, QUIET, allow_code=True)
    monkeypatch.undo()
    resumed = run_train(recipe, QUIET, resume=True, allow_code=True)
    assert resumed.metrics.global_step == 12
    expected, got = adapter_weights(grpo_run["run"]), adapter_weights(tmp_path / "run")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name


def test_rloo_trains_on_the_same_recipe(make_recipe, tiny_llama, reward_file, toy_data, tmp_path):
    """task rloo: the same rows and rewards through TRL's RLOOTrainer; a run finishes and logs the reward."""
    raw = rl_recipe(make_recipe, tiny_llama, toy_data, tmp_path / "run", reward_file, task="rloo",
                    training={"max_steps": 2})
    result = run_train(validate_recipe(raw), QUIET, allow_code=True)
    assert result.metrics.global_step == 2 and result.metrics.rl["rewards/even_tokens/mean"] is not None


# ----------------------------------------------------------------------------------------------------
# Refused before compute


@pytest.mark.parametrize(("change", "expected"), [
    ({"rewards": [{"name": "exact_matc", "column": "answer"}]}, "rewards"),
    ({"rewards": []}, "rewards: task grpo learns from rewards"),
    ({"generation": {"num_generations": 3}}, "generation.num_generations: 3 must divide"),
    ({"training": {"batch_size": 6}}, "must divide the completions sampled per step, training.batch_size x grad_accum = 6"),
    ({"generation": {"max_completion_length": 64}}, "generation.max_completion_length: 64 leaves no room"),
    ({"rl": {"reference": "init-adapter"}}, "rl.reference: init-adapter needs adapter.init_from"),
    ({"task": "rloo", "rl": {"loss": "dr_grpo"}}, "rl.loss: task rloo has one loss"),
    ({"task": "causal-lm", "rewards": None, "generation": None, "rl": {"beta": 0.1}},
     "rl: only applies to task: grpo or rloo"),
    ({"data": {"packing": True}}, "data.packing: task grpo reads prompts"),
])
def test_recipe_mistakes_are_refused_by_key(make_recipe, tiny_llama, toy_data, tmp_path, reward_file, change,
                                            expected):
    """Wrong reward names, an empty reward list, group sizes that do not divide the batch, completions that leave no
    room for the prompt, settings of another task: `lorafit validate` names the key."""
    raw = rl_recipe(make_recipe, tiny_llama, toy_data, tmp_path / "run", reward_file)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        elif value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    code, lines = cli("validate", str(write_recipe(tmp_path / "r.yaml", raw)))
    assert_one_line_error(code, lines, expected)


def test_data_mistakes_are_refused_before_any_model_loads(make_recipe, tiny_llama, toy_data, tmp_path, reward_file,
                                                           no_model_load):
    """Custom code without --allow-code, a reward column the data lacks, prompts that do not fit: one line each from
    `train --dry-run`, naming the key, before the model is loaded."""
    raw = rl_recipe(make_recipe, tiny_llama, toy_data, tmp_path / "run", reward_file)
    code, lines = cli("train", str(write_recipe(tmp_path / "a.yaml", raw)), "--dry-run")
    assert_one_line_error(code, lines, "rewards[0].function", "runs Python code", "--allow-code")

    raw["rewards"] = [{"name": "exact_match", "column": "solution"}]
    code, lines = cli("train", str(write_recipe(tmp_path / "b.yaml", raw)), "--dry-run")
    assert_one_line_error(code, lines, "rewards[0].column", "needs column 'solution'")

    raw["rewards"] = [{"name": "exact_match", "column": "answer"}]
    raw["data"]["max_length"], raw["generation"]["max_completion_length"] = 12, 8
    code, lines = cli("train", str(write_recipe(tmp_path / "c.yaml", raw)), "--dry-run")
    assert_one_line_error(code, lines, "data.train", "no usable prompts remain", "prompt longer than")


def test_dry_run_shows_prompts_and_counts_what_was_dropped(make_recipe, tiny_llama, tmp_path, reward_file):
    """Rows with text prompts and an answer column, one without a prompt: the dry run keeps the rest, names the drop
    and the rewards, and renders a prompt as generation will see it."""
    rows = [{"prompt": f"say {i}", "answer": str(i)} for i in range(6)] + [{"prompt": "", "answer": "x"}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw = rl_recipe(make_recipe, tiny_llama, data, tmp_path / "run", reward_file,
                    rewards=[{"name": "exact_match", "column": "answer"}, {"name": "max_length", "tokens": 4}])
    result = run_train(validate_recipe(raw), QUIET, dry_run=True)
    report = result.report
    assert report.train_examples == 6 and sum(report.dropped.values()) == 1
    assert report.rewards == ["exact_match", "max_length"]
    assert "say 0" in report.samples[0][0][0] and report.samples[0][0][1] is False


def test_a_reward_that_fails_names_itself_and_the_row(make_recipe, tiny_llama, toy_data, tmp_path):
    """A custom reward raising inside training ends the run with the reward's name, the row and the user's own
    frame, no adapter exported."""
    broken = tmp_path / "broken.py"
    broken.write_text("def even_tokens(completions, **kwargs):\n    raise ValueError('cannot score this')\n")
    raw = rl_recipe(make_recipe, tiny_llama, toy_data, tmp_path / "run", broken, training={"max_steps": 1})
    with pytest.raises(LorafitError) as caught:
        run_train(validate_recipe(raw), QUIET, allow_code=True)
    text = str(caught.value)
    assert "even_tokens" in text and "cannot score this" in text and "broken.py" in text
    assert not (tmp_path / "run" / "adapter").exists()
