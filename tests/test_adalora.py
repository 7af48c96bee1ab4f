"""adapter.method: adalora: the recipe's rules, the rank budget run inside the training loop, the saved adapter (plain
PEFT, merge, eval, inspect-modules) and exact resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from run_signals import signal_at_step

from lorafit.errors import Interrupted, LorafitError
from lorafit.recipe import validate_recipe
from lorafit.train import run_train

QUIET = Console(quiet=True)
# 14 optimizer steps on batches of 8: 2 at full rank (tinit), pruning until step 10, 4 at the final ranks (tfinal).
# `r: 16` is the schema default (make_recipe sets r: 8 for LoRA), which adalora accepts as "not set".
ADALORA = {"adapter": {"method": "adalora", "r": 16, "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 4},
           "training": {"max_steps": 14, "batch_size": 8, "save_steps": 5}}
# The tiny Llama's adapted modules: q, k, v, o, gate, up, down in each of 2 layers.
MODULES = 14


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def adalora_run(make_recipe, tmp_path_factory):
    """One AdaLoRA run on a tiny Llama, with every update_and_allocate call recorded (step, gradients present)."""
    from peft.tuners.adalora import AdaLoraModel
    from tiny_models import build_tiny_model, write_toy_dataset

    root = tmp_path_factory.mktemp("adalora")
    model = build_tiny_model(root / "base", "llama")
    data = write_toy_dataset(root / "toy.jsonl", n=64)
    recipe = validate_recipe(make_recipe(model, data, root / "run", ADALORA))
    calls: list[tuple[int, bool]] = []
    original = AdaLoraModel.update_and_allocate

    def recording(self, global_step):
        lora = [p for n, p in self.model.named_parameters() if "lora_" in n and p.requires_grad]
        calls.append((global_step, bool(lora) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)))
        return original(self, global_step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AdaLoraModel, "update_and_allocate", recording)
        result = run_train(recipe, QUIET)
    return {"result": result, "recipe": recipe, "model": model, "data": data, "run": root / "run", "calls": calls,
            "base_weights": load_file(model / "model.safetensors")}


# ----------------------------------------------------------------------------------------------------
# The recipe


@pytest.mark.parametrize(("adapter", "message"), [
    ({"r": 8}, "adapter: r: not used by method: adalora, whose modules start at init_r and are pruned to an average of "
               "target_r; replace r: 8 with init_r (and target_r)"),
    ({"use_dora": True}, "adapter: use_dora: not used by method: adalora (only by method: lora)"),
    ({"use_rslora": True}, "adapter: use_rslora: not used by method: adalora (only by method: lora)"),
    ({"init": "pissa"}, "adapter: init: not used by method: adalora (only by method: lora)"),
    ({"num_virtual_tokens": 4}, "adapter: num_virtual_tokens: not used by method: adalora (only by method: prefix)"),
    ({"init_r": 8, "target_r": 8}, "adapter: target_r: adalora prunes each module from init_r down to an average of "
                                   "target_r, so target_r must be below init_r (got 8 and 8)"),
    ({"tinit": 4, "tfinal": 2}, "adapter.tinit / adapter.tfinal: the run has 6 optimizer steps (training.max_steps: "
                                "6), but tinit 4 + tfinal 2 leave no step for adalora to prune ranks in"),
    ({"init_from": "runs/sft/adapter"}, "adapter.init_from: method adalora starts every module at init_r and prunes "
                                        "from there, so it cannot continue a saved adapter"),
])
def test_settings_adalora_cannot_use_are_refused(make_recipe, tiny_llama, toy_data, tmp_path, adapter, message):
    """LoRA-only settings, a target above the start rank, a schedule longer than the run and a saved start are refused
    under method: adalora, each naming its key and the fix."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", {"adapter": {"method": "adalora", "r": 16}},
                      adapter=adapter)
    with pytest.raises(LorafitError) as info:
        validate_recipe(raw)
    assert message in str(info.value)


@pytest.mark.parametrize(("method", "key"), [("lora", "init_r"), ("lora", "tfinal"), ("ia3", "target_r"),
                                             ("prefix", "orth_reg_weight")])
def test_adalora_settings_are_refused_under_other_methods(make_recipe, tiny_llama, toy_data, method, key):
    """init_r, target_r, tinit, tfinal, deltaT, beta1/2 and orth_reg_weight are refused unless method: adalora."""
    raw = make_recipe(tiny_llama, toy_data, adapter={"method": method, key: 0.3 if key == "orth_reg_weight" else 1})
    with pytest.raises(LorafitError, match=rf"adapter: {key}: not used by method: {method} \(only by method: adalora\)"):
        validate_recipe(raw)


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_adalora_with_preference_tuning_is_refused(make_recipe, tiny_llama, toy_data, task):
    """TRL's DPO/KTO trainers add a second ("ref") adapter, which AdaLoRA cannot hold: refused with the reason."""
    raw = make_recipe(tiny_llama, toy_data, task=task, adapter={"method": "adalora"})
    with pytest.raises(LorafitError, match=rf"adapter.method: adalora is not supported with task: {task} .*one "
                                           "trainable adapter only"):
        validate_recipe(raw)


def test_alpha_defaults_to_twice_init_r_and_the_resolved_recipe_loads_again(make_recipe, tiny_llama, toy_data):
    """Under adalora alpha defaults to 2 x init_r (scale = alpha / init_r = 2, as for LoRA); the dumped recipe with
    every default written out validates again."""
    import yaml

    from lorafit.recipe import dump_recipe

    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, adapter={"method": "adalora", "init_r": 10}))
    assert recipe.adapter.alpha == 20 and recipe.adapter.r == 16
    assert validate_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_a_schedule_longer_than_the_epochs_is_refused_before_the_model_loads(make_recipe, tiny_llama, toy_data,
                                                                            tmp_path, monkeypatch):
    """With epochs (no max_steps) the step count comes from the data: 64 rows / batch 8 = 8 steps, too few for
    tinit 5 + tfinal 3; refused naming the keys and the count, before any weights load."""
    from lorafit import models

    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", ADALORA,
                      adapter={"tinit": 5, "tfinal": 3}, training={"max_steps": None, "epochs": 1})
    with pytest.raises(LorafitError, match=r"adapter: adapter.tinit / adapter.tfinal: the run has 8 optimizer steps "
                                           r"\(training.epochs 1 x 64 rows / \(batch_size 8 x grad_accum 1\)\)"):
        run_train(validate_recipe(raw), QUIET, dry_run=True)


def test_an_embedding_target_is_refused_naming_it(make_recipe, tiny_llama, toy_data, tmp_path):
    """AdaLoRA adapts linear layers only: an embedding in target_modules is refused, not a PEFT traceback."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", ADALORA, adapter={"target_modules": ["q_proj",
                                                                                                   "embed_tokens"]})
    with pytest.raises(LorafitError, match="adapter.target_modules: embed_tokens: method adalora adapts linear layers "
                                           "only"):
        run_train(validate_recipe(raw), QUIET, dry_run=True)


# ----------------------------------------------------------------------------------------------------
# Training


def test_update_and_allocate_runs_once_per_optimizer_step_with_gradients(adalora_run):
    """PEFT's update_and_allocate runs once per optimizer step, steps counted 1..14, while the adapter's gradients
    are still there (after backward, before zero_grad); the schedule spans the run's 14 steps."""
    assert [step for step, _ in adalora_run["calls"]] == list(range(1, 15))
    assert all(has_grads for _, has_grads in adalora_run["calls"])
    config = json.loads((adalora_run["run"] / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["total_step"], config["init_r"], config["target_r"]) == ("ADALORA", 14, 6, 2)


def test_ranks_are_pruned_to_the_target_budget(adalora_run):
    """After tfinal the total rank is target_r x modules (28), not init_r x modules (84), shared unevenly by
    importance; the saved matrices have exactly those ranks, and metrics.json and the model card report them."""
    config = json.loads((adalora_run["run"] / "adapter" / "adapter_config.json").read_text())
    ranks = {name.removesuffix(".lora_E"): sum(kept) for name, kept in config["rank_pattern"].items()}
    assert len(ranks) == MODULES and sum(ranks.values()) == 2 * MODULES < 6 * MODULES
    assert len(set(ranks.values())) > 1  # not the same rank everywhere: that is the point of AdaLoRA
    weights = _adapter_weights(adalora_run["run"] / "adapter")
    for module, rank in ranks.items():
        assert weights[f"base_model.model.{module}.lora_E"].shape == (rank, 1)
        assert weights[f"base_model.model.{module}.lora_A"].shape[0] == rank
        assert weights[f"base_model.model.{module}.lora_B"].shape[1] == rank
    metrics = json.loads((adalora_run["run"] / "metrics.json").read_text())
    assert metrics["adapter_ranks"] == ranks
    assert f"ranks pruned from init_r 6 to {sum(ranks.values())} in all" in (adalora_run["run"] / "README.md").read_text()


def test_the_adapter_learned_and_the_base_stayed_frozen(adalora_run):
    """The loss went down, the singular values (zero at the start) moved, and every base weight is unchanged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    losses = [e["loss"] for e in adalora_run["result"].metrics.loss_history if "loss" in e]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.85, losses
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adalora_run["model"]),
                                      adalora_run["run"] / "adapter")
    state = model.state_dict()
    singular_values = [v for k, v in state.items() if "lora_E" in k and v.numel()]
    assert singular_values and all(v.abs().sum() > 0 for v in singular_values)
    for name, original in adalora_run["base_weights"].items():
        matching = [v for k, v in state.items() if k.endswith(name.removesuffix(".weight") + ".base_layer.weight")
                    or k.endswith(name)]
        assert matching and torch.equal(matching[0], original), name


def test_the_pruned_adapter_loads_in_plain_peft_with_the_trained_logits(adalora_run):
    """The exported adapter (cut to its rank pattern) loaded with plain PeftModel.from_pretrained gives the logits of
    the full-rank model as training left it (the last checkpoint, pruned triplets masked to zero)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 14, 22, 31, 40, 7]])
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adalora_run["model"]),
                                         adalora_run["run"] / "adapter")
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adalora_run["model"]),
                                        adalora_run["run"] / "checkpoints" / "checkpoint-14")
    full = _adapter_weights(adalora_run["run"] / "checkpoints" / "checkpoint-14")
    assert all(v.shape[0] == 6 for k, v in full.items() if k.endswith("lora_E"))  # the checkpoint is full rank
    bare = _logits(AutoModelForCausalLM.from_pretrained(adalora_run["model"]), ids)
    got, want = _logits(exported, ids), _logits(trained, ids)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, bare, atol=1e-3)


def test_merge_and_eval_work_on_the_adapter(adalora_run, tmp_path):
    """`lorafit merge` folds the pruned AdaLoRA adapter into the base (verified against base+adapter), the merged
    model loads in plain transformers with the same logits, and `lorafit eval` scores it beside the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.evaluate import run_eval
    from lorafit.merge import AdapterSpec, MergeOptions, run_merge
    from lorafit.recipe import load_recipe

    result = run_merge(MergeOptions([AdapterSpec(adalora_run["run"] / "adapter")], tmp_path / "merged"))
    assert result.max_logit_diff <= result.tolerance and result.adapter_effect > 0
    ids = torch.tensor([[1, 5, 9, 14, 22, 31, 40, 7]])
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids)
    attached = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adalora_run["model"]),
                                                 adalora_run["run"] / "adapter"), ids)
    assert torch.allclose(merged, attached, atol=1e-4)
    recipe = load_recipe(adalora_run["run"] / "recipe.yaml")
    scores = run_eval(recipe, [adalora_run["run"] / "adapter"], data_file=adalora_run["data"], samples=4,
                      out_dir=tmp_path / "eval").scores
    assert [s.name for s in scores] == ["base", "run"] and scores[1].loss < scores[0].loss


def test_the_regulariser_is_added_to_lorafits_own_loss(make_recipe, tiny_llama, toy_data, tmp_path):
    """lorafit's causal-LM loss is computed outside the model, where AdaLoraModel.forward cannot add its orthogonal
    regulariser: the trainer adds it (once per optimizer step), with the value PEFT itself adds to a model loss."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from lorafit.adalora import orthogonal_regularisation
    from lorafit.adapters import build_peft_config
    from lorafit.data import prepare_data
    from lorafit.loss import trained_positions_loss
    from lorafit.training_loop import SFTTrainer

    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", ADALORA,
                                         training={"grad_accum": 2}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = get_peft_model(base, build_peft_config(recipe.adapter, base, total_step=14))
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=64, use_cpu=True, bf16=False, report_to="none",
                     per_device_train_batch_size=4, gradient_accumulation_steps=2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=prepare_data(recipe, tokenizer).train,
                         processing_class=tokenizer, adapter=recipe.adapter)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    trainer.current_gradient_accumulation_steps = 2
    regulariser = orthogonal_regularisation(model)
    assert regulariser > 0.1
    # A micro-batch loss the Trainer divides by the 2 accumulation steps itself: the term is added whole.
    loss = trainer.compute_loss(model, dict(batch))
    assert torch.allclose(loss, trained_positions_loss(model, dict(batch)) + 0.5 * regulariser, atol=1e-5)
    # A loss already normalised over the whole step (num_items_in_batch): the term is halved, once per step in all.
    trainer.model_accepts_loss_kwargs, tokens = True, int((batch["labels"] != -100).sum()) * 2
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=tokens)
    assert torch.allclose(loss, trained_positions_loss(model, dict(batch), tokens) + 0.5 * regulariser / 2, atol=1e-5)
    # The value PEFT adds when the model computes its loss from labels itself:
    with_labels = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["input_ids"]).loss
    model.peft_config["default"].orth_reg_weight = 0.0
    without = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss
    assert torch.allclose(with_labels - without, 0.5 * regulariser, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Resume


def test_resume_equals_an_uninterrupted_run(adalora_run, make_recipe, tmp_path, monkeypatch):
    """Stopped at step 7 (mid-pruning: the importance scores and masks matter) and resumed, the run ends with the
    uninterrupted run's adapter and rank pattern; the checkpoint held the full-rank matrices and the allocator."""
    recipe = validate_recipe(make_recipe(adalora_run["model"], adalora_run["data"], tmp_path / "run", ADALORA))
    signal_at_step(monkeypatch, 7, sig=signal.SIGTERM)
    with pytest.raises(Interrupted, match="interrupted at step 7; checkpoint saved"):
        run_train(recipe, QUIET)
    monkeypatch.undo()
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-7"
    state = load_file(checkpoint / "adalora_state.safetensors")
    assert any(k.startswith("exp_avg_ipt/") for k in state)
    assert all(v.shape[0] == 6 for k, v in _adapter_weights(checkpoint).items() if k.endswith("lora_E"))
    resumed = run_train(recipe, QUIET, resume=True)
    assert resumed.metrics.global_step == 14
    expected, got = _adapter_weights(adalora_run["run"] / "adapter"), _adapter_weights(tmp_path / "run" / "adapter")
    assert expected.keys() == got.keys()
    for name in expected:
        assert expected[name].shape == got[name].shape and torch.allclose(expected[name], got[name], atol=1e-6), name
    pattern = [json.loads((run / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
               for run in (adalora_run["run"], tmp_path / "run")]
    assert pattern[0] == pattern[1]


# ----------------------------------------------------------------------------------------------------
# The other paths: a 16-bit base, classification, GGUF, inspect-modules


def test_only_the_triplets_train_on_a_16_bit_base(make_recipe, tiny_llama, toy_data):
    """On a bf16 base PEFT's upcast of the adapter re-creates ranknum (the fixed rank each delta is divided by) as a
    trainable parameter, which is never saved; lorafit keeps it frozen, so only A, E and B train."""
    from transformers import AutoModelForCausalLM

    from lorafit.adapters import wrap_model

    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, adapter={"method": "adalora"}))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    model = wrap_model(recipe, base, gradient_checkpointing=False, precision="bf16", total_steps=10)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.split(".")[-2] in ("lora_A", "lora_B", "lora_E") for name in trainable)
    assert any(".ranknum." in name for name, _ in model.named_parameters())


def test_a_classifier_trains_with_adalora(make_recipe, tiny_model_factory, tmp_path):
    """sequence-classification with adalora: the head is trained fully beside the pruned triplets, the schedule runs
    (the plain Trainer's model loss carries PEFT's regulariser) and the adapter loads in plain PEFT."""
    from peft import PeftModel
    from tiny_models import write_classification_dataset
    from transformers import AutoModelForSequenceClassification

    base = tiny_model_factory("llama", pad_token_id=None)
    train = write_classification_dataset(tmp_path / "train.jsonl", n=64, seed=0)
    raw = make_recipe(base, train, tmp_path / "run", ADALORA, task="sequence-classification",
                      data={"max_length": 32}, training={"max_steps": 10, "save_steps": 1000})
    result = run_train(validate_recipe(raw), QUIET)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert sum(sum(kept) for kept in config["rank_pattern"].values()) == 2 * MODULES
    assert sum(result.metrics.adapter_ranks.values()) == 2 * MODULES
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=0)
    assert PeftModel.from_pretrained(model, tmp_path / "run" / "adapter").peft_config["default"].peft_type == "ADALORA"


def test_the_pruned_adapter_exports_to_a_gguf_lora_file(adalora_run, tmp_path):
    """--format gguf-adapter writes each surviving module's B (A * E) * alpha / ranknum as a llama.cpp LoRA pair
    (modules pruned to rank 0 have none), verified against base + adapter by reading the file back (and in llama.cpp
    when it is installed)."""
    from lorafit.merge import AdapterSpec, MergeOptions, run_merge

    config = json.loads((adalora_run["run"] / "adapter" / "adapter_config.json").read_text())
    alive = sum(1 for kept in config["rank_pattern"].values() if any(kept))
    # f16, the default: llama.cpp (checked too when llama-cpp-python is installed) keeps its KV cache in f16, and on
    # this tiny model its base alone is further from torch's logits than f32's tolerance.
    result = run_merge(MergeOptions([AdapterSpec(adalora_run["run"] / "adapter")], tmp_path / "gguf",
                                    fmt="gguf-adapter"))
    assert result.gguf.max_logit_diff <= result.gguf.tolerance and result.gguf.tensors == alive
    assert (result.gguf.llama_cpp_max_logit_diff or 0.0) <= result.gguf.tolerance


def test_inspect_modules_counts_an_adalora_recipe(make_recipe, tiny_llama, toy_data, tmp_path):
    """inspect-modules on an adalora recipe counts the init_r triplets training holds (A, E and B per module), shows
    init_r / target_r instead of r, and says the saved adapter is pruned."""
    from lorafit.inspect_modules import run_inspect

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(make_recipe(tiny_llama, toy_data, adapter={"method": "adalora", "init_r": 4, "target_r": 2,
                                                                         "target_modules": ["q_proj"]})))
    result = run_inspect(recipe)
    hidden = 64  # tests/tiny_models.py: q_proj is 64 -> 64 in each of 2 layers
    assert result.trainable_params == 2 * (4 * hidden + 4 + hidden * 4)
    assert (result.adapter["init_r"], result.adapter["target_r"], result.adapter["r"]) == (4, 2, None)
    assert any("adalora: counted at init_r 4" in note for note in result.notes)


def test_qlora_adalora_trains_and_merges(make_recipe, adalora_run, tmp_path):
    """On a 4-bit base (PEFT's SVDLinear4bit) AdaLoRA trains and prunes, and merge folds it into 16/32-bit weights,
    verified against the trained QLoRA model."""
    from lorafit.merge import AdapterSpec, MergeOptions, run_merge

    raw = make_recipe(adalora_run["model"], adalora_run["data"], tmp_path / "run", ADALORA, quantization={"bits": 4},
                      adapter={"tinit": 1, "tfinal": 2}, training={"max_steps": 6, "batch_size": 4})
    result = run_train(validate_recipe(raw), QUIET)
    assert sum(result.metrics.adapter_ranks.values()) == 2 * MODULES
    merged = run_merge(MergeOptions([AdapterSpec(tmp_path / "run" / "adapter")], tmp_path / "merged"))
    assert merged.max_logit_diff <= merged.tolerance and merged.adapter_effect > 0


@pytest.mark.slow  # ~90 s on 2 shared cores: three processes each import torch, transformers, peft and datasets
@pytest.mark.skipif(__import__("shutil").which("torchrun") is None, reason="torchrun not installed")
def test_two_process_ddp_prunes_like_one_process(make_recipe, tiny_llama, toy_data_factory, tmp_path):
    """Under DDP (torchrun, 2 CPU processes x batch 4) every rank scores the same synchronised gradients, so the run
    ends with the rank pattern and adapter of 1 process x batch 8."""
    import subprocess
    import sys

    data = toy_data_factory(n=32)
    steps = {"training": {"max_steps": 6, "save_steps": 200, "precision": "fp32"}}
    adapter = {"method": "adalora", "r": 16, "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2}
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(json.dumps(make_recipe(tiny_llama, data, tmp_path / "run-one", steps, adapter=adapter,
                                          training={"batch_size": 8})))
    two.write_text(json.dumps(make_recipe(tiny_llama, data, tmp_path / "run-two", steps, adapter=adapter,
                                          training={"batch_size": 4})))
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "lorafit", "train", str(one), "--quiet"], env=env,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "lorafit", "train", str(two), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    patterns = [json.loads((tmp_path / run / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
                for run in ("run-one", "run-two")]
    assert patterns[0] == patterns[1]
    a, b = _adapter_weights(tmp_path / "run-one" / "adapter"), _adapter_weights(tmp_path / "run-two" / "adapter")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_eval_of_a_lora_and_an_adalora_adapter_together_is_refused(adalora_run, tmp_path):
    """PEFT cannot hold a LoRA and an AdaLoRA adapter beside one base: eval refuses the pair with one line (before,
    a traceback from deep inside PEFT) and says to run it once per method."""
    from tiny_models import write_lora_run

    from lorafit.evaluate import run_eval
    from lorafit.recipe import load_recipe

    lora = write_lora_run(tmp_path / "lora", adalora_run["model"], r=4, seed=7)
    recipe = load_recipe(adalora_run["run"] / "recipe.yaml")
    with pytest.raises(LorafitError, match=r"--adapter: the adapters are of different methods \(adalora and lora\)"):
        run_eval(recipe, [adalora_run["run"] / "adapter", lora], out_dir=tmp_path / "eval")


def test_lorafit_runs_shows_the_method_and_the_average_rank(adalora_run):
    """`lorafit runs` lists an AdaLoRA run as method adalora with r = target_r (its average rank once pruned)."""
    from lorafit.runs import run_runs

    rows, _ = run_runs([adalora_run["run"].parent])
    [row] = rows  # the base model's folder beside it is no run
    assert (row.method, row.r, row.alpha, row.status) == ("adalora", 2, 12.0, "finished")


def test_a_run_that_died_during_the_export_resumes_to_the_pruned_adapter(adalora_run, make_recipe, tmp_path,
                                                                         monkeypatch):
    """A crash after the last step's checkpoint (during the export): --resume only exports, with the final rank
    pattern read back from the checkpoint, so the adapter equals the uninterrupted run's, pruned the same way."""
    from lorafit import run_record

    recipe = validate_recipe(make_recipe(adalora_run["model"], adalora_run["data"], tmp_path / "run", ADALORA))

    def crash(*args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(run_record, "export_run", crash)
    with pytest.raises(RuntimeError, match="went away"):
        run_train(recipe, QUIET)
    monkeypatch.undo()
    assert run_train(recipe, QUIET, resume=True).metrics.global_step == 14
    configs = [json.loads((run / "adapter" / "adapter_config.json").read_text())
               for run in (adalora_run["run"], tmp_path / "run")]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]
    expected, got = _adapter_weights(adalora_run["run"] / "adapter"), _adapter_weights(tmp_path / "run" / "adapter")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
