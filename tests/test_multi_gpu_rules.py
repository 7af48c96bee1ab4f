"""The rules lorafit applies for GPUs and multi-process layouts, checked on a CPU with the hardware mocked.

precision auto on old and new GPUs, fp32 trainable parameters under fp16, TRL's PEFT rules under ZeRO-3, 4-bit
storage that FSDP can shard, and the layout read from the launcher (including FSDP refused on CPUs). No GPU and no
DeepSpeed are used: these assert the decisions, not the GPU behaviour.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorafit import adapters, distributed, models
from lorafit.errors import LorafitError
from lorafit.recipe import validate_recipe


@pytest.fixture
def gpu(monkeypatch):
    """A machine with one CUDA GPU: `make(name, major)` sets its model name and compute capability."""
    asked = []

    def make(name: str, major: int) -> list:
        monkeypatch.setattr(models, "detect_device", lambda: "cuda")
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)

        def is_bf16_supported(including_emulation: bool = True) -> bool:
            asked.append(including_emulation)
            return major >= 8 or including_emulation  # what torch answers: pre-Ampere cards emulate bf16

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        return asked

    return make


def test_auto_picks_fp16_on_a_gpu_that_only_emulates_bf16(gpu):
    """T4 / V100 (compute capability 7.x): torch's default check counts emulated bf16, lorafit's must not."""
    asked = gpu("Tesla T4", 7)
    precision, warning = models.choose_precision("auto")
    assert (precision.name, precision.device, warning) == ("fp16", "cuda", None)
    assert "Tesla T4" in precision.reason and asked == [False]


def test_auto_picks_bf16_on_ampere_and_newer(gpu):
    """A100 / H100 (8.0+) run bf16 natively."""
    gpu("NVIDIA H100 80GB HBM3", 9)
    assert models.choose_precision("auto")[0].name == "bf16"


def test_explicit_bf16_on_a_gpu_without_native_bf16_is_refused(gpu):
    """bf16 asked for on a T4 is an error naming the field, not an emulated run."""
    gpu("Tesla V100-SXM2-16GB", 7)
    with pytest.raises(LorafitError, match="training.precision: bf16"):
        models.choose_precision("bf16")


def _recipe(make_recipe, model, data, tmp_path, **adapter):
    """A validated recipe (conftest's factory) with a rank-4 adapter and `adapter`'s keys, for wrapping a model."""
    return validate_recipe(make_recipe(model, data, adapter={"r": 4, **adapter}, output={"dir": str(tmp_path / "run")}))


def _base(model, dtype=torch.float16):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype)


def test_fp16_keeps_every_trainable_parameter_in_fp32(tiny_model_factory, toy_data, tmp_path, make_recipe):
    """Under fp16 the LoRA matrices, trained biases and modules_to_save copies are all fp32 (the fp16 gradient
    scaler refuses fp16 gradients); the frozen base stays fp16."""
    with_biases = tiny_model_factory("llama", attention_bias=True)
    recipe = _recipe(make_recipe, with_biases, toy_data, tmp_path, bias="all", modules_to_save=["lm_head"])
    model = adapters.wrap_model(recipe, _base(with_biases), gradient_checkpointing=False, precision="fp16")
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trainable) and any(n.endswith("bias") for n in trainable)
    assert set(trainable.values()) == {torch.float32}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.float16}


def test_without_fp16_a_modules_to_save_copy_keeps_the_base_dtype(tiny_llama, toy_data, tmp_path, make_recipe):
    """The fp32 rule is for fp16 only: under bf16 the head copy stays bf16 as PEFT made it."""
    recipe = _recipe(make_recipe, tiny_llama, toy_data, tmp_path, modules_to_save=["lm_head"])
    model = adapters.wrap_model(recipe, _base(tiny_llama, torch.bfloat16), gradient_checkpointing=False,
                                precision="bf16")
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert {d for n, d in dtypes.items() if "modules_to_save" in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}  # PEFT's own adapter upcast


def test_zero3_follows_trl_rules_for_peft(tiny_llama, toy_data, tmp_path, make_recipe):
    """Under ZeRO-3 the adapter keeps the base dtype (one dtype per gathered buffer) and gradient checkpointing is
    reentrant, as TRL's SFTTrainer does; elsewhere checkpointing is non-reentrant."""
    recipe = _recipe(make_recipe, tiny_llama, toy_data, tmp_path)
    model = adapters.wrap_model(recipe, _base(tiny_llama, torch.bfloat16), gradient_checkpointing=True,
                                precision="bf16", zero3=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    layer = model.base_model.model.model.layers[0]
    assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is True
    plain = adapters.wrap_model(recipe, _base(tiny_llama, torch.bfloat16), gradient_checkpointing=True,
                                precision="bf16")
    assert plain.base_model.model.model.layers[0]._gradient_checkpointing_func.keywords["use_reentrant"] is False


def test_fp16_under_zero3_leaves_dtypes_to_deepspeed(tiny_llama, toy_data, tmp_path, make_recipe):
    """DeepSpeed keeps its own fp32 master weights and needs one dtype: no fp32 upcast under ZeRO-3."""
    recipe = _recipe(make_recipe, tiny_llama, toy_data, tmp_path)
    model = adapters.wrap_model(recipe, _base(tiny_llama), gradient_checkpointing=False, precision="fp16", zero3=True)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_4bit_weights_are_stored_in_the_compute_dtype_only_when_sharded():
    """FSDP / ZeRO-3 shard floating-point tensors only: 4-bit weights are packed into bf16 then, uint8 otherwise."""
    assert models.quant_storage(torch.bfloat16, sharded=True) == {"bnb_4bit_quant_storage": torch.bfloat16}
    assert models.quant_storage(torch.bfloat16, sharded=False) == {}


def _args(world_size=1, device="cpu", deepspeed_stage=None, fsdp_plugin_args=None):
    plugin = SimpleNamespace(zero_stage=deepspeed_stage) if deepspeed_stage else None
    return SimpleNamespace(world_size=world_size, device=torch.device(device), deepspeed_plugin=plugin,
                           fsdp_plugin_args=fsdp_plugin_args)


@pytest.mark.parametrize(("args", "env", "strategy", "shards"), [
    (_args(), {}, "none", False),
    (_args(2), {}, "DDP", False),
    (_args(8, "cuda", deepspeed_stage=2), {}, "ZeRO-2", False),
    (_args(8, "cuda", deepspeed_stage=3), {}, "ZeRO-3", True),
    (_args(8, "cuda"), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP2", True),
    (_args(8, "cuda", fsdp_plugin_args={"fsdp_version": 1}), {}, "FSDP1", True),
])
def test_layout_is_read_from_the_launcher(monkeypatch, args, env, strategy, shards):
    """accelerate launch / torchrun settings become the strategy metrics.json records and the load rules use."""
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    layout = distributed.read_layout(args)
    assert (layout.strategy, layout.shards_weights, layout.world_size) == (strategy, shards, args.world_size)


def test_fsdp_on_cpus_is_refused(monkeypatch):
    """accelerate would train an FSDP config as DDP on CPUs, after transformers loaded the weights on rank 0 only."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LorafitError, match="FSDP") as error:
        distributed.read_layout(_args(2))
    assert "ddp.yaml" in error.value.hint


@pytest.mark.parametrize(("free_gib", "expected"), [(40.0, "cuda:0"), (10.0, "cpu")])
def test_merge_runs_on_the_gpu_when_the_model_fits(monkeypatch, free_gib, expected):
    """An 8B model in bf16 (16 GB, 20 GB with margin) is merged on a GPU with 40 GiB free, on the CPU with 10."""
    from lorafit.merge import merge_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gib * 2**30), 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    device, reason = merge_device(8_000_000_000, torch.bfloat16)
    assert device == expected and "A100" in reason


def test_merge_without_a_gpu_says_so(monkeypatch):
    """No GPU: the CPU, and the reason is recorded with the merge."""
    from lorafit.merge import merge_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert merge_device(1000, torch.float32) == ("cpu", "no GPU")
