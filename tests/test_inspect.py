"""inspect-modules: from a config alone (meta device), counts equal PEFT's own on the real model."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from tiny_models import REAL_PARAM_COUNTS, build_config_only, build_tiny_model

from lorafit.errors import LorafitError
from lorafit.inspect_modules import run_inspect

# The modules each preset must pick, written out by hand per architecture (not derived from lorafit).
EXPECTED_TARGETS = {
    ("llama", "attention"): ["q_proj", "k_proj", "v_proj", "o_proj"],
    ("llama", "all-linear"): ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ("qwen2", "attention"): ["q_proj", "k_proj", "v_proj", "o_proj"],
    ("mistral", "all-linear"): ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ("gemma", "all-linear"): ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ("phi3", "attention"): ["qkv_proj", "o_proj"],
    ("phi3", "all-linear"): ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ("gpt2", "attention"): ["c_attn", "attn.c_proj"],
    ("gpt2", "all-linear"): ["c_attn", "c_proj", "c_fc"],
}


def _peft_counts_on_real_model(folder: Path, targets: list[str], r: int, **lora) -> tuple[int, int]:
    """PEFT's own figures on the real (randomly initialised, CPU) model built from the same config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM", **lora)
    return get_peft_model(model, config).get_nb_trainable_parameters()


@pytest.mark.parametrize(("arch", "preset"), sorted(EXPECTED_TARGETS))
def test_counts_equal_peft_on_the_real_model(tmp_path, arch, preset):
    folder = build_config_only(tmp_path / arch, arch)
    assert [p.name for p in folder.iterdir()] == ["config.json"]  # nothing else to read
    result = run_inspect(str(folder), [f"adapter.target_modules={preset}", "adapter.r=4"])
    expected = EXPECTED_TARGETS[(arch, preset)]
    assert sorted(result.target_modules) == sorted(expected)
    assert (result.trainable_params, result.total_params) == _peft_counts_on_real_model(folder, expected, r=4)
    assert result.presets[preset] == result.target_modules


def test_recipe_options_are_counted_like_training_would(make_recipe, tmp_path):
    """layers_to_transform, DoRA and modules_to_save all change the count; PEFT must agree on each."""
    folder = build_config_only(tmp_path / "llama", "llama")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(make_recipe(
        folder, "unused.jsonl", adapter={"r": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True,
                                         "layers_to_transform": [1], "modules_to_save": ["lm_head"]},
    )))
    result = run_inspect(recipe)
    assert result.adapter_source == "recipe"
    expected = _peft_counts_on_real_model(folder, ["q_proj", "v_proj"], r=8, use_dora=True, layers_to_transform=[1],
                                          modules_to_save=["lm_head"])
    assert (result.trainable_params, result.total_params) == expected
    targeted = {g.pattern for g in result.groups if g.targeted}
    assert targeted == {"model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.v_proj"}


def test_published_llama_shapes_match_known_figures(tmp_path):
    folder = build_config_only(tmp_path / "1b", "llama", "llama-3.2-1b")
    result = run_inspect(str(folder), ["adapter.target_modules=[q_proj,k_proj,v_proj,o_proj]"])
    assert result.trainable_params == 3_407_872  # the figure PEFT prints for Llama-3.2-1B, r=16, q/k/v/o
    assert result.base_params == REAL_PARAM_COUNTS["llama-3.2-1b"]
    assert result.total_params == REAL_PARAM_COUNTS["llama-3.2-1b"] + 3_407_872


def test_a_70b_config_only_folder_is_inspected_in_seconds(tmp_path):
    folder = build_config_only(tmp_path / "70b", "llama", "llama-70b")
    started = time.perf_counter()
    # fp32 as this machine's precision whatever the CPU, so the rows compared below are fp32 and bf16 (a GPU).
    result = run_inspect(str(folder), ["training.precision=fp32"])
    assert time.perf_counter() - started < 60  # ~2 s on 2 cores; no 140 GB of weights are touched
    assert result.base_params == REAL_PARAM_COUNTS["llama-70b"]
    assert result.trainable_params == 207_093_760  # r=16 on all seven linear layers x 80
    lora32 = next(m for m in result.memory if m.setup == "LoRA" and m.precision == "fp32")
    lora16 = next(m for m in result.memory if m.setup == "LoRA" and m.precision == "bf16")
    qlora16 = next(m for m in result.memory if m.setup.startswith("QLoRA") and m.precision == "bf16")
    assert qlora16.weights < lora16.weights < lora32.weights
    assert 35 * 2**30 < qlora16.weights < 45 * 2**30  # 4-bit 70B: ~0.52 byte/param + 16-bit embeddings/head
    assert lora16.weights == REAL_PARAM_COUNTS["llama-70b"] * 2
    assert lora16.adapter_states == 207_093_760 * 16  # fp32 weights + grads + two AdamW moments


def test_adapter_file_size_matches_what_peft_writes(tmp_path):
    base = build_tiny_model(tmp_path / "base", "llama")
    result = run_inspect(str(base), ["adapter.r=8", "adapter.target_modules=attention"])
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, target_modules=result.target_modules, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    written = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert result.adapter_file_bytes <= written < result.adapter_file_bytes + 16_384  # + the safetensors header


def test_module_tree_groups_layers_with_types_and_shapes(tmp_path):
    folder = build_config_only(tmp_path / "gpt2", "gpt2")
    result = run_inspect(str(folder))
    groups = {g.pattern: g for g in result.groups}
    c_attn = groups["transformer.h.*.attn.c_attn"]
    assert (c_attn.kind, c_attn.shape, c_attn.count, c_attn.eligible) == ("Conv1D", "64->192", 2, True)
    assert c_attn.presets == ["all-linear", "attention", "attention+mlp"] and c_attn.targeted
    assert groups["transformer.wte"].kind == "Embedding" and groups["transformer.wte"].shape == "512x64"
    assert not groups["transformer.h.*.ln_1"].eligible
    assert groups["lm_head"].eligible and not groups["lm_head"].presets  # heads are never in presets
    assert any("default adapter section" in note for note in result.notes)


def test_a_classifier_config_is_inspected_as_one(tmp_path):
    folder = build_config_only(tmp_path / "bert", "bert")
    result = run_inspect(str(folder), ["adapter.target_modules=[query,value]"])
    assert result.architecture == "BertForSequenceClassification"
    assert sorted(result.target_modules) == ["query", "value"]
    assert result.trainable_params > 2 * 2 * 16 * (64 + 64)  # LoRA on 2x2 modules + the classifier head


def test_bad_inputs_give_clean_errors(tmp_path):
    with pytest.raises(LorafitError, match="model folder not found"):
        run_inspect(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorafitError, match="no config.json"):
        run_inspect(str(tmp_path / "empty"))
    folder = build_config_only(tmp_path / "llama", "llama")
    with pytest.raises(LorafitError, match="qproj match no module.*q_proj x2"):
        run_inspect(str(folder), ["adapter.target_modules=[qproj]"])
    with pytest.raises(LorafitError, match="adapter.lora_r: unknown key"):
        run_inspect(str(folder), ["adapter.lora_r=8"])
    with pytest.raises(LorafitError, match="file not found"):
        run_inspect(tmp_path / "missing.yaml")


def test_cli_json_is_one_object_and_text_is_labelled_an_estimate(tmp_path):
    folder = build_config_only(tmp_path / "qwen2", "qwen2")
    proc = subprocess.run(["lorafit", "inspect-modules", str(folder), "--json"], capture_output=True, text=True,
                          env={**os.environ, "NO_COLOR": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["command"] == "inspect-modules" and payload["ok"]
    assert payload["trainable_params"] > 0 and 0 < payload["trainable_percent"] < 100
    assert set(payload["presets"]) == {"all-linear", "attention", "attention+mlp"}
    assert {m["setup"] for m in payload["memory"]} == {"LoRA", "QLoRA 4-bit"}

    from typer.testing import CliRunner

    from lorafit.cli import app

    text = CliRunner().invoke(app, ["inspect-modules", str(folder)], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert text.exit_code == 0, text.output
    assert "ESTIMATE" in text.output and "q_proj" in text.output and "no weights read" in text.output
    quiet = CliRunner().invoke(app, ["inspect-modules", str(folder), "--quiet"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert quiet.exit_code == 0 and quiet.output.strip().splitlines() == [  # the result line alone
        f"trainable parameters (counted by PEFT): {payload['trainable_params']:,} of {payload['total_params']:,} "
        f"({payload['trainable_percent']:.4f}%); adapter file ~" + quiet.output.split("~")[-1].strip()]
    error = CliRunner().invoke(app, ["inspect-modules", str(tmp_path / "nope" / "x")])
    assert error.exit_code == 1 and "Traceback" not in error.output
    assert error.output.strip().startswith("error:") and len(error.output.strip().splitlines()) == 1


def test_meta_counting_needs_no_memory_for_weights(tmp_path):
    """The 8B shape would need 16 GB in bf16; on the meta device nothing is allocated."""
    import resource

    folder = build_config_only(tmp_path / "8b", "llama", "llama-3.1-8b")
    result = run_inspect(str(folder), ["adapter.target_modules=[q_proj,k_proj,v_proj,o_proj]"])
    assert result.trainable_params == 13_631_488
    assert result.base_params == REAL_PARAM_COUNTS["llama-3.1-8b"]
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    assert peak_gib < 6, f"process peak {peak_gib:.1f} GiB"
