"""Host memory of loading the base model on each rank: model loaded before vs after the process group exists.

    python scripts/load_memory.py                       # SmolLM2-135M (fp32), 2 CPU processes under torchrun
    python scripts/load_memory.py --model path/to/model --nproc 4 --out load.json

`lorafit train` creates its training arguments, and so the process group, before it loads the model: under ZeRO-3
transformers then builds the model partitioned and reads the checkpoint on rank 0 only. This script checks what the
order changes for FSDP's `fsdp_cpu_ram_efficient_loading` (the shipped configs/accelerate/fsdp.yaml): it measures
the load step alone, in both orders, with the environment `accelerate launch` sets for that config, on CPU processes
(gloo; accelerate shards with FSDP only on GPUs, so the training that would follow is not run). Prints, per order
and rank, the peak RSS above the imports, the RSS after loading and how many parameters stayed on the meta device.
Finding (docs/performance.md): with transformers 5.24 every rank reads the full checkpoint in both orders; accelerate
frees ranks > 0 when it shards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(model: str, order: str) -> None:
    """One rank: import, then load the model before or after creating the process group; print one JSON line."""
    import torch.distributed as dist

    from lorafit import models
    from lorafit.recipe import validate_recipe

    recipe = validate_recipe({"name": "load", "model": {"path": model}, "data": {"train": "unused.jsonl"},
                              "training": {"precision": "fp32"}})
    source = models.resolve_model_source(recipe.model)
    precision = models.Precision("fp32", "cpu", "measurement")
    imported = _peak_mib()
    if order == "after":
        dist.init_process_group("gloo")
    loaded = models.load_base_model(recipe, source, precision)
    on_meta = sum(p.numel() for p in loaded.parameters() if p.device.type == "meta")
    record = {"order": order, "rank": int(os.environ["RANK"]), "imports_peak_mib": round(imported),
              "load_peak_above_imports_mib": round(_peak_mib() - imported), "rss_after_load_mib": round(_rss_mib()),
              "params_on_meta": on_meta, "params": sum(p.numel() for p in loaded.parameters())}
    if order == "before":
        dist.init_process_group("gloo")
    dist.barrier()
    print("RESULT " + json.dumps(record), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.worker)
        return
    # What `accelerate launch --config_file configs/accelerate/fsdp.yaml` puts in each rank's environment.
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
           "FSDP_VERSION": "2", "OMP_NUM_THREADS": "1"}
    results = []
    for order in ("before", "after"):
        run = subprocess.run(["torchrun", "--nproc_per_node", str(args.nproc), __file__, "--model", args.model,
                              "--worker", order], env=env, capture_output=True, text=True, check=False)
        lines = [json.loads(line.split("RESULT ", 1)[1]) for line in run.stdout.splitlines() if "RESULT " in line]
        if run.returncode != 0 or len(lines) != args.nproc:
            sys.exit(f"{order}: torchrun failed\n{run.stderr[-3000:]}")
        results += sorted(lines, key=lambda r: r["rank"])
    print(f"{'model loaded':<28} {'rank':>4} {'peak above imports':>19} {'RSS after load':>15} {'params on meta':>15}")
    for r in results:
        what = "before the process group" if r["order"] == "before" else "after (lorafit now)"
        print(f"{what:<28} {r['rank']:>4} {r['load_peak_above_imports_mib']:>15,} MiB "
              f"{r['rss_after_load_mib']:>11,} MiB {r['params_on_meta']:>15,}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
