"""Data-parallel training through torchrun on CPU (gloo): same adapter as one process with the same global batch."""

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
    """torchrun with 2 processes x batch 4 gives the losses and adapter of 1 process x batch 8; only rank 0 writes;
    and the data is prepared once into one cache entry that both ranks memory-map (that two processes starting
    together build it once is shown directly in test_data_scale.py)."""
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
    losses = [e["loss"] for e in metrics["loss_history"] if "loss" in e]
    single_losses = [e["loss"] for e in single_metrics["loss_history"] if "loss" in e]
    assert losses == pytest.approx(single_losses, abs=1e-4)

    a = load_file(tmp_path / "run-one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "run-two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-4, key
    entries = [p for p in ddp_cache.iterdir() if p.is_dir() and p.name != "raw"]
    assert len(entries) == 1 and not list(ddp_cache.glob("*.tmp-*"))  # one preparation, nothing half-built
    assert metrics["data_cache"]["state"] in ("built", "from cache")
    assert metrics["data_cache"]["path"] == str(entries[0])
    event_files = list((tmp_path / "run-two" / "logs").iterdir())
    assert len(event_files) == 1  # one tensorboard writer (rank 0), not one per process
