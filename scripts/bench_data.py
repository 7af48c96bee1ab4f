"""Data at scale (GitHub issue 10): time and memory until the data is ready, lorafit vs TRL, first and cached run.

Run through `scripts/bench.py --data-scale` (this module holds that mode):

    python scripts/bench.py --data-scale --rows 50000 --out bench-data.json           # ~10 min on 2 CPU cores
    python scripts/bench.py --data-scale --rows 50000,500000 --stream-rows 1000000    # the full table (~1 h)
    python scripts/bench.py --data-scale --quick                                       # 2,000 rows: the script itself

For each row count, a synthetic chat file (system + user + assistant, ~1k SmolLM2 tokens a row) is written once,
then four fresh processes run on it, each from an empty cache where it says "first":

  lorafit first    `prepare_data` as `lorafit train` calls it (reads, tokenizes, fills the prepared-data cache)
  lorafit cached   the same again (memory-maps the cache entry)
  trl first        TRL `SFTTrainer(model, SFTConfig(max_length), train_dataset=load_dataset("json", ...))`:
                   TRL's own preprocessing of the same file, with its defaults, empty datasets cache
  trl cached       the same again (datasets' fingerprint cache)

Both load the same model (SmolLM2-135M-Instruct) so the memory numbers compare like for like. "data s" is the
time the data step itself took (lorafit: `prepare_data`; TRL: load_dataset + SFTTrainer's dataset preparation),
"wall s" the whole process. Peak RSS is the largest single process (wait4); "tree MiB" adds up the RSS of the
process and its worker processes, sampled every 0.2 s. `--stream-rows N` also trains 10 steps on an N-row file
with `data.streaming: true` and reports its wall and peak RSS.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a careful assistant. Answer in full sentences."
_SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "or", "pin", "da", "ne", "qui", "bar", "e", "sto", "lu",
              "gra", "fen", "ti", "mo", "ash", "ul", "cre", "dor"]


def write_chat_rows(path: Path, rows: int, *, tokens_per_row: int = 1000, seed: int = 0) -> dict[str, Any]:
    """N synthetic chat rows of about `tokens_per_row` SmolLM2 tokens (a quarter prompt, the rest answer)."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(4000)})
    # ~175 SmolLM2 tokens per 60-word paragraph (calibrated on 300 rows); paragraphs are reused across rows.
    paragraphs = [" ".join(rng.choices(words, k=60)).capitalize() + "." for _ in range(3000)]
    per_row = max(2, round(tokens_per_row / 175))
    started = time.perf_counter()
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            chosen = rng.choices(paragraphs, k=per_row)
            cut = max(1, per_row // 4)
            row = {"messages": [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": f"Question {i}: " + " ".join(chosen[:cut])},
                                {"role": "assistant", "content": "\n\n".join(chosen[cut:])}]}
            handle.write(json.dumps(row) + "\n")
    return {"rows": rows, "bytes": path.stat().st_size, "seconds": time.perf_counter() - started}


def runner_trl_data(spec: dict) -> dict:
    """TRL's SFTTrainer preparing the file with its own defaults (the model loaded as a user would)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
    started = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=spec["data"], split="train")
    args = SFTConfig(output_dir=spec["out"], max_length=spec["max_length"], use_cpu=True, bf16=False,
                     report_to="none")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return {"data_seconds": time.perf_counter() - started, "rows": len(trainer.train_dataset)}


def runner_lorafit_data(spec: dict) -> dict:
    """lorafit's data stage as `lorafit train` runs it, after loading the same model the TRL runner loads."""
    import datasets  # noqa: F401 -- imported before the clock starts, as in the TRL runner
    from transformers import AutoModelForCausalLM

    from lorafit import models
    from lorafit.data import prepare_data
    from lorafit.recipe import load_recipe

    recipe = load_recipe(spec["recipe"])
    source = models.resolve_model_source(recipe.model)
    tokenizer = models.load_tokenizer(recipe, source)
    model = AutoModelForCausalLM.from_pretrained(source)  # noqa: F841 -- held, as training holds it
    started = time.perf_counter()
    prepared = prepare_data(recipe, tokenizer)
    return {"data_seconds": time.perf_counter() - started, "rows": prepared.report.train_examples,
            "cache": prepared.report.cache, "summary": prepared.report.summary()}


def _rss_parts_mb(pid: int) -> tuple[float, float]:
    """A process's anonymous and file-backed resident memory (RssAnon, RssFile). Anonymous is what the process
    itself allocates; file-backed is pages of memory-mapped files (Arrow data, the model), which RSS also counts
    and which are page cache the kernel can drop at any time."""
    parts = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                parts[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return parts.get("RssAnon", 0.0), parts.get("RssFile", 0.0)


def _measure(command: list[str], env: dict[str, str], log: Path, timeout: float) -> dict:
    """Wall time, the largest process's peak RSS (wait4), the peak summed RSS of the process tree, and each
    process's peak anonymous and file-backed RSS (sampled every 0.2 s, so a shorter spike can be missed)."""
    import psutil

    with log.open("w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        tree_peak = 0.0
        peaks: dict[int, dict[str, float]] = {}
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            try:
                parent = psutil.Process(proc.pid)
                tree = [parent, *parent.children(recursive=True)]
                tree_peak = max(tree_peak, sum(p.memory_info().rss for p in tree) / 2**20)
            except psutil.Error:
                tree = []
            for member in tree:
                anon, file = _rss_parts_mb(member.pid)
                peak = peaks.setdefault(member.pid, {"anon_mb": 0.0, "file_mb": 0.0, "rss_mb": 0.0})
                peak.update(anon_mb=max(peak["anon_mb"], anon), file_mb=max(peak["file_mb"], file),
                            rss_mb=max(peak["rss_mb"], anon + file), main=member.pid == proc.pid)
            time.sleep(0.2)
    processes = sorted(({k: round(v) if k != "main" else v for k, v in p.items()} for p in peaks.values()),
                       key=lambda p: (not p["main"], -p["rss_mb"]))
    return {"returncode": os.waitstatus_to_exitcode(status), "wall_seconds": time.perf_counter() - started,
            "peak_rss_mb": usage.ru_maxrss / 1024, "tree_peak_mb": max(tree_peak, usage.ru_maxrss / 1024),
            "peak_anon_mb": max((p["anon_mb"] for p in processes), default=0.0), "processes": processes}


def _last_json(text: str) -> dict:
    """The command's --json object (it may be pretty-printed, after library chatter on stderr)."""
    start = text.find("\n{") + 1 if not text.startswith("{") else 0
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0] if "{" in text else {}
    except ValueError:
        return {}


def run_data_scale(args, env_base: dict[str, str]) -> dict:
    """The whole data-scale comparison; returns the JSON results."""
    from lorafit.models import resolve_model_source
    from lorafit.recipe import ModelSection

    workdir = Path(args.workdir or ROOT / ".bench-data")
    workdir.mkdir(parents=True, exist_ok=True)
    model = resolve_model_source(ModelSection(path=args.model))
    results: dict[str, Any] = {"command": " ".join(sys.argv), "model": args.model, "max_length": args.max_length,
                               "cpu_count": os.cpu_count(), "sizes": []}
    for rows in args.rows:
        data = workdir / f"chat-{rows}.jsonl"
        if not data.exists() or sum(1 for _ in data.open()) != rows:
            print(f"[bench-data] writing {rows:,} rows to {data}", file=sys.stderr)
            write_chat_rows(data, rows)
        size: dict[str, Any] = {"rows": rows, "file_mb": data.stat().st_size / 2**20, "runs": {}}
        cache = workdir / f"lorafit-cache-{rows}"
        hf_cache = workdir / f"hf-cache-{rows}"
        for folder in (cache, hf_cache):
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        recipe = workdir / f"recipe-{rows}.yaml"
        recipe.write_text(json.dumps({"name": f"data-{rows}", "model": {"path": args.model},
                                      "data": {"train": str(data), "max_length": args.max_length},
                                      "output": {"dir": str(workdir / f"run-{rows}"), "report_to": ["none"]}}))
        env = {**env_base, "LORAFIT_DATA_CACHE": str(cache), "HF_DATASETS_CACHE": str(hf_cache)}
        names = ["lorafit first", "lorafit cached"] + (
            [] if args.skip_trl or rows not in args.trl_rows else ["trl first", "trl cached"])
        for name in names:
            print(f"[bench-data] {rows:,} rows: {name}", file=sys.stderr)
            kind = "lorafit-data" if name.startswith("lorafit") else "trl-data"
            spec = workdir / f"{kind}-{rows}.json"
            result_file = workdir / f"{kind}-{rows}.result.json"
            spec.write_text(json.dumps({"model": model, "data": str(data), "max_length": args.max_length,
                                        "recipe": str(recipe), "out": str(workdir / "trl-out"),
                                        "result": str(result_file)}))
            log = workdir / f"{name.replace(' ', '-')}-{rows}.log"
            run = _measure([sys.executable, str(ROOT / "scripts" / "bench.py"), "--runner", kind, str(spec)],
                           env, log, args.timeout)
            if result_file.exists():
                run.update(json.loads(result_file.read_text()))
                result_file.unlink()
            size["runs"][name] = run
        results["sizes"].append(size)
        Path(args.out).write_text(json.dumps(results, indent=2))  # partial results survive a later failure
    if args.stream_rows:
        results["stream"] = _stream_run(args, workdir, env_base)
    results["targets"] = _targets(results)
    return results


def _stream_run(args, workdir: Path, env_base: dict[str, str]) -> dict:
    rows = args.stream_rows
    data = workdir / f"chat-{rows}.jsonl"
    if not data.exists():
        print(f"[bench-data] writing {rows:,} rows to {data}", file=sys.stderr)
        write_chat_rows(data, rows)
    recipe = workdir / f"stream-{rows}.yaml"
    recipe.write_text(json.dumps({
        "name": f"stream-{rows}", "model": {"path": args.model},
        "data": {"train": str(data), "max_length": args.max_length, "streaming": True},
        "training": {"max_steps": 10, "batch_size": 1, "grad_accum": 1, "logging_steps": 1, "save_steps": 1000,
                     "gradient_checkpointing": True},
        "output": {"dir": str(workdir / f"stream-run-{rows}"), "report_to": ["none"]}}))
    print(f"[bench-data] streamed training on {rows:,} rows", file=sys.stderr)
    log = workdir / f"stream-{rows}.log"
    run = _measure([sys.executable, "-m", "lorafit", "train", str(recipe), "--json", "--overwrite"],
                   {**env_base, "LORAFIT_DATA_CACHE": str(workdir / "stream-cache")}, log, args.timeout)
    metrics = _last_json(log.read_text()).get("metrics", {})
    run.update(rows=rows, file_mb=data.stat().st_size / 2**20, global_step=metrics.get("global_step"),
               losses=[e["loss"] for e in metrics.get("loss_history", []) if "loss" in e])
    return run


def _targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it was met."""
    targets = []
    by_rows = {size["rows"]: size["runs"] for size in results["sizes"]}
    for rows, runs in by_rows.items():
        lf, lc, tf = runs["lorafit first"], runs["lorafit cached"], runs.get("trl first", {})
        if lf.get("data_seconds") and tf.get("data_seconds"):
            ratio = lf["data_seconds"] / tf["data_seconds"]
            targets.append({"target": f"{rows:,} rows: first run <= 0.5x TRL's data time", "value": round(ratio, 2),
                            "passed": ratio <= 0.5})
        if tf:
            targets.append({"target": f"{rows:,} rows: peak RSS <= TRL's (largest process)",
                            "value": f"{lf['peak_rss_mb']:.0f} vs {tf['peak_rss_mb']:.0f} MiB",
                            "passed": lf["peak_rss_mb"] <= tf["peak_rss_mb"]})
        if lc.get("data_seconds") is not None:
            targets.append({"target": f"{rows:,} rows: cached run <= 2 s to data-ready",
                            "value": round(lc["data_seconds"], 2), "passed": lc["data_seconds"] <= 2.0})
    rows_sorted = sorted(by_rows)
    if len(rows_sorted) > 1:
        small, large = by_rows[rows_sorted[0]]["lorafit first"], by_rows[rows_sorted[-1]]["lorafit first"]
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        targets.append({"target": f"RSS at {rows_sorted[-1]:,} rows <= 1.3x RSS at {rows_sorted[0]:,} rows",
                        "value": round(ratio, 2), "passed": ratio <= 1.3})
        if small.get("peak_anon_mb"):  # the same, without the page cache of memory-mapped files
            ratio = large["peak_anon_mb"] / small["peak_anon_mb"]
            targets.append({"target": f"anonymous RSS at {rows_sorted[-1]:,} rows <= 1.3x at {rows_sorted[0]:,} rows",
                            "value": round(ratio, 2), "passed": ratio <= 1.3})
    stream = results.get("stream")
    if stream:
        targets.append({"target": f"streamed {stream['rows']:,}-row file trains 10 steps within 2 GB RSS",
                        "value": f"{stream['global_step']} steps, {stream['peak_rss_mb']:.0f} MiB",
                        "passed": stream["global_step"] == 10 and stream["peak_rss_mb"] <= 2048})
    return targets


def render_data_scale(results: dict) -> None:
    """Print the table as markdown (it goes into docs/performance.md as is)."""
    print("| rows | run | data s | wall s | peak RSS MiB | anon MiB | tree MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for size in results["sizes"]:
        for name, run in size["runs"].items():
            data = run.get("data_seconds")
            print(f"| {size['rows']:,} | {name} | {data:.1f} |" if data is not None else f"| {size['rows']:,} | {name} | - |",
                  f"{run['wall_seconds']:.1f} | {run['peak_rss_mb']:,.0f} | {run.get('peak_anon_mb', 0):,.0f} | "
                  f"{run['tree_peak_mb']:,.0f} |")
    print("\nper process, peak anonymous + file-backed RSS in MiB (main first, then the largest others):")
    for size in results["sizes"]:
        for name, run in size["runs"].items():
            shown = [f"{'main' if p['main'] else 'child'} {p['anon_mb']:,} + {p['file_mb']:,} = {p['rss_mb']:,}"
                     for p in run.get("processes", [])[:3]]
            print(f"  {size['rows']:,} {name}: " + "; ".join(shown))
    stream = results.get("stream")
    if stream:
        print(f"\nstreamed {stream['rows']:,} rows ({stream['file_mb']:,.0f} MB): {stream['global_step']} steps, "
              f"wall {stream['wall_seconds']:.0f} s, peak RSS {stream['peak_rss_mb']:,.0f} MiB")
    for target in results.get("targets", []):
        print(f"{'PASS' if target['passed'] else 'MISS'}  {target['target']}: {target['value']}")
