"""Data-parallel training through torchrun on CPU (gloo): same adapter as one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file


def recipe_file(tmp_path: Path, model: Path, data: Path, name: str, batch_size: int) -> Path:
    raw = {"name": name, "model": {"path": str(model)}, "adapter": {"r": 8, "dropout": 0.0},
           "data": {"train": str(data), "max_length": 64},
           "training": {"max_steps": 4, "batch_size": batch_size, "grad_accum": 1, "learning_rate": 1e-2,
                        "logging_steps": 1, "warmup_ratio": 0.0, "scheduler": "constant"},
           "output": {"dir": str(tmp_path / f"run-{name}"), "report_to": ["tensorboard"]}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_process_ddp_matches_one_process_and_only_rank0_writes(tiny_llama, toy_data_factory, tmp_path):
    data = toy_data_factory(n=32)
    one = recipe_file(tmp_path, tiny_llama, data, "one", batch_size=8)
    two = recipe_file(tmp_path, tiny_llama, data, "two", batch_size=4)  # 2 processes x 4 = the same global batch
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "lorafit", "train", str(one), "--quiet"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "lorafit", "train", str(two), "--json"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
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
    event_files = list((tmp_path / "run-two" / "logs").iterdir())
    assert len(event_files) == 1  # one tensorboard writer (rank 0), not one per process
