"""End-to-end training on tiny models built on the fly: the run folder, the adapter, and that it learned."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from lorafit import models
from lorafit.errors import LorafitError
from lorafit.recipe import load_recipe, validate_recipe
from lorafit.train import run_train

QUIET = Console(quiet=True)


# These runs train for real: 40 steps on batches of 8 (the tiny model learns the toy data), logged to tensorboard.
FORTY_STEPS = {"training": {"max_steps": 40, "batch_size": 8, "logging_steps": 5, "save_steps": 20},
               "output": {"report_to": ["tensorboard"]}}


def generate_answer(model, tokenizer, color: str) -> str:
    messages = [{"role": "user", "content": color}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.fixture(scope="module")
def trained_run(make_recipe, tmp_path_factory):
    """One real training run on a tiny Llama, shared by the assertions below."""
    from tiny_models import build_tiny_model, write_toy_dataset

    root = tmp_path_factory.mktemp("trained")
    model = build_tiny_model(root / "base", "llama")
    data = write_toy_dataset(root / "toy.jsonl", n=64)
    eval_data = write_toy_dataset(root / "toy_eval.jsonl", n=12, seed=1)
    base_weights = load_file(model / "model.safetensors")
    recipe = validate_recipe(make_recipe(model, data, root / "run", FORTY_STEPS, data={"eval": str(eval_data)}))
    result = run_train(recipe, QUIET)
    return {"result": result, "recipe": recipe, "model": model, "base_weights": base_weights, "run": root / "run"}


def test_run_folder_holds_exactly_the_record(trained_run):
    """A finished run folder holds exactly adapter/, recipe.yaml, metrics.json, README.md, loss.png, logs and the
    marker; the tensorboard log shows the loss going down."""
    run = trained_run["run"]
    assert sorted(p.name for p in run.iterdir()) == ["README.md", "adapter", "checkpoints", "logs", "lorafit.json",
                                                     "loss.png", "metrics.json", "recipe.yaml"]
    adapter_files = {p.name for p in (run / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= adapter_files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in adapter_files)  # safetensors only
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses][:2] == [1, 5] and losses[-1].value < losses[0].value  # logged every 5 steps
    assert "eval/loss" in events.Tags()["scalars"]
    card = (run / "README.md").read_text()
    assert "PeftModel" in card or "AutoPeftModelForCausalLM" in card
    assert "vllm" in card.lower() and "lorafit merge" in card
    assert "![train loss, eval loss and learning rate against step](loss.png)" in card
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (run / "loss.png").stat().st_size > 10_000


def test_resolved_recipe_in_run_folder_reproduces_the_run(trained_run):
    """The recipe.yaml written into the run folder loads back to the very Recipe that trained it."""
    assert load_recipe(trained_run["run"] / "recipe.yaml") == trained_run["recipe"]


def test_metrics_record_losses_speed_and_provenance(trained_run):
    """metrics.json records losses, speed, memory, versions, hardware, data sha256 and the precision auto picked;
    the loss fell 4x."""
    metrics = json.loads((trained_run["run"] / "metrics.json").read_text())
    for key in ("train_loss_final", "eval_loss", "tokens_per_second", "peak_memory_mb", "train_seconds", "versions",
                "hardware", "precision", "seed", "data_fingerprint", "trainable_params", "loss_history"):
        assert metrics[key] is not None, key
    # What `precision: auto` picks here: fp32 on a CPU without native bf16, bf16 on one with it (or on a GPU).
    assert metrics["precision"] == models.choose_precision("auto")[0].name
    assert metrics["global_step"] == 40
    assert all(len(digest) == 64 for digest in metrics["data_fingerprint"].values())
    losses = [e["loss"] for e in metrics["loss_history"] if "loss" in e]
    assert losses[-1] < losses[0] / 4, losses  # it learned


def test_adapter_loads_with_plain_peft_and_only_lora_weights_moved(trained_run):
    """The adapter loads with plain PEFT, answers the toy task, and the base weights are unchanged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = trained_run["run"] / "adapter"
    base = AutoModelForCausalLM.from_pretrained(trained_run["model"])
    model = PeftModel.from_pretrained(base, adapter_dir)
    state = model.state_dict()
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: it was trained
    for name, original in trained_run["base_weights"].items():
        matching = [v for k, v in state.items() if k.endswith(name.removesuffix(".weight") + ".base_layer.weight")
                    or k.endswith(name)]
        assert matching and torch.equal(matching[0], original), name  # base frozen
    # It learned the task and learned to stop: the answer is followed by end-of-turn, nothing else.
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    assert generate_answer(model, tokenizer, "red") == "apple<|im_end|>"
    assert generate_answer(model, tokenizer, "blue") == "sky<|im_end|>"


def test_finished_run_is_not_overwritten_without_the_flag(trained_run):
    """Training again into a finished run's folder is refused without --overwrite."""
    recipe = trained_run["recipe"]
    with pytest.raises(LorafitError, match="already holds a finished run.*--overwrite"):
        run_train(recipe, QUIET)


def test_dry_run_checks_everything_and_writes_nothing(make_recipe, tiny_llama, toy_data, tmp_path):
    """--dry-run loads data and model, reports parameters and samples, and creates no folder."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "dry", FORTY_STEPS))
    result = run_train(recipe, QUIET, dry_run=True)
    assert not (tmp_path / "dry").exists()
    assert result.trainable_params > 0 and result.report.train_examples == 64 and result.report.eos_trained
    assert result.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "mistral"])
def test_other_architectures_train(make_recipe, tiny_model_factory, toy_data, tmp_path, arch):
    """Qwen2, GPT-2 (Conv1D) and Mistral tiny models train with the attention preset."""
    model = tiny_model_factory(arch)
    recipe = validate_recipe(make_recipe(model, toy_data, tmp_path / "run", FORTY_STEPS, training={"max_steps": 3},
                                         adapter={"target_modules": "attention"}, output={"report_to": ["none"]}))
    result = run_train(recipe, QUIET)
    assert result.metrics.global_step == 3
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    if arch == "gpt2":
        assert result.target_modules == ["attn.c_proj", "c_attn"]  # Conv1D, and not mlp.c_proj


@pytest.mark.parametrize("method", ["ia3", "prefix", "dora"])
def test_other_peft_methods_train(make_recipe, tiny_llama, toy_data, tmp_path, method):
    """IA3, prefix tuning and DoRA train and save the matching PEFT adapter type."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", FORTY_STEPS, training={"max_steps": 2},
                      output={"report_to": ["none"]})
    # IA3 and prefix tuning have no rank or dropout: the LoRA settings would be refused, not ignored.
    raw["adapter"] = {**raw["adapter"], "use_dora": True} if method == "dora" else {"method": method}
    recipe = validate_recipe(raw)
    run_train(recipe, QUIET)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"ia3": "IA3", "prefix": "PREFIX_TUNING", "dora": "LORA"}[method]
    assert config.get("use_dora", False) == (method == "dora")


def test_qlora_4bit_trains_on_cpu(make_recipe, tiny_llama, toy_data, tmp_path):
    """A 4-bit QLoRA run trains on a CPU with finite losses and a non-zero lora_B."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", FORTY_STEPS,
                                         quantization={"bits": 4}, training={"max_steps": 6},
                                         output={"report_to": ["none"]}))
    result = run_train(recipe, QUIET)
    losses = [e["loss"] for e in result.metrics.loss_history if "loss" in e]
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "run" / "adapter")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in model.state_dict().items())


def test_qlora_gradients_survive_an_evaluation_pass(make_recipe, tiny_llama, toy_data, tmp_path):
    """A mid-training evaluation (eval mode, no grad) leaves every 4-bit layer trainable: the next backward gives
    each LoRA matrix the same gradient as before it. (bitsandbytes repacks 4-bit weights for a gradient-free kernel
    on AVX512-BF16 CPUs unless told not to; layer 0's LoRA matrices then got no gradient at all.)"""
    from lorafit import adapters

    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", quantization={"bits": 4},
                                         adapter={"init": "gaussian"}, training={"precision": "fp32"}))
    precision, _ = models.choose_precision("fp32")
    base = models.load_base_model(recipe, str(tiny_llama), precision)
    model = adapters.wrap_model(recipe, base, gradient_checkpointing=False)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))

    def lora_gradients():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() if p.grad is not None else None
                for n, p in model.named_parameters() if p.requires_grad}

    before = lora_gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = lora_gradients()
    assert all(g is not None for g in before.values())
    missing = [n for n, g in after.items() if g is None]
    assert not missing, missing
    assert all(torch.allclose(before[n], after[n], atol=1e-6) for n in before)


def test_target_modules_that_match_nothing_list_what_the_model_has(make_recipe, tiny_llama, toy_data, tmp_path):
    """target_modules matching nothing stop before any folder is made, listing the model's modules."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", FORTY_STEPS,
                                         adapter={"target_modules": ["qproj"]}))
    with pytest.raises(LorafitError, match="qproj match no module.*q_proj x2"):
        run_train(recipe, QUIET)
    assert not (tmp_path / "run").exists()


def test_cli_console_script_trains_and_reports_json(make_recipe, tiny_llama, toy_data, tmp_path):
    """The installed `lorafit` script trains with --set and --json and prints one JSON object with the adapter path."""
    recipe_file = tmp_path / "recipe.yaml"
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", FORTY_STEPS)
    recipe_file.write_text(json.dumps(raw))  # JSON is YAML
    proc = subprocess.run(["lorafit", "train", str(recipe_file), "--set", "training.max_steps=4", "--json"],
                          capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["ok"] and payload["metrics"]["global_step"] == 4
    assert Path(payload["adapter"]).joinpath("adapter_model.safetensors").exists()


def test_cli_user_errors_are_one_line_without_traceback(tmp_path):
    """A recipe mistake through `python -m lorafit` is exit 1 and one line, no traceback."""
    recipe_file = tmp_path / "bad.yaml"
    recipe_file.write_text("name: x\nmodel:\n  path: m\ndata:\n  train: t.jsonl\nadapter:\n  lora_r: 8\n")
    proc = subprocess.run([sys.executable, "-m", "lorafit", "train", str(recipe_file)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "adapter.lora_r: unknown key; did you mean 'r'?" in lines[0]
