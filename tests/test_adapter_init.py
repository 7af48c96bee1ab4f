"""adapter.init loftq, eva and corda: what each start does, that training and merging then use the right base, and
the combinations refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from safetensors.torch import load_file
from run_signals import signal_at_step
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafit import adapter_init, adapters, models
from lorafit.errors import LorafitError
from lorafit.merge import AdapterSpec, MergeOptions, run_merge
from lorafit.recipe import validate_recipe
from lorafit.train import run_train

PROMPT = torch.tensor([[1, 40, 41, 42, 43, 44, 2, 1, 50, 51, 60, 61]])
# `auto` is bf16 on a CPU with native bf16, and comparisons want fp32 without dropout noise.
FP32 = {"training": {"precision": "fp32"}, "adapter": {"dropout": 0.0}}
QLORA = {"quantization": {"bits": 4}}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT).logits[0].float()


def wrapped(recipe, tokenizer=None, train=None):
    """The recipe's base model wrapped as train wraps it (eva / corda read the first batches of `train`)."""
    source = models.resolve_model_source(recipe.model)
    precision = models.Precision("fp32", "cpu", "test")
    torch.manual_seed(0)
    base = models.load_base_model(recipe, source, precision, pad_token_id=0)
    batches = adapter_init.init_batches(recipe, tokenizer, train) if train is not None else None
    model = adapters.wrap_model(recipe, base, gradient_checkpointing=False, init_batches=batches)
    models.keep_4bit_layers_as_trained(model)  # the 4-bit numerics training sees, on any CPU
    return model


def prepared_rows(recipe):
    from lorafit.data import prepare_data

    tokenizer = models.load_tokenizer(recipe, models.resolve_model_source(recipe.model))
    return tokenizer, prepare_data(recipe, tokenizer).train


# ----------------------------------------------------------------------------------------------------
# Refused before any model loads


@pytest.mark.parametrize(("sections", "message"), [
    ({"adapter": {"init": "loftq"}}, "adapter.init: loftq starts the adapter by cancelling the 4-bit quantization"),
    ({"adapter": {"init": "loftq"}, "quantization": {"bits": 8}}, "set quantization.bits: 4"),
    ({"adapter": {"init": "corda"}, **QLORA}, "corda decomposes full-precision weights"),
    ({"adapter": {"init": "eva"}, "task": "dpo"}, "adapter.init: eva reads the first training batches as SFT rows"),
    ({"adapter": {"init": "corda"}, "task": "sequence-classification"}, "for task sequence-classification use"),
    ({"adapter": {"init_batches": 4}}, "adapter: init_batches: only init eva and corda read training batches"),
    ({"adapter": {"init": "eva", "use_dora": True}}, "adapter: use_dora: init eva sets A and B after PEFT"),
    ({"adapter": {"init": "loftq", "init_from": "runs/sft/adapter"}, **QLORA}, "init loftq would have nothing"),
    ({"adapter": {"method": "ia3", "init": "eva"}}, "init: not used by method: ia3"),
])
def test_combinations_that_cannot_work_are_refused_with_the_key_and_the_fix(make_recipe, sections, message):
    """Each init combination that cannot work fails validation with one line naming the key and what to do."""
    with pytest.raises(LorafitError) as caught:
        validate_recipe(make_recipe("m", "d.jsonl", **sections))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------------
# LoftQ


def test_loftq_start_is_closer_to_the_full_precision_model_than_the_4bit_base(tiny_llama, toy_data, make_recipe):
    """init loftq on a 4-bit base: base + adapter starts closer to the full-precision model (weights and logits)
    than the 4-bit base alone (init default: B = 0), and the saved adapter is a plain LoRA."""
    full = logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    plain = wrapped(validate_recipe(make_recipe(tiny_llama, toy_data, None, FP32, QLORA)))
    loftq = wrapped(validate_recipe(make_recipe(tiny_llama, toy_data, None, FP32, QLORA, adapter={"init": "loftq"})))
    start = adapter_init.start_of(loftq)
    error_plain = (logits(plain) - full).abs().mean().item()
    error_loftq = (logits(loftq) - full).abs().mean().item()
    print(f"mean |logit - full precision|: 4-bit base {error_plain:.4f}, 4-bit base + LoftQ start {error_loftq:.4f}; "
          f"{start.note}")
    assert error_loftq < 0.9 * error_plain
    assert "4-bit quantization error of 14 layers" in start.note  # 2 layers x 7 linear modules of the tiny Llama
    assert loftq.peft_config["default"].init_lora_weights is True  # reloads as it is on the 4-bit base


@pytest.fixture(scope="module")
def loftq_run(tmp_path_factory, tiny_llama, make_recipe) -> Path:
    """A finished QLoRA run started with init loftq (6 steps, fp32)."""
    from tiny_models import write_toy_dataset

    root = tmp_path_factory.mktemp("loftq")
    data = write_toy_dataset(root / "toy.jsonl", n=32)
    recipe = validate_recipe(make_recipe(tiny_llama, data, root / "run", FP32, QLORA, adapter={"init": "loftq"}))
    result = run_train(recipe, Console(quiet=True), quiet=True)
    assert result.metrics.train_loss_final < result.metrics.loss_history[0]["loss"]
    return root / "run" / "adapter"


def test_loftq_adapter_merges_into_the_dequantized_base_and_matches_the_trained_model(loftq_run, tiny_llama, tmp_path):
    """merge of a LoftQ run uses the de-quantized 4-bit weights (said in merge.json and the model card), and the
    merged model's logits equal the adapter on the 4-bit base it was trained on."""
    from transformers import BitsAndBytesConfig

    out = tmp_path / "merged"
    result = run_merge(MergeOptions([AdapterSpec(loftq_run)], out))
    assert result.base_weights == "dequantized" and "adapter.init loftq" in result.base_weights_reason
    assert list(result.qlora_fidelity) == ["dequantized"]
    record = json.loads((out / "merge.json").read_text())
    assert record["base_weights"] == "dequantized" and "loftq" in (out / "README.md").read_text()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32,
                                                                             quantization_config=quantization), loftq_run)
    models.keep_4bit_layers_as_trained(trained)
    merged = logits(AutoModelForCausalLM.from_pretrained(out))
    assert torch.allclose(merged, logits(trained), atol=1e-3)
    on_original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                            loftq_run)
    assert (logits(on_original) - logits(trained)).abs().max() > 100 * (merged - logits(trained)).abs().max()


def test_loftq_adapter_is_never_merged_into_the_original_weights(loftq_run, tmp_path):
    """A LoftQ adapter on any base but the de-quantized 4-bit weights it corrects (--base-weights original, a GGUF
    adapter for llama.cpp's own quantization) is refused before anything loads; nothing is written."""
    with pytest.raises(LorafitError, match="started with adapter.init loftq") as caught:
        run_merge(MergeOptions([AdapterSpec(loftq_run)], tmp_path / "out", base_weights="original"))
    assert "--base-weights dequantized" in str(caught.value)
    with pytest.raises(LorafitError, match="a llama.cpp base does not have"):
        run_merge(MergeOptions([AdapterSpec(loftq_run)], tmp_path / "out", fmt="gguf-adapter"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# EVA


def test_eva_start_comes_from_the_training_data_and_is_deterministic(tiny_llama, toy_data, make_recipe):
    """init eva: each LoRA A holds the principal directions of its layer's inputs (the trained tokens of the first
    batches), B is zero (the model starts as the base), and the same data gives the same start."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, None, FP32, adapter={"init": "eva", "r": 4},
                                         data={"max_length": 64}, training={"batch_size": 8}))
    tokenizer, train = prepared_rows(recipe)
    model = wrapped(recipe, tokenizer, train)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    again = wrapped(recipe, tokenizer, train)
    assert start.keys() == {n for n, _ in again.named_parameters() if "lora_A" in n}
    assert all(torch.equal(start[n], p) for n, p in again.named_parameters() if "lora_A" in n)

    # The inputs of one adapted layer on the same batches, at the trained positions, and their principal directions.
    name, layer = next((n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    seen = []
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(args[0].detach()))
    with torch.no_grad(), model.disable_adapter():
        for batch in adapter_init.init_batches(recipe, tokenizer, train):
            before = len(seen)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            keep = batch["attention_mask"].bool() & (batch["labels"] != -100)
            seen[before] = seen[before][keep]
    handle.remove()
    inputs = torch.cat(seen)
    directions = torch.linalg.svd(inputs - inputs.mean(0), full_matrices=False).Vh
    a = layer.lora_A["default"].weight.detach()
    # Cosines between the two subspaces (1 = the same directions); EVA's incremental PCA stops at 0.99 similarity
    # between batches, so the last directions are approximate (measured: 1.0, 0.999, 0.998, 0.94).
    overlap = torch.linalg.svdvals(a @ directions[: a.shape[0]].T)
    assert overlap.min() > 0.9 and overlap.mean() > 0.95, (name, overlap)
    assert all(not p.any() for n, p in model.named_parameters() if "lora_B" in n)
    with model.disable_adapter():
        base = logits(model)
    assert torch.allclose(logits(model), base)
    assert "adapter.init eva: A from the inputs of" in adapter_init.start_of(model).note


def test_eva_run_trains_and_its_adapter_reloads_with_plain_peft(tiny_llama, toy_data, make_recipe, tmp_path):
    """A run with init eva trains (loss falls), and the adapter, whose ranks EVA redistributed (rank_pattern saved),
    loads with plain PeftModel.from_pretrained with exactly the saved weights."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", FP32, adapter={"init": "eva"}))
    result = run_train(recipe, Console(quiet=True), quiet=True)
    assert result.metrics.train_loss_final < result.metrics.loss_history[0]["loss"]
    assert any("adapter.init eva" in note for note in result.notes)
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    saved = load_file(adapter / "adapter_model.safetensors")
    ranks = {name.split(".lora_A")[0].removeprefix("base_model.model."): tensor.shape[0]
             for name, tensor in saved.items() if ".lora_A" in name}
    assert config["init_lora_weights"] == "eva" and config["rank_pattern"]
    assert {n: r for n, r in ranks.items() if r != config["r"]} == config["rank_pattern"]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter)
    state = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    for name, tensor in saved.items():
        assert torch.equal(state[name.replace(".weight", ".default.weight")], tensor)


def test_eva_with_too_few_trained_tokens_per_batch_is_refused(tiny_llama, toy_data, make_recipe):
    """eva with batches holding fewer trained tokens than components stops with the knobs to turn (PEFT would cycle
    over them forever)."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, None, FP32, adapter={"init": "eva", "r": 64},
                                         training={"batch_size": 1}))
    tokenizer, train = prepared_rows(recipe)
    with pytest.raises(LorafitError, match="eva needs at least 128 trained tokens") as caught:
        wrapped(recipe, tokenizer, train)
    assert "training.batch_size" in str(caught.value)


# ----------------------------------------------------------------------------------------------------
# CorDA


def test_corda_start_keeps_the_model_and_saves_as_plain_lora_on_the_original_base(tiny_llama, toy_data, make_recipe,
                                                                                   tmp_path):
    """init corda: the base weights become a residual and the adapter holds the rest, so the model starts unchanged;
    after (simulated) training, the adapter saved as a plain LoRA of rank 2r on the original base gives exactly the
    trained model's logits with plain PeftModel.from_pretrained."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, None, FP32, adapter={"init": "corda", "r": 4}))
    tokenizer, train = prepared_rows(recipe)
    model = wrapped(recipe, tokenizer, train)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert torch.allclose(logits(model), logits(original), atol=1e-4)
    residual = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(residual, original.model.layers[0].self_attn.q_proj.weight, atol=1e-3)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():  # what training does: move the adapter
        if "lora_" in name:
            parameter.data += 0.05 * torch.randn_like(parameter)
    trained = logits(model)
    start = adapter_init.start_of(model)
    adapter_init.save_as_plain_lora(model, tmp_path / "adapter", start.corda_start, safe_serialization=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                         tmp_path / "adapter")
    assert torch.allclose(logits(reloaded), trained, atol=1e-4)
    assert not torch.allclose(trained, logits(original), atol=1e-2)


def test_corda_run_trains_exports_plain_lora_and_merges(tiny_llama, toy_data, make_recipe, tmp_path):
    """A run with init corda trains, writes a rank-2r plain LoRA that merge folds into the original base."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", FP32, adapter={"init": "corda"}))
    result = run_train(recipe, Console(quiet=True), quiet=True)
    assert result.metrics.train_loss_final < result.metrics.loss_history[0]["loss"]
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 16
    assert "saved converted to a plain LoRA of rank 16 (recipe r 8)" in (tmp_path / "run" / "README.md").read_text()
    merged = run_merge(MergeOptions([AdapterSpec(adapter)], tmp_path / "merged"))
    assert merged.base_weights == "original" and merged.max_logit_diff <= merged.tolerance
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template


def test_inspect_modules_counts_data_driven_inits_without_data(tiny_llama):
    """inspect-modules (meta device, no data) counts an init corda / eva adapter as the default start would be, and
    says that eva may move the count a little."""
    from lorafit.inspect_modules import run_inspect

    default = run_inspect(str(tiny_llama), ["adapter.r=4"])
    for init in ("corda", "eva"):
        result = run_inspect(str(tiny_llama), ["adapter.r=4", f"adapter.init={init}"])
        assert result.trainable_params == default.trainable_params
        assert any("adapter.init eva" in note for note in result.notes) == (init == "eva")


@pytest.mark.slow
@pytest.mark.parametrize("init", ["eva", "corda"])
def test_resume_of_a_data_driven_start_equals_an_uninterrupted_run(tiny_llama, toy_data, make_recipe, tmp_path,
                                                                   monkeypatch, init):
    """Interrupted at step 3 (SIGTERM) and resumed, an eva / corda run (whose start is recomputed from the same
    first rows on resume) exports the adapter an uninterrupted run exports."""
    import signal

    from lorafit.errors import Interrupted

    def recipe(out):
        return validate_recipe(make_recipe(tiny_llama, toy_data, out, FP32, adapter={"init": init}))

    run_train(recipe(tmp_path / "whole"), Console(quiet=True), quiet=True)
    signal_at_step(monkeypatch, 3, sig=signal.SIGTERM)
    with pytest.raises(Interrupted):
        run_train(recipe(tmp_path / "resumed"), Console(quiet=True), quiet=True)
    monkeypatch.undo()
    assert run_train(recipe(tmp_path / "resumed"), Console(quiet=True), quiet=True, resume=True).metrics.global_step == 6
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.allclose(whole[name], resumed[name], atol=1e-5), name


def test_inits_that_need_whole_weights_are_refused_under_zero3(tiny_llama, toy_data, make_recipe):
    """loftq / eva / corda under DeepSpeed ZeRO-3 (weights split across processes) stop with the alternatives."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, None, FP32, adapter={"init": "eva"}))
    base = models.load_base_model(recipe, str(tiny_llama), models.Precision("fp32", "cpu", "test"))
    with pytest.raises(LorafitError, match="DeepSpeed ZeRO-3 partitions.*use ZeRO-2 or FSDP"):
        adapters.wrap_model(recipe, base, gradient_checkpointing=False, zero3=True, init_batches=[{}])
