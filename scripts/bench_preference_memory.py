"""Peak RSS of DPO and ORPO vs SFT on the same model, batch and max_length (docs/performance.md, "Memory").

Runs `lorafit train` three times in fresh processes, a few steps each, on the quickstart model (SmolLM2-135M):
configs/quickstart.yaml (SFT), configs/quickstart-dpo.yaml (DPO, reference = the adapter switched off) and
configs/quickstart-orpo.yaml (ORPO, no reference), with the same batch size and max_length and no eval, and prints
each run's peak RSS (metrics.json `peak_memory_mb`, the process's ru_maxrss) and the ratios. A DPO step forwards
every pair's chosen and rejected answers (twice the rows of an SFT batch) and once more through the reference
without gradients; an ORPO step forwards both answers once.

    python scripts/bench_preference_memory.py [--steps 3] [--out /tmp/bench-pref]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def peak_rss(recipe: str, out: Path, steps: int) -> dict:
    """Train `recipe` for `steps` steps in a fresh process; its metrics.json."""
    command = [sys.executable, "-m", "lorafit", "train", str(REPO_ROOT / "configs" / recipe), "--json", "--overwrite",
               "--set", f"training.max_steps={steps}", "--set", "data.eval=null", "--set", "training.batch_size=8",
               "--set", "data.max_length=128", "--set", f"output.dir={out}", "--set", "output.report_to=[none]"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-preference"))
    args = parser.parse_args()
    runs = {name: peak_rss(recipe, args.out / name, args.steps) for name, recipe in
            (("sft", "quickstart.yaml"), ("dpo", "quickstart-dpo.yaml"), ("orpo", "quickstart-orpo.yaml"))}
    result: dict = {"steps": args.steps, "batch_size": 8, "max_length": 128}
    for name, metrics in runs.items():
        result[f"{name}_peak_rss_mib"] = round(metrics["peak_memory_mb"])
        result[f"{name}_step_seconds"] = round(metrics["train_seconds"] / args.steps, 1)
        if name != "sft":
            result[f"{name}_over_sft"] = round(metrics["peak_memory_mb"] / runs["sft"]["peak_memory_mb"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
