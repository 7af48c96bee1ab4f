"""The GPU paths a first GPU user would hit (issue 24), reproduced on a CPU with the GPU decision mocked.

Each test pins one rule: where a 4-bit base is placed (ZeRO-3 takes no device_map; a merge de-quantizes on the
device it merges on), which memory a merge's record reads, which dtype the trained adapter keeps under QLoRA. No GPU
runs here: the tests assert the decisions and what the libraries are handed, not GPU behaviour.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import adapter_weights
from rich.console import Console
from tiny_models import build_tiny_model, write_lora_run

from lorafit import merge, models
from lorafit.merge import AdapterSpec, MergeOptions, merge_device, run_merge
from lorafit.recipe import validate_recipe


def _loaded_kwargs(monkeypatch, recipe, precision, **flags) -> dict:
    """The keyword arguments load_base_model hands to from_pretrained (the load itself is mocked away)."""
    from transformers import AutoModelForCausalLM

    seen = {}

    def from_pretrained(source, **kwargs):
        seen.update(kwargs)
        raise OSError("stop: only the arguments are under test")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(Exception, match="stop"):
        models.load_base_model(recipe, "unused", precision, **flags)
    return seen


def test_qlora_under_zero3_is_loaded_without_a_device_map(monkeypatch, make_recipe, tiny_llama, toy_data):
    """QLoRA + ZeRO-3: transformers refuses any device_map under ZeRO-3, so lorafit passes none (the 4-bit quantizer
    then uses the current GPU, which accelerate set per process); other layouts pin the process's GPU, and a CPU
    placement is said explicitly (without one the quantizer picks a GPU whenever the machine has one)."""
    from transformers.integrations import accelerate as hf_accelerate

    monkeypatch.setattr(hf_accelerate, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="Zero-3 is not compatible with passing a `device_map`"):
        hf_accelerate.check_and_set_device_map({"": 0})  # what the old placement ran into
    assert hf_accelerate.check_and_set_device_map(None) is None

    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, quantization={"bits": 4}))
    gpu = models.Precision("bf16", "cuda", "mocked GPU")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert "device_map" not in _loaded_kwargs(monkeypatch, recipe, gpu, sharded=True, zero3=True)
    assert _loaded_kwargs(monkeypatch, recipe, gpu)["device_map"] == {"": 3}
    assert _loaded_kwargs(monkeypatch, recipe, models.Precision("fp32", "cpu", "cpu"))["device_map"] == {"": "cpu"}


@pytest.mark.parametrize(("init", "sharded", "placed"), [("pissa", False, True), ("olora", False, True),
                                                      ("eva", False, True), ("corda", False, True),
                                                      ("default", False, False), ("pissa", True, False)])
def test_inits_that_compute_on_the_weights_load_the_base_on_the_gpu(monkeypatch, make_recipe, tiny_llama, toy_data,
                                                                    init, sharded, placed):
    """PiSSA/OLoRA (a decomposition per adapted weight) and EVA/CorDA (forward passes) run as the adapter is attached,
    before the Trainer moves the model: on a GPU the base is loaded straight onto this process's GPU for them (not
    when FSDP / ZeRO-3 shard it), and left to the Trainer otherwise. LoftQ's 4-bit base is on the GPU already."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, adapter={"init": init}))
    monkeypatch.setenv("LOCAL_RANK", "1")
    kwargs = _loaded_kwargs(monkeypatch, recipe, models.Precision("bf16", "cuda", "mocked GPU"), sharded=sharded)
    assert kwargs.get("device_map") == ({"": 1} if placed else None)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """A tiny Llama and a QLoRA adapter for it (a run folder recording quantization bits 4)."""
    root = tmp_path_factory.mktemp("gpu-paths")
    base = build_tiny_model(root / "base", "llama")
    return write_lora_run(root / "qlora", base, r=4, seed=4, quantization={"bits": 4})


def test_qlora_gguf_adapter_on_a_gpu_machine_dequantizes_on_the_cpu(monkeypatch, qlora_run, tmp_path):
    """A QLoRA adapter exported with --format gguf-adapter on a machine whose training precision is a GPU's: the GGUF
    writer works in host memory, so the 4-bit reference and the de-quantized base are built on the CPU too (they
    were placed on the GPU while the original base and the prompts stayed on the CPU). merge.json's peak memory is
    the host's for a CPU merge."""
    asked = []
    real = models.load_base_model

    def load_base_model(recipe, source, precision, **kwargs):
        asked.append(precision.device)
        return real(recipe, source, precision, **kwargs)

    monkeypatch.setattr(models, "choose_precision",
                        lambda requested: (models.Precision("fp32", "cuda", "mocked GPU"), None))
    monkeypatch.setattr(models, "load_base_model", load_base_model)
    result = run_merge(MergeOptions([AdapterSpec(qlora_run)], tmp_path / "out", fmt="gguf-adapter", quant="f32"))
    assert asked == ["cpu"] and result.device == "cpu"
    assert result.base_weights == "dequantized" and result.max_logit_diff <= result.tolerance
    assert json.loads((tmp_path / "out" / "merge.json").read_text())["peak_memory_mb"] > 0


def test_a_cpu_merge_records_host_memory_on_a_gpu_machine(monkeypatch):
    """merge.json's peak_memory_mb: the CUDA allocator's peak only for a merge on a GPU; a CPU merge on a machine
    with a GPU records the process's peak resident memory, not the GPU's near-zero."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**20)
    assert merge._peak_memory_mb("cuda:0") == 3.0
    assert merge._peak_memory_mb("cpu") == models.peak_memory_mb("cpu") > 3.0


@pytest.mark.parametrize(("free_gib", "four_bit", "expected"), [(20.0, False, "cuda:0"), (20.0, True, "cpu"),
                                                                (80.0, True, "cpu")])
def test_a_qlora_merge_counts_its_4bit_copy(monkeypatch, free_gib, four_bit, expected):
    """A QLoRA merge holds the 4-bit base beside a full copy: an 8B model in bf16 (18.6 GiB with margin) fits 20 GiB
    free as LoRA, not as QLoRA (+4.1 GiB); a 70B QLoRA merge (163 + 36 GiB) goes to the CPU on an 80 GiB GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gib * 2**30), 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    count = 70_000_000_000 if free_gib == 80.0 else 8_000_000_000
    assert merge_device(count, torch.bfloat16, four_bit_copy=four_bit)[0] == expected


def test_qlora_adapter_keeps_fp32_weights_like_lora(make_recipe, tiny_llama, toy_data, tmp_path):
    """One dtype rule for LoRA and QLoRA: TRL's trainers cast a quantized model's trainable parameters to bf16 when
    they are built; lorafit restores the fp32 copies PEFT made, so a QLoRA run saves (and trains) an fp32 adapter,
    as the same recipe without quantization does."""
    from lorafit.train import run_train

    dtypes = {}
    for name, quantization in (("lora", None), ("qlora", {"bits": 4})):
        raw = make_recipe(tiny_llama, toy_data, tmp_path / name, training={"max_steps": 2, "precision": "fp32"})
        if quantization:
            raw["quantization"] = quantization
        run_train(validate_recipe(raw), Console(quiet=True))
        dtypes[name] = {tensor.dtype for tensor in adapter_weights(tmp_path / name).values()}
    assert dtypes == {"lora": {torch.float32}, "qlora": {torch.float32}}


def test_trl_casts_quantized_trainable_parameters_to_bf16(make_recipe, tiny_llama, toy_data, tmp_path):
    """The library behaviour the rule undoes, pinned so a TRL release that drops the cast is noticed: building TRL's
    SFTTrainer over a 4-bit PEFT model turns its fp32 LoRA matrices into bf16 (trl/trainer/sft_trainer.py)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lorafit import adapters

    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", quantization={"bits": 4}))
    base = models.load_base_model(recipe, str(tiny_llama), models.Precision("fp32", "cpu", "test"))
    model = adapters.wrap_model(recipe, base, gradient_checkpointing=False)
    rows = Dataset.from_dict({"input_ids": [[1, 5, 6, 2]]})
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, bf16=False)

    def lora_dtypes():
        return {p.dtype for n, p in model.named_parameters() if "lora_" in n}

    assert lora_dtypes() == {torch.float32}
    with adapters.trainable_dtypes_kept(model):
        SFTTrainer(model=model, args=args, train_dataset=rows)
        assert lora_dtypes() == {torch.bfloat16}  # TRL's cast
    assert lora_dtypes() == {torch.float32}


_FSDP2_NAN_ON_ONE_RANK = '''
import sys, types, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from lorafit.training_loop import drop_gradients_on_every_rank, nonfinite_fallback

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
model[0].weight.requires_grad_(False)  # a frozen base weight beside trainable ones, as under LoRA
mesh = init_device_mesh("cpu", (2,))
for layer in model:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
loss = model(torch.randn(2, 4)).sum() * (float("nan") if rank == 0 else 1.0)
nonfinite = not torch.isfinite(loss).item()
if nonfinite:
    loss = nonfinite_fallback(model, loss, sharded=True)
loss.backward()
dropped = drop_gradients_on_every_rank(model, nonfinite, types.SimpleNamespace(device=torch.device("cpu")))
grads = [p.grad.full_tensor() for p in model.parameters() if p.requires_grad]
assert dropped and all(bool((g == 0).all()) for g in grads), grads
print(f"rank {rank}: step dropped, gradients zero", flush=True)
dist.destroy_process_group()
'''


def test_a_nan_loss_on_one_fsdp2_rank_drops_the_step_on_every_rank(tmp_path):
    """FSDP2, 2 CPU processes (gloo), rank 0's loss NaN: its backward still goes through the forward graph (FSDP2's
    reduce-scatter hooks live there; the old fallback built the loss from the DTensor shards instead, and both ranks
    hung in backward), and both ranks then zero the step's gradients, so neither optimizer applies NaN."""
    import subprocess
    import sys

    script = tmp_path / "nan_on_one_rank.py"
    script.write_text(_FSDP2_NAN_ON_ONE_RANK)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29561", str(script)], check=False, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    # The two ranks share one stdout pipe, so their lines may arrive interleaved: count each rank's report.
    assert [done.stdout.count(f"rank {rank}: step dropped, gradients zero") for rank in (0, 1)] == [1, 1], done.stdout


_FSDP2_CHECKPOINT = '''
import types, torch, torch.distributed as dist
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from lorafit.distributed import TrainableOnlyCheckpoints

dist.init_process_group("gloo")
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
mesh = init_device_mesh("cpu", (2,))
for layer in (base[0], base[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)

class TrainerSave:  # stands in for transformers.Trainer.save_model under FSDP FULL_STATE_DICT
    def save_model(self, output_dir=None, _internal_call=False):
        raise AssertionError("the Trainer's whole-model gather ran")

class Trainer(TrainableOnlyCheckpoints, TrainerSave):
    is_fsdp_enabled = True
    def __init__(self):
        self.model, self.args, self.saved = model, types.SimpleNamespace(output_dir="unused"), None
    def _save(self, output_dir, state_dict):
        self.saved = state_dict

trainer = Trainer()
trainer.save_model("checkpoint-1", _internal_call=True)
# What the Trainer gathered before (accelerate's get_state_dict for FSDP2): every parameter, frozen ones too.
whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if dist.get_rank() == 0:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(trainer.saved) and len(whole) > len(trainer.saved), (trainer.saved.keys(), whole.keys())
    kept, before = (get_peft_model_state_dict(model, state_dict=sd) for sd in (trainer.saved, whole))
    assert kept.keys() == before.keys() and all(torch.equal(kept[k], before[k]) for k in kept)
    print(f"gathered {len(trainer.saved)} of {len(whole)} tensors; adapter files identical", flush=True)
dist.destroy_process_group()
'''


def test_fsdp2_checkpoints_gather_the_trainable_tensors_only(tmp_path):
    """FSDP2 with FULL_STATE_DICT, 2 CPU processes (gloo), a LoRA model sharded per layer: a checkpoint's save_model
    gathers only the trainable tensors (the Trainer's own save gathered every frozen base weight into rank 0's host
    memory at each checkpoint), and the adapter PEFT writes from them is tensor-for-tensor the one it wrote from the
    whole state dict, so resuming reads the same files."""
    import subprocess
    import sys

    script = tmp_path / "fsdp2_checkpoint.py"
    script.write_text(_FSDP2_CHECKPOINT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29562", str(script)], check=False, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gathered 4 of 8 tensors; adapter files identical" in done.stdout
