"""Peak RSS of DPO vs SFT on the same model, batch and max_length (docs/performance.md, "Memory").

Runs `lorafit train` twice in fresh processes, a few steps each, on the quickstart model (SmolLM2-135M):
configs/quickstart.yaml (SFT) and configs/quickstart-dpo.yaml (DPO, reference = the adapter switched off), with the
same batch size and max_length and no eval, and prints each run's peak RSS (metrics.json `peak_memory_mb`, the
process's ru_maxrss) and the ratio. A DPO step forwards every pair's chosen and rejected answers (twice the rows
of an SFT batch) and once more through the reference without gradients.

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
    sft = peak_rss("quickstart.yaml", args.out / "sft", args.steps)
    dpo = peak_rss("quickstart-dpo.yaml", args.out / "dpo", args.steps)
    result = {"steps": args.steps, "batch_size": 8, "max_length": 128,
              "sft_peak_rss_mib": round(sft["peak_memory_mb"]), "dpo_peak_rss_mib": round(dpo["peak_memory_mb"]),
              "dpo_over_sft": round(dpo["peak_memory_mb"] / sft["peak_memory_mb"], 2),
              "sft_step_seconds": round(sft["train_seconds"] / args.steps, 1),
              "dpo_step_seconds": round(dpo["train_seconds"] / args.steps, 1)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
