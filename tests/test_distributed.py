"""Multi-process training on CPU (gloo): DDP through torchrun, and FSDP2 sharding with the adapter gathered for export;
both give the same adapter as one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_process_ddp_matches_one_process_and_only_rank0_writes(make_recipe, tiny_llama, toy_data_factory,
                                                                   tmp_path):
    """torchrun with 2 CPU processes x batch 4 gives the losses and adapter of 1 process x batch 8, records DDP and the
    batch sizes in metrics.json, and only rank 0 prints and writes (one JSON object, one tensorboard file); and the
    data is prepared once into one cache entry that both ranks memory-map (that two processes starting together
    build it once is shown directly in test_data_scale.py)."""
    data = toy_data_factory(n=32)
    # fp32 whatever the CPU: in bf16 the two reduction orders differ by more than the 1e-4 compared below.
    steps = {"training": {"max_steps": 4, "save_steps": 200, "precision": "fp32"},
             "output": {"report_to": ["tensorboard"]}}
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(json.dumps(make_recipe(tiny_llama, data, tmp_path / "run-one", steps, training={"batch_size": 8})))
    # 2 processes x 4 = the same global batch
    two.write_text(json.dumps(make_recipe(tiny_llama, data, tmp_path / "run-two", steps, training={"batch_size": 4})))
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "lorafit", "train", str(one), "--quiet"], env=env,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    # The 2-process run starts from an empty prepared-data cache: one rank prepares, the other waits and reads it.
    ddp_cache = tmp_path / "ddp-data-cache"
    ddp = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "lorafit", "train", str(two), "--json"],
                         env={**env, "LORAFIT_DATA_CACHE": str(ddp_cache)}, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    payloads = [line for line in ddp.stdout.splitlines() if line.startswith("{")]
    assert len(payloads) == 1  # one JSON object: rank 1 stays silent
    metrics = json.loads((tmp_path / "run-two" / "metrics.json").read_text())
    single_metrics = json.loads((tmp_path / "run-one" / "metrics.json").read_text())
    assert metrics["tokens_seen"] == single_metrics["tokens_seen"]  # both ranks' tokens were counted
    # How each run was spread, as metrics.json records it: the same global batch of 8 both ways.
    assert metrics["distributed"] == {"strategy": "DDP", "world_size": 2, "per_device_batch": 4, "grad_accum": 1,
                                      "global_batch": 8}
    assert single_metrics["distributed"] == {"strategy": "none", "world_size": 1, "per_device_batch": 8,
                                             "grad_accum": 1, "global_batch": 8}
    assert metrics["device_kind"].startswith("cpu")
    losses = [e["loss"] for e in metrics["loss_history"] if "loss" in e]
    single_losses = [e["loss"] for e in single_metrics["loss_history"] if "loss" in e]
    assert losses == pytest.approx(single_losses, abs=1e-4)

    a = load_file(tmp_path / "run-one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "run-two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-4, key
    entries = [p for p in ddp_cache.iterdir() if p.is_dir() and p.name not in ("raw", "hashes")]
    assert len(entries) == 1 and not list(ddp_cache.glob("*.tmp-*"))  # one preparation, nothing half-built
    assert metrics["data_cache"]["state"] in ("built", "from cache")
    assert metrics["data_cache"]["path"] == str(entries[0])
    event_files = list((tmp_path / "run-two" / "logs").iterdir())
    assert len(event_files) == 1  # one tensorboard writer (rank 0), not one per process


# accelerate shards with FSDP only on accelerators (on CPUs it runs an FSDP config as DDP), so this worker shards the
# model itself with torch's fully_shard, exactly as accelerate's FSDP2 preparation does, and then trains a few steps
# and exports with lorafit's own export path.
_FSDP2_WORKER = r'''
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from lorafit import adapters, data, distributed, models
from lorafit.recipe import load_recipe

recipe_path, out = Path(sys.argv[1]), Path(sys.argv[2])
sharded = dist.is_available() and "RANK" in __import__("os").environ
if sharded:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
recipe = load_recipe(recipe_path)
source = models.resolve_model_source(recipe.model)
tokenizer = models.load_tokenizer(recipe, source)
prepared = data.prepare_data(recipe, tokenizer)
torch.manual_seed(0)
model = adapters.wrap_model(recipe, models.load_base_model(recipe, source, models.Precision("fp32", "cpu", "test")),
                            gradient_checkpointing=False)
if sharded:
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
lora = next(p for n, p in model.named_parameters() if "lora_A" in n)
facts = {"fsdp_module": isinstance(model, FSDPModule), "param_type": type(lora).__name__,
         "local_rows": (lora.to_local() if hasattr(lora, "to_local") else lora).shape[0], "rows": lora.shape[0]}
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
rows = prepared.train.select(range(8))
for step in range(3):
    mine = rows.select(range(rank * 8 // world, (rank + 1) * 8 // world))  # this rank's half of the global batch
    width = max(len(r) for r in mine["input_ids"])
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in mine["input_ids"]])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in mine["input_ids"]])
    labels = ids.masked_fill(mask == 0, -100)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    # summed over this rank's tokens and divided by the global count, so the ranks' gradients average to the
    # single-process gradient
    total = sum(sum(1 for t in r[1:]) for r in rows["input_ids"])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             reduction="sum", ignore_index=-100) / total * world
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
state = distributed.gathered_state_dict(model)
if rank == 0:
    # export_run's adapter write (it needs a finished run's TrainMetrics for the rest of the folder)
    model.save_pretrained(out / "adapter", safe_serialization=True, state_dict=state)
    (out / "facts.json").write_text(json.dumps(facts))
if sharded:
    dist.barrier()
    dist.destroy_process_group()
'''


@pytest.mark.slow  # ~90 s on 2 shared cores: three processes each import torch, transformers, peft and datasets
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_fsdp2_sharded_adapter_is_gathered_and_equals_one_process(make_recipe, tiny_llama, toy_data_factory,
                                                                   tmp_path):
    """Two gloo processes with the adapter really sharded by FSDP2 (DTensor halves) export the same adapter as one
    unsharded process trained on the same global batch: every rank takes part in the gather, rank 0 writes."""
    data = toy_data_factory(n=16)
    recipe = tmp_path / "fsdp.yaml"
    recipe.write_text(json.dumps(make_recipe(tiny_llama, data, tmp_path / "run-fsdp", training={"precision": "fp32"})))
    worker = tmp_path / "fsdp2_worker.py"
    worker.write_text(_FSDP2_WORKER)
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(worker), str(recipe), str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = subprocess.run(["torchrun", "--nproc_per_node", "2", str(worker), str(recipe), str(tmp_path / "two")],
                             env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert sharded.returncode == 0, sharded.stderr[-3000:]

    facts = json.loads((tmp_path / "two" / "facts.json").read_text())
    assert facts["fsdp_module"] and facts["param_type"] == "DTensor"
    assert facts["local_rows"] * 2 == facts["rows"]  # each rank held half of every LoRA matrix
    assert json.loads((tmp_path / "one" / "facts.json").read_text())["param_type"] == "Parameter"
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert a[key].shape == b[key].shape, key
        # The same tolerance as the DDP test: two ranks' reduce-scatter sums the gradients in another order than
        # one process, and Adam amplifies that on near-zero gradients (1.8e-5 measured on an AVX512 CPU).
        assert (a[key] - b[key]).abs().max() < 1e-4, key
    assert any(a[key].abs().max() > 0 for key in a if "lora_B" in key)  # trained, not the zero init
