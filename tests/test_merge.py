"""merge: adapter(s) -> a full model plain transformers loads, verified; QLoRA into a de-quantized base."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import build_tiny_model, write_lora_run
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lorafit import merge as merge_module
from lorafit import models
from lorafit.errors import LorafitError, RunFailed
from lorafit.merge import AdapterSpec, MergeOptions, parse_adapter_spec, run_merge

PROMPT = torch.tensor([[1, 40, 41, 42, 43, 44, 2, 1, 50, 51]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama and three adapters for it: two LoRA runs (ranks 4 and 4) and a QLoRA run."""
    root = tmp_path_factory.mktemp("merge")
    base = build_tiny_model(root / "base", "llama")
    return {
        "root": root,
        "base": base,
        "a": write_lora_run(root / "a", base, r=4, seed=1),
        "b": write_lora_run(root / "b", base, r=4, seed=2, target_modules=("q_proj", "v_proj", "down_proj")),
        "r8": write_lora_run(root / "r8", base, r=8, seed=3),
        "qlora": write_lora_run(root / "qlora", base, r=4, seed=4, quantization={"bits": 4}),
    }


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT).logits[0]


def base_plus_adapter(base: Path, adapter: Path, **load) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **load), adapter)
    models.keep_4bit_layers_as_trained(model)  # the 4-bit numerics the adapter was trained against, on any CPU
    return logits(model)


def test_merged_model_loads_in_plain_transformers_and_matches_base_plus_adapter(runs, tmp_path):
    out = tmp_path / "merged"
    result = run_merge(MergeOptions([AdapterSpec(runs["a"])], out))
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md", "merge.json"} <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no PEFT
    assert not any("lora" in name for name, _ in merged.named_parameters())
    expected = base_plus_adapter(runs["base"], runs["a"])
    assert torch.allclose(logits(merged), expected, atol=1e-4)
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(runs["base"])), expected, atol=1e-2)
    assert AutoTokenizer.from_pretrained(out).chat_template  # the training template travels with the model
    assert result.base == str(runs["base"])  # read back from the adapter; never re-typed
    assert result.max_logit_diff <= result.tolerance and result.top1_agreement == 1.0
    assert result.base_weights == "original" and result.peak_memory_mb > 0 and result.seconds > 0
    assert json.loads((out / "merge.json").read_text())["max_logit_diff"] == result.max_logit_diff
    assert "AutoModelForCausalLM" in (out / "README.md").read_text()


def test_sharded_output_loads(runs, tmp_path):
    out = tmp_path / "sharded"
    run_merge(MergeOptions([AdapterSpec(runs["a"])], out, max_shard_size="100KB"))
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out)),
                          base_plus_adapter(runs["base"], runs["a"]), atol=1e-4)


def test_qlora_adapter_merges_into_the_dequantized_base_by_default(runs, tmp_path):
    out = tmp_path / "qmerged"
    result = run_merge(MergeOptions([AdapterSpec(runs["qlora"])], out))
    assert result.base_weights == "dequantized" and "closer to the trained QLoRA model" in result.base_weights_reason
    assert result.qlora_fidelity["dequantized"] < result.qlora_fidelity["original"]
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # 32-bit, never 4-bit weights
    # What the adapter was trained against: the 4-bit base + adapter. The merged model reproduces it.
    quantized = base_plus_adapter(runs["base"], runs["qlora"], quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    assert torch.allclose(logits(merged), quantized, atol=1e-3)
    assert not torch.allclose(logits(merged), base_plus_adapter(runs["base"], runs["qlora"]), atol=1e-3)


def test_qlora_adapter_into_the_original_weights_on_request(runs, tmp_path):
    result = run_merge(MergeOptions([AdapterSpec(runs["qlora"])], tmp_path / "orig", base_weights="original"))
    assert result.base_weights == "original" and list(result.qlora_fidelity) == ["original"]
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "orig")),
                          base_plus_adapter(runs["base"], runs["qlora"]), atol=1e-4)


def test_weighted_merge_of_two_adapters(runs, tmp_path):
    specs = [parse_adapter_spec(f"{runs['a']}:0.7"), parse_adapter_spec(f"{runs['b']}:0.3")]
    assert [s.weight for s in specs] == [0.7, 0.3]
    result = run_merge(MergeOptions(specs, tmp_path / "cat", method="cat"))
    assert result.method == "cat" and [a["weight"] for a in result.adapters] == [0.7, 0.3]
    merged = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "cat"))
    # cat is exact: the merged delta is 0.7 * delta_a + 0.3 * delta_b; check it independently with PEFT.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["base"]), runs["a"], adapter_name="a")
    model.load_adapter(runs["b"], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="cat")
    model.set_adapter("ab")
    assert torch.allclose(merged, logits(model), atol=1e-4)
    assert not torch.allclose(merged, base_plus_adapter(runs["base"], runs["a"]), atol=1e-3)


def test_weighted_merge_to_one_combined_adapter(runs, tmp_path):
    out = tmp_path / "combined"
    specs = [AdapterSpec(runs["a"], 0.5), AdapterSpec(runs["b"], 0.5)]
    result = run_merge(MergeOptions(specs, out, method="ties", density=0.7, as_adapter=True))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= set(result.files)
    assert not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    assert config["base_model_name_or_path"] == str(runs["base"])
    reloaded = base_plus_adapter(runs["base"], out)
    assert not torch.allclose(reloaded, logits(AutoModelForCausalLM.from_pretrained(runs["base"])), atol=1e-3)
    # The combined adapter merges like any other one.
    run_merge(MergeOptions([AdapterSpec(out)], tmp_path / "from-combined"))
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "from-combined")), reloaded,
                          atol=1e-4)


def test_overwrite_replaces_only_what_merge_wrote(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LorafitError, match="not empty.*--overwrite"):
        run_merge(MergeOptions([AdapterSpec(runs["a"])], out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    run_merge(MergeOptions([AdapterSpec(runs["a"])], out, overwrite=True, max_shard_size="100KB"))
    run_merge(MergeOptions([AdapterSpec(runs["b"])], out, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(out.glob("model-*.safetensors"))  # the old shards of the first merge are gone
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out)),
                          base_plus_adapter(runs["base"], runs["b"]), atol=1e-4)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_failed_verification_writes_nothing(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(merge_module, "_TOLERANCE", {"float32": -1.0})
    with pytest.raises(RunFailed, match="verification failed.*nothing was written"):
        run_merge(MergeOptions([AdapterSpec(runs["a"])], tmp_path / "bad"))
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.tmp-*"))


def test_bad_inputs_give_clean_errors(runs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LorafitError, match="adapter folder not found"):
        run_merge(MergeOptions([AdapterSpec(tmp_path / "missing")], out))
    with pytest.raises(LorafitError, match="no adapter_config.json.*pass its adapter/ subfolder"):
        run_merge(MergeOptions([AdapterSpec(runs["a"].parent)], out))
    with pytest.raises(LorafitError, match="refusing to write the merged model into an input folder"):
        run_merge(MergeOptions([AdapterSpec(runs["a"])], runs["a"], overwrite=True))
    with pytest.raises(LorafitError, match="All adapters must have the same r.*--method cat or svd"):
        run_merge(MergeOptions([AdapterSpec(runs["a"]), AdapterSpec(runs["r8"])], out, method="linear"))
    with pytest.raises(LorafitError, match="unknown method"):
        run_merge(MergeOptions([AdapterSpec(runs["a"])], out, method="average"))
    assert not out.exists()


def test_an_adapter_for_another_base_is_refused(runs, tmp_path):
    gpt2 = build_tiny_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(LorafitError, match="model_type llama.*has model_type gpt2"):
        run_merge(MergeOptions([AdapterSpec(runs["a"])], tmp_path / "out", base=str(gpt2)))
    # When the recorded base is gone, the adapter's tensor shapes still give a mismatch away.
    narrow = build_tiny_model(tmp_path / "narrow", "llama", hidden_size=32)
    moved = tmp_path / "moved"
    write_lora_run(moved, runs["base"], r=4, seed=5)
    config = json.loads((moved / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    (moved / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LorafitError, match="does not fit base.*64 in the adapter"):
        run_merge(MergeOptions([AdapterSpec(moved / "adapter")], tmp_path / "out", base=str(narrow)))
    assert not (tmp_path / "out").exists()


def test_cli_merges_and_reports_json_and_errors_in_one_line(runs, tmp_path):
    env = {**os.environ, "NO_COLOR": "1"}
    out = tmp_path / "cli"
    proc = subprocess.run(["lorafit", "merge", str(runs["a"]), "--out", str(out), "--json"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["command"] == "merge" and payload["ok"] and payload["max_logit_diff"] <= payload["tolerance"]
    assert payload["peak_memory_mb"] > 0 and payload["seconds"] > 0
    assert (out / "model.safetensors").exists()

    from typer.testing import CliRunner

    from lorafit.cli import app

    again = CliRunner().invoke(app, ["merge", str(runs["a"]), "--out", str(out)])
    assert again.exit_code == 1 and "Traceback" not in again.output
    assert again.output.strip().startswith("error:") and len(again.output.strip().splitlines()) == 1
    missing = CliRunner().invoke(app, ["merge", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "no adapter given" in missing.output


def test_merged_generation_config_stops_on_the_trained_end_of_turn(tmp_path):
    from transformers import GenerationConfig

    base = build_tiny_model(tmp_path / "base", "llama")
    config = GenerationConfig.from_pretrained(base)
    config.eos_token_id = 0  # a base model whose own generation config stops on another token
    config.save_pretrained(base)
    adapter = write_lora_run(tmp_path / "run", base, r=4, seed=1)
    run_merge(MergeOptions([AdapterSpec(adapter)], tmp_path / "merged"))
    merged = GenerationConfig.from_pretrained(tmp_path / "merged")
    end_of_turn = AutoTokenizer.from_pretrained(adapter).eos_token_id
    assert merged.eos_token_id == [0, end_of_turn]


def test_an_adapter_with_nan_weights_is_refused_and_nothing_is_written(runs, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in runs["a"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(broken / "adapter_model.safetensors")
    name = next(key for key in weights if "lora_B" in key)
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(RunFailed, match="non-finite weights"):
        run_merge(MergeOptions([AdapterSpec(broken)], tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()
