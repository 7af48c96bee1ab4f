"""Time and size of `lorafit merge --format gguf` (and gguf-adapter) against the safetensors merge (issue 12).

    python scripts/bench_gguf.py --adapter runs/quickstart/adapter --out bench-gguf.json
    python scripts/bench_gguf.py --random-adapter        # a random r=16 LoRA on the quickstart model: no training

Each export runs as its own `lorafit merge ... --json` process, one after the other in this one invocation, so
the times can be compared as ratios to the safetensors merge of the same adapter (machines are shared and noisy).
Reported per format: wall seconds (the whole command: load, merge, write, verify), the share of it the GGUF
export and its verification took, file size, peak memory (merge.json), and the verification numbers from merge.json.
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

RUNS = (("safetensors", None), ("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_0"), ("gguf-adapter", "f16"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, help="adapter folder (runs/<name>/adapter)")
    parser.add_argument("--random-adapter", action="store_true",
                        help="write a random r=16 all-linear LoRA for the quickstart model instead")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as scratch:
        adapter = args.adapter or _random_adapter(Path(scratch))
        results = [_run(adapter, Path(scratch) / f"{fmt}-{quant}", fmt, quant) for fmt, quant in RUNS]
    base = results[0]["seconds"]
    for row in results:
        row["time_vs_safetensors"] = round(row["seconds"] / base, 2)
        print(f"{row['format']:<13} {row['quant'] or '':<5} {row['seconds']:7.1f} s  x{row['time_vs_safetensors']:<5} "
              f"{row['size_mib']:8.1f} MiB  peak {row['peak_memory_mib']:6.0f} MiB  {row['check']}")
    if args.out:
        args.out.write_text(json.dumps({"adapter": str(adapter), "runs": results}, indent=2) + "\n")


def _random_adapter(scratch: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_models import write_lora_run

    from lorafit.models import resolve_model_source
    from lorafit.recipe import ModelSection

    base = resolve_model_source(ModelSection(path="smollm2-135m-instruct"))
    return write_lora_run(scratch / "run", base, r=16, target_modules=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def _run(adapter: Path, out: Path, fmt: str, quant: str | None) -> dict:
    command = [sys.executable, "-m", "lorafit", "merge", str(adapter), "--out", str(out), "--format", fmt, "--json"]
    command += ["--quant", quant] if quant else []
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    report = result.get("gguf") or {}
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".gguf", ".safetensors"))
    check = (f"max logit diff {report['max_logit_diff']:.3g} (tolerance {report['tolerance']:.3g}), top-1 "
             f"{100 * report['top1_agreement']:.1f}%" if report else
             f"max logit diff {result['max_logit_diff']:.3g} vs base+adapter")
    return {"format": fmt, "quant": quant, "seconds": round(seconds, 1),
            "export_seconds": round(report.get("seconds", 0.0), 1), "size_mib": round(size / 2**20, 1),
            "peak_memory_mib": round(result["peak_memory_mb"]),
            "check": check, "gguf": report or None}


if __name__ == "__main__":
    main()
