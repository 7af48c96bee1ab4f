"""task: sequence-classification, end to end on a tiny BERT and a tiny Llama: train -> eval -> merge via the CLI.

Each architecture runs the three commands once (a module fixture); the tests read what they wrote. The toy task
(tests/tiny_models.py `write_classification_dataset`): rows of animal words vs food words, chance is 50%.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_tiny_model, write_classification_dataset
from typer.testing import CliRunner

from lorafit import checkpoints
from lorafit.cli import app
from lorafit.errors import LorafitError
from lorafit.recipe import load_recipe, validate_recipe

LABELS = ["animal", "food"]
HEADS = {"bert": "classifier", "llama": "score"}  # the head PEFT's SEQ_CLS task trains in full (modules_to_save)


# A classifier over LABELS: 30 steps on batches of 8 of the tiny data, max_length 32, no mid-run checkpoints.
CLASSIFIER = {"task": "sequence-classification", "data": {"max_length": 32},
              "training": {"max_steps": 30, "batch_size": 8, "logging_steps": 5, "save_steps": 1000}}


@pytest.fixture(scope="module", params=["bert", "llama"])
def run(make_recipe, request, tmp_path_factory) -> dict:
    """`lorafit train`, `eval` and `merge` of one classifier, through the CLI; their outputs for the tests below."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"classify-{arch}")
    # Llama configs define no pad token, and a decoder classifier reads the last token that is not padding: training
    # must give the model the tokenizer's pad id (BERT's config has one).
    base = build_tiny_model(root / "base", arch, **({"pad_token_id": None} if arch == "llama" else {}))
    train = write_classification_dataset(root / "train.jsonl", n=128, seed=0)
    held_out = write_classification_dataset(root / "eval.jsonl", n=24, seed=1)
    recipe_file = root / "recipe.yaml"
    raw = make_recipe(base, train, root / "run", CLASSIFIER, data={"eval": str(held_out)})
    recipe_file.write_text(json.dumps(raw))
    runner = CliRunner()
    env = {"COLUMNS": "200", "NO_COLOR": "1"}
    trained = runner.invoke(app, ["train", str(recipe_file)], env=env)
    assert trained.exit_code == 0, trained.output
    adapter = root / "run" / "adapter"
    evaluated = runner.invoke(app, ["eval", str(root / "run" / "recipe.yaml"), "--adapter", str(adapter)], env=env)
    assert evaluated.exit_code == 0, evaluated.output
    merged = runner.invoke(app, ["merge", str(adapter), "--out", str(root / "merged")], env=env)
    assert merged.exit_code == 0, merged.output
    return {"arch": arch, "head": HEADS[arch], "base": base, "run": root / "run", "adapter": adapter,
            "eval_file": held_out, "merged": root / "merged", "train_output": trained.output,
            "eval_output": evaluated.output, "merge_output": merged.output}


def eval_texts(path: Path) -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["text"] for r in rows], [LABELS.index(r["label"]) for r in rows]


def base_with_adapter(run: dict):
    """Base + adapter the plain PEFT way, the base built as the run did (its classes, the tokenizer's pad id, seed)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    tokenizer = AutoTokenizer.from_pretrained(run["adapter"])
    set_seed(42)  # the recipe's seed: the fresh head training started from
    base = AutoModelForSequenceClassification.from_pretrained(
        run["base"], num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
        pad_token_id=tokenizer.pad_token_id)
    return PeftModel.from_pretrained(base, run["adapter"]).eval(), tokenizer


def logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_training_learns_the_task_and_records_the_classes(run):
    """A classifier trains: the loss falls, eval accuracy and F1 >= 0.8, the classes are recorded in metrics, recipe
    and card."""
    metrics = json.loads((run["run"] / "metrics.json").read_text())
    losses = [e["loss"] for e in metrics["loss_history"] if "loss" in e]
    assert sum(losses[-2:]) / 2 < 0.6 * losses[0], losses  # the loss went down
    assert metrics["eval_accuracy"] >= 0.8 and metrics["eval_f1"] >= 0.8  # chance is 0.5
    assert metrics["labels"] == LABELS and metrics["label_counts"] == {"animal": 64, "food": 64}
    assert metrics["supervised_token_share"] is None
    recipe = load_recipe(run["run"] / "recipe.yaml")
    assert recipe.task == "sequence-classification" and recipe.data.labels == LABELS  # resolved from the data
    assert "eval accuracy" in run["train_output"]
    card = (run["run"] / "README.md").read_text()
    assert "AutoModelForSequenceClassification" in card and "eval accuracy" in card and "vllm" not in card.lower()


def test_adapter_holds_the_trained_head_and_the_base_is_unchanged(run):
    """The adapter saves the fully trained head (modules_to_save); the base weights stay as they were."""
    config = json.loads((run["adapter"] / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and run["head"] in config["modules_to_save"]
    assert not any(run["head"] in target for target in config["target_modules"])  # trained in full, not by LoRA
    saved = load_file(run["adapter"] / "adapter_model.safetensors")
    assert f"base_model.model.{run['head']}.weight" in saved
    model, tokenizer = base_with_adapter(run)  # plain PeftModel on AutoModelForSequenceClassification
    head = getattr(model.base_model.model, run["head"])
    assert not torch.allclose(head.original_module.weight, head.modules_to_save["default"].weight)  # it trained
    state = model.state_dict()
    for name, original in load_file(run["base"] / "model.safetensors").items():
        if name.startswith(("lm_head", run["head"])):
            continue  # the LM head is not part of a classifier; the classifier head is the trained one above
        module, leaf = name.rsplit(".", 1)
        matching = [v for k, v in state.items() if k.endswith((f"{module}.base_layer.{leaf}", name))]
        assert matching and torch.equal(matching[0], original), name  # base frozen
    texts, references = eval_texts(run["eval_file"])
    predicted = logits(model, tokenizer, texts).argmax(-1).tolist()
    assert sum(p == r for p, r in zip(predicted, references)) / len(texts) >= 0.8


def test_eval_reports_accuracy_and_f1_for_base_and_adapter(run):
    """eval reports loss, accuracy, macro-F1 and per-class counts for the base and the adapter, and each row's
    labels."""
    report = json.loads((run["run"] / "eval" / "report.json").read_text())
    assert report["task"] == "sequence-classification" and report["labels"] == LABELS and report["examples"] == 24
    base, tuned = report["scores"]
    assert (base["name"], tuned["name"]) == ("base", "run")
    for score in (base, tuned):
        assert score["accuracy"] is not None and score["f1"] is not None and score["loss"] is not None
        assert score["exact_match"] is None and score["perplexity"] is None
        assert sum(c["rows"] for c in score["per_class"].values()) == 24
    assert tuned["accuracy"] >= 0.8 and tuned["loss"] < base["loss"]
    # The same rows training evaluated on: the same accuracy.
    metrics = json.loads((run["run"] / "metrics.json").read_text())
    assert tuned["accuracy"] == pytest.approx(metrics["eval_accuracy"])
    rows = [json.loads(line) for line in (run["run"] / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]) == {"text", "reference", "base", "run"}
    assert all(row["base"] in LABELS and row["run"] in LABELS for row in rows)
    assert "accuracy" in run["eval_output"] and "macro-F1" in run["eval_output"]
    assert "never trained" in run["eval_output"] or "own classifier head" in run["eval_output"]


def test_merged_model_loads_in_plain_transformers_and_matches_base_plus_adapter(run):
    """The merged classifier loads in plain transformers with its classes and pad id and matches base+adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = AutoModelForSequenceClassification.from_pretrained(run["merged"])
    tokenizer = AutoTokenizer.from_pretrained(run["merged"])
    assert merged.config.id2label == dict(enumerate(LABELS)) and merged.config.label2id == {"animal": 0, "food": 1}
    assert merged.config.pad_token_id == tokenizer.pad_token_id is not None
    assert not any("lora" in name or "modules_to_save" in name for name, _ in merged.named_parameters())
    texts, _ = eval_texts(run["eval_file"])
    got = logits(merged.eval(), tokenizer, texts)  # a padded batch: the decoder finds each row's last real token
    model, _ = base_with_adapter(run)
    assert torch.allclose(got, logits(model, tokenizer, texts), atol=1e-4)
    assert torch.allclose(got[:2], torch.cat([logits(merged, tokenizer, [t]) for t in texts[:2]]), atol=1e-4)
    assert "AutoModelForSequenceClassification" in (run["merged"] / "README.md").read_text()
    assert json.loads((run["merged"] / "merge.json").read_text())["labels"] == LABELS


def test_inspect_shows_the_head_as_trained_fully(run):
    """inspect-modules shows the classifier head as trained fully and counts what training reported."""
    from lorafit.inspect_modules import run_inspect

    result = run_inspect(run["run"] / "recipe.yaml")
    assert result.architecture.endswith("ForSequenceClassification")
    assert result.modules_to_save == [run["head"]]
    assert [g.pattern for g in result.groups if g.saved] == [run["head"]]
    metrics = json.loads((run["run"] / "metrics.json").read_text())
    assert result.trainable_params == metrics["trainable_params"]  # the figure training reported


def test_mismatched_adapters_are_refused_before_loading_weights(run, tmp_path):
    """A classifier adapter under a causal recipe (and the other way round) is refused before weights load."""
    from lorafit.evaluate import run_eval
    from lorafit.merge import AdapterSpec, MergeOptions, run_merge

    recipe = load_recipe(run["run"] / "recipe.yaml")
    swapped = recipe.model_copy(update={"data": recipe.data.model_copy(update={"labels": ["food", "animal"]})})
    with pytest.raises(LorafitError, match=r"trained on the classes \['animal', 'food'\]"):
        run_eval(swapped, [run["adapter"]], out_dir=tmp_path / "e")
    causal = recipe.model_copy(update={"task": "causal-lm", "data": recipe.data.model_copy(update={"labels": None})})
    with pytest.raises(LorafitError, match="is a sequence-classification adapter, but the recipe's task is causal-lm"):
        run_eval(causal, [run["adapter"]], out_dir=tmp_path / "e")
    with pytest.raises(LorafitError, match="cannot be combined or re-weighted"):
        run_merge(MergeOptions([AdapterSpec(run["adapter"], 0.5)], tmp_path / "m"))
    assert not (tmp_path / "e").exists() and not (tmp_path / "m").exists()


def test_a_label_outside_data_labels_is_a_one_line_error(make_recipe, tiny_llama, tmp_path):
    """A row whose label is not in data.labels is one line naming the row and the classes."""
    train = write_classification_dataset(tmp_path / "train.jsonl", n=6,
                                         extra_rows=({"text": "the dog and the milk", "label": "both"},))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps(make_recipe(tiny_llama, train, tmp_path / "run", CLASSIFIER,
                                                  data={"labels": LABELS})))
    result = CliRunner().invoke(app, ["train", str(recipe_file)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.train: ")
    assert "row 7: label 'both' is not one of the classes (animal, food)" in lines[0]
    assert not (tmp_path / "run").exists()


def test_the_resume_fingerprint_tells_the_tasks_apart(make_recipe, tmp_path):
    """The resume fingerprint records the task, so a classifier's checkpoints never resume a causal run."""
    raw = make_recipe("model", tmp_path / "train.jsonl", tmp_path / "run", CLASSIFIER, data={"labels": LABELS})
    classifier = validate_recipe(raw)
    causal = validate_recipe({**raw, "task": "causal-lm", "data": {"train": raw["data"]["train"]}})
    assert checkpoints.fingerprint(classifier, {})["recipe"]["task"] == "sequence-classification"
    # Causal-LM runs keep the fingerprint they had before `task` existed, so they still resume.
    assert "task" not in checkpoints.fingerprint(causal, {})["recipe"]
