"""Speed and memory of `lorafit train` against what a user would write instead (GitHub issue 5).

    python scripts/bench.py                 # SmolLM2-135M, fixed + ragged rows, ~15 min on 2 CPU cores
    python scripts/bench.py --quick         # tiny random model, ~2 min: checks the script itself
    python scripts/bench.py --include-qlora --recipe configs/quickstart.yaml --steps 12 --out bench.json
    python scripts/bench.py --data-scale --rows 50000,500000 --stream-rows 1000000   # data path (bench_data.py)

Every run is its own process (launched from here), on the same model, rows, LoRA config and batch shape:

  a   `lorafit train RECIPE --json` -- the real CLI. On ragged rows: `data.packing: true` (a) and
      `data.group_by_length: true` (a:group), the two switches a user has for ragged data.
  b   TRL `SFTTrainer` with its defaults (bf16=True, gradient checkpointing on) plus the same LoraConfig
      (and use_cpu=True on a CPU-only machine, without which TRL's defaults refuse to start).
      On a CPU without native bf16 that is ~20x slower, so it runs `--b-steps` steps, on fixed rows only
      unless `--b-ragged`.
  b'  the same with the best precision set by hand (bf16=False); everything else TRL's default.
  c   a minimal hand-written PEFT + torch loop (fp32 on CPU, bf16 autocast on a bf16 GPU): the overhead floor.

Reported per run: real (non-pad) tokens/s after the first optimizer step, time from process start to the
end of the first step, peak memory (the process's max RSS on CPU from wait4; max allocated on GPU), and an
MFU estimate: 4*N FLOPs per real token for LoRA (6*N with gradient checkpointing) over the peak of a
large matmul measured in a fresh process on the same machine. Plus start-up (`--help`, `validate`),
`inspect-modules` on a 70B config-only folder, `merge` peak memory, and (`--include-qlora`) QLoRA.

Machines are shared and noisy: ratios come from runs of one invocation; `--repeats N` interleaves N rounds
(a, b', c, a, b', c, ...) and keeps each run's fastest round. Results print as a rich table and go to `--out` (JSON).
Internal: `--runner hand|trl|peak|baseline SPEC.json` is how this script launches its own measured processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RAGGED_MIN, RAGGED_MAX = 10, 512
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "NO_COLOR": "1",
       "PYTHONWARNINGS": "ignore"}


# ----------------------------------------------------------------------------------------------------
# Measured processes (each run of the comparison is one of these, or `lorafit train`)


def _process_age() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def runner_peak(spec: dict) -> dict:
    """GFLOP/s of a large matmul: the machine's practical peak for the MFU estimate."""
    import torch

    if spec["device"] == "cuda":
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        sync = torch.cuda.synchronize
    else:
        a = torch.randn(2048, 2048)
        sync = lambda: None  # noqa: E731
    b = a.clone()
    for _ in range(2):
        a @ b
    sync()
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - started)
    return {"gflops": 2 * a.shape[0] ** 3 / best / 1e9, "dtype": str(a.dtype).removeprefix("torch.")}


def runner_baseline(spec: dict) -> dict:
    """Import what every run imports and stop: the RSS no training run can go below."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    return {}


def _rows(spec: dict) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in Path(spec["rows"]).read_text().splitlines()]


def _lora_config(spec: dict):
    from peft import LoraConfig

    return LoraConfig(**spec["lora"])


def runner_hand(spec: dict) -> dict:
    """The floor: what someone writes by hand with transformers + PEFT + torch, padded batches, no trainer."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    device = spec["device"]
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).to(device)
    model.config.use_cache = False
    model = get_peft_model(model, _lora_config(spec))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["learning_rate"])
    rows = _rows(spec)
    random.Random(spec["seed"]).shuffle(rows)
    pad = spec["pad_token_id"]
    result = _step_log()
    for start in range(0, len(rows) - spec["batch_size"] + 1, spec["batch_size"]):
        batch = rows[start:start + spec["batch_size"]]
        width = max(map(len, batch))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in batch], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch], device=device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _log_step(result, tokens=int(mask.sum()), computed=ids.numel(), loss=loss.item(), device=device)
    return result


def runner_trl(spec: dict) -> dict:
    """TRL's SFTTrainer as a user writes it: model path, LoraConfig, SFTConfig defaults (+ bf16=False for b')."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    result = _step_log()

    class StepClock(TrainerCallback):  # measurement only: reads the clock and the trainer's token count
        def on_step_end(self, args, state, control, **kwargs):
            seen = state.num_input_tokens_seen
            _log_step(result, tokens=seen - result["tokens_total"], computed=None, loss=None, device=spec["device"])

    config = {"output_dir": spec["output_dir"], "per_device_train_batch_size": spec["batch_size"],
              "learning_rate": spec["learning_rate"], "report_to": "none", "seed": spec["seed"],
              # Instrumentation, not tuning: lets StepClock read real (non-pad) tokens per step.
              "include_num_input_tokens_seen": "non_padding", "disable_tqdm": True}
    config.update(max_steps=spec["max_steps"]) if spec.get("max_steps") else config.update(num_train_epochs=1)
    if spec["device"] == "cpu":
        # TRL's defaults stop on a CPU-only machine ("Your setup doesn't support bf16/gpu. You need to assign
        # use_cpu"): use_cpu=True is the one change a user must make to run them at all.
        config["use_cpu"] = True
    config.update(spec.get("trl_overrides", {}))
    dataset = Dataset.from_dict({"input_ids": _rows(spec)})
    trainer = SFTTrainer(model=spec["model"], args=SFTConfig(**config), train_dataset=dataset,
                         peft_config=_lora_config(spec), callbacks=[StepClock()])
    trainer.train()
    result["gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)
    result["bf16"] = bool(trainer.args.bf16)
    if torch.cuda.is_available() and spec["device"] == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _step_log() -> dict:
    return {"step_end": [], "step_tokens": [], "computed_tokens": 0, "tokens_total": 0, "losses": [],
            "first_step_seconds": None}


def _log_step(result: dict, *, tokens: int, computed: int | None, loss: float | None, device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    result["step_end"].append(time.perf_counter())
    result["step_tokens"].append(tokens)
    result["tokens_total"] += tokens
    result["computed_tokens"] = None if computed is None or result["computed_tokens"] is None else (
        result["computed_tokens"] + computed)
    if loss is not None:
        result["losses"].append(loss)
    if result["first_step_seconds"] is None:
        result["first_step_seconds"] = _process_age()


def _run_as_runner(kind: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if kind in ("trl-data", "lorafit-data"):
        import bench_data

        runner = bench_data.runner_trl_data if kind == "trl-data" else bench_data.runner_lorafit_data
        Path(spec["result"]).write_text(json.dumps(runner(spec)))
        return
    result = {"hand": runner_hand, "trl": runner_trl, "peak": runner_peak, "baseline": runner_baseline}[kind](spec)
    if "step_end" in result:
        ends, tokens = result["step_end"], result["step_tokens"]
        result["steps"] = len(ends)
        result["tokens_per_second"] = sum(tokens[1:]) / (ends[-1] - ends[0]) if len(ends) > 1 else None
        if kind == "hand" and spec["device"] == "cuda":
            import torch

            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(spec["result"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------------
# Launching and measuring processes


def _launch(command: list[str], workdir: Path, name: str, env: dict[str, str], timeout: float) -> dict:
    """Run a command to completion; wall time and this child's own peak RSS (wait4), stdout/stderr to files."""
    out, err = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=ROOT)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_seconds": time.perf_counter() - started,
            "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": out.read_text(), "stderr": err.read_text()[-3000:]}


def _fail(name: str, launched: dict) -> dict:
    print(f"[bench] {name} failed (exit {launched['returncode']}):\n{launched['stderr']}", file=sys.stderr)
    return {"ok": False, "error": launched["stderr"][-600:]}


def run_lorafit(name: str, recipe: dict, ctx: dict, timeout: float) -> dict:
    workdir = ctx["workdir"]
    recipe_file = workdir / f"{name}.yaml"
    recipe = json.loads(json.dumps(recipe))
    recipe["output"] = {"dir": str(workdir / "runs" / name), "report_to": ["none"]}
    recipe_file.write_text(json.dumps(recipe, indent=1))  # JSON is YAML
    launched = _launch(["lorafit", "train", str(recipe_file), "--json", "--overwrite"], workdir, name, ctx["env"],
                       timeout)
    if launched["returncode"] != 0:
        return _fail(name, launched)
    payload = json.loads(launched["stdout"])
    m = payload["metrics"]
    gc = ctx["device"] == "cuda" or "quantization" in recipe  # lorafit's gradient_checkpointing: auto
    return {"ok": True, "tokens_per_second": m["tokens_per_second_after_first_step"],
            "first_step_seconds": m["first_step_seconds"], "steps": m["global_step"], "tokens": m["tokens_seen"],
            "peak_mb": m["peak_memory_mb"] if ctx["device"] == "cuda" else launched["peak_rss_mb"],
            "wall_seconds": launched["wall_seconds"], "gradient_checkpointing": gc, "precision": m["precision"],
            "loss_last": m["train_loss_final"], "notes": payload["notes"], "adapter": payload["adapter"],
            "params": m["total_params"] - m["trainable_params"]}


def run_runner(name: str, kind: str, spec: dict, ctx: dict, timeout: float) -> dict:
    workdir = ctx["workdir"]
    spec = {**spec, "result": str(workdir / f"{name}.result.json"), "output_dir": str(workdir / "runs" / name),
            "device": ctx["device"]}
    spec_file = workdir / f"{name}.spec.json"
    spec_file.write_text(json.dumps(spec))
    launched = _launch([sys.executable, str(Path(__file__).resolve()), "--runner", kind, str(spec_file)], workdir, name,
                       ctx["env"], timeout)
    if launched["returncode"] != 0:
        return _fail(name, launched)
    result = json.loads(Path(spec["result"]).read_text())
    result.update(ok=True, wall_seconds=launched["wall_seconds"],
                  peak_mb=result.get("peak_gpu_mb") if ctx["device"] == "cuda" else launched["peak_rss_mb"])
    if result.get("computed_tokens"):
        result["padding_share"] = 1 - result["tokens_total"] / result["computed_tokens"]
    for key in ("step_end", "step_tokens"):
        result.pop(key, None)
    return result


def _best_of(command: list[str], ctx: dict, n: int) -> tuple[float, dict]:
    times, last = [], {}
    for i in range(n):
        last = _launch(command, ctx["workdir"], f"startup{i}", ctx["env"], 300)
        times.append(last["wall_seconds"])
    return min(times), last


# ----------------------------------------------------------------------------------------------------
# Workloads: the same rows for every run


def prepare(args, workdir: Path) -> dict:
    """Model, LoRA config and data for every run; rows are tokenized once so every run sees the same tokens."""
    from lorafit.adapters import build_peft_config
    from lorafit.models import build_meta_model, load_config, load_tokenizer, resolve_model_source
    from lorafit.recipe import load_recipe, validate_recipe
    from lorafit.templates import encode_text

    if args.quick:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_tiny_model

        model_path = str(build_tiny_model(workdir / "tiny-llama", "llama"))
    else:
        model_path = args.model
    base = {"name": "bench", "model": {"path": model_path}, "data": {"train": "x.jsonl"}}
    if args.recipe:
        loaded = load_recipe(args.recipe)
        base["model"] = loaded.model.model_dump(mode="json")
        base["adapter"] = loaded.adapter.model_dump(mode="json")
        if loaded.quantization is not None:
            print("[bench] the recipe's quantization section is left out of a/b/c (use --include-qlora)", file=sys.stderr)
    base.setdefault("adapter", {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"})
    recipe = validate_recipe(base)
    source = resolve_model_source(recipe.model)
    tokenizer = load_tokenizer(recipe, source)
    config = load_config(recipe.model, source)
    meta, _ = build_meta_model(config)
    lora = build_peft_config(recipe.adapter, meta).to_dict()
    lora = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora.items()
            if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type", "use_rslora",
                     "use_dora", "layers_to_transform", "init_lora_weights", "modules_to_save")}

    words = [w.lstrip("Ġ▁") for w in tokenizer.get_vocab() if w.lstrip("Ġ▁").isalpha() and len(w) > 2][:8000]
    rng = random.Random(args.seed)

    def text_of(n_tokens: int) -> str:
        ids: list[int] = []
        while len(ids) < n_tokens:
            ids = tokenizer(" ".join(rng.choices(words, k=n_tokens + 8)), add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[: max(n_tokens - 1, 1)])

    workloads = {}
    rows_per_run = args.steps * args.batch_size
    for name in args.workloads:
        if name == "fixed":
            length, max_length = args.fixed_length, args.fixed_length
            lengths = [length + 8] * rows_per_run  # longer than max_length: every row is cut to exactly it
        else:
            max_length = args.ragged_max
            low, high = math.log(RAGGED_MIN), math.log(min(RAGGED_MAX, args.ragged_max))
            lengths = [int(math.exp(rng.uniform(low, high))) for _ in range(args.ragged_steps * args.batch_size)]
        texts = [text_of(n) for n in lengths]
        ids = [encode_text(tokenizer, t).input_ids[:max_length] for t in texts]  # exactly what lorafit trains on
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        (workdir / f"{name}.ids.jsonl").write_text("".join(json.dumps({"input_ids": i}) + "\n" for i in ids))
        real = sum(map(len, ids))
        workloads[name] = {"rows": len(ids), "max_length": max_length, "real_tokens": real,
                           "mean_length": real / len(ids), "min_length": min(map(len, ids)),
                           "max_row": max(map(len, ids))}
    return {"model": model_path, "source": source, "adapter": recipe.adapter.model_dump(mode="json"), "lora": lora,
            "pad_token_id": tokenizer.pad_token_id, "workloads": workloads}


def lorafit_recipe(prep: dict, workload: str, args, ctx: dict, **data: Any) -> dict:
    return {
        "name": f"bench-{workload}",
        "model": {"path": prep["model"]},
        "adapter": prep["adapter"],
        "data": {"train": str(ctx["workdir"] / f"{workload}.jsonl"), "format": "text",
                 "max_length": prep["workloads"][workload]["max_length"], **data},
        "training": {"epochs": 1, "batch_size": args.batch_size, "grad_accum": 1, "learning_rate": args.lr,
                     "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 100000, "seed": args.seed},
    }


def runner_spec(prep: dict, workload: str, args, ctx: dict, **extra: Any) -> dict:
    return {"model": prep["source"], "rows": str(ctx["workdir"] / f"{workload}.ids.jsonl"), "lora": prep["lora"],
            "batch_size": args.batch_size, "learning_rate": args.lr, "seed": args.seed,
            "pad_token_id": prep["pad_token_id"], **extra}


# ----------------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="lorafit-bench-"))
    env = {**os.environ, **ENV}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    ctx = {"workdir": workdir, "env": env, "device": args.device}
    timeout = args.timeout
    print(f"[bench] working in {workdir}", file=sys.stderr)
    prep = prepare(args, workdir)
    results: dict[str, Any] = {"command": " ".join(sys.argv), "model": prep["model"], "lora": prep["lora"],
                               "batch_size": args.batch_size, "device": args.device, "workloads": {}}
    results["machine"] = _machine_info()

    peak = run_runner("peak", "peak", {}, ctx, timeout)  # measured again at the end; the higher one is kept
    baseline = run_runner("baseline", "baseline", {}, ctx, timeout)
    results["peak_gflops"] = peak.get("gflops")
    results["import_baseline_mb"] = baseline.get("peak_mb")

    for workload in args.workloads:
        plan: list[tuple[str, Any]] = [("a", lambda w=workload: run_lorafit(
            f"a-{w}", lorafit_recipe(prep, w, args, ctx, **({"packing": True} if w == "ragged" else {})), ctx, timeout))]
        if workload == "ragged":
            plan.append(("a:group", lambda w=workload: run_lorafit(
                f"a-group-{w}", lorafit_recipe(prep, w, args, ctx, group_by_length=True), ctx, timeout)))
        if workload == "fixed" or args.b_ragged:
            plan.append(("b", lambda w=workload: run_runner(f"b-{w}", "trl", runner_spec(
                prep, w, args, ctx, max_steps=args.b_steps), ctx, timeout)))
        plan.append(("b'", lambda w=workload: run_runner(f"b1-{w}", "trl", runner_spec(
            prep, w, args, ctx, trl_overrides={"bf16": False}), ctx, timeout)))
        if args.trl_tuned:
            plan.append(("b''", lambda w=workload: run_runner(f"b2-{w}", "trl", runner_spec(
                prep, w, args, ctx, trl_overrides={"bf16": False, "gradient_checkpointing": False}), ctx, timeout)))
        plan.append(("c", lambda w=workload: run_runner(f"c-{w}", "hand", runner_spec(prep, w, args, ctx), ctx,
                                                        timeout)))
        if args.include_qlora and workload == "fixed":
            plan.append(("a:qlora", lambda w=workload: run_lorafit(
                f"a-qlora-{w}", {**lorafit_recipe(prep, w, args, ctx), "quantization": {"bits": 4}}, ctx, timeout)))
        if args.runs:
            plan = [(name, run) for name, run in plan if name in args.runs]
        rounds: dict[str, list[dict]] = {name: [] for name, _ in plan}
        for repeat in range(args.repeats):  # interleaved: a, b, b', c, a, b, b', c, ...
            for name, run in plan:
                if name == "b" and repeat:  # TRL defaults on an emulated-bf16 CPU: one round is plenty
                    continue
                print(f"[bench] {workload}: {name} (round {repeat + 1}/{args.repeats})", file=sys.stderr, flush=True)
                rounds[name].append(run())
        runs = {name: _best_run(found) for name, found in rounds.items()}
        for run in runs.values():
            _add_mfu(run, results["peak_gflops"], prep)
        results["workloads"][workload] = {**prep["workloads"][workload], "runs": runs, "ratios": _ratios(runs)}

    if not args.skip_startup:
        results["startup"] = measure_startup(args, ctx, results)
    again = run_runner("peak-end", "peak", {}, ctx, timeout).get("gflops") or 0
    if again > (results["peak_gflops"] or 0):  # MFU is recomputed against the better peak measurement
        results["peak_gflops"] = again
        for workload in results["workloads"].values():
            for run in workload["runs"].values():
                _add_mfu(run, again, prep)
    results["targets"] = evaluate_targets(results)
    if args.keep:
        results["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _best_run(found: list[dict]) -> dict:
    """The fastest round of a run: on a shared machine the others are slowed by neighbours, never sped up."""
    ok = [r for r in found if r.get("ok") and r.get("tokens_per_second")]
    if not ok:
        return found[-1] if found else {"ok": False}
    best = dict(max(ok, key=lambda r: r["tokens_per_second"]))
    if len(found) > 1:
        best["tokens_per_second_all"] = [r.get("tokens_per_second") or 0.0 for r in found]
    return best


def _add_mfu(run: dict, peak_gflops: float | None, prep: dict) -> None:
    params = run.get("params") or prep.get("params")
    if params and not prep.get("params"):
        prep["params"] = params
    if run.get("ok") and run.get("tokens_per_second") and peak_gflops and params:
        flops_per_token = (6 if run.get("gradient_checkpointing") else 4) * params
        run["mfu"] = run["tokens_per_second"] * flops_per_token / (peak_gflops * 1e9)


def _ratios(runs: dict) -> dict:
    def ratio(x: str, y: str) -> float | None:
        a, b = runs.get(x, {}), runs.get(y, {})
        if a.get("tokens_per_second") and b.get("tokens_per_second"):
            return a["tokens_per_second"] / b["tokens_per_second"]
        return None

    out = {f"{x}/{y}": ratio(x, y) for x in ("a", "a:group") for y in ("b", "b'", "b''", "c")}
    if runs.get("a:qlora", {}).get("ok") and runs["a"].get("ok"):
        out["qlora/a speed"] = ratio("a:qlora", "a")
        out["qlora/a peak memory"] = runs["a:qlora"]["peak_mb"] / runs["a"]["peak_mb"]
    return {k: v for k, v in out.items() if v is not None}


def measure_startup(args, ctx: dict, results: dict) -> dict:
    from lorafit.recipe import dump_recipe, validate_recipe

    recipe_file = ctx["workdir"] / "startup.yaml"
    recipe_file.write_text(dump_recipe(validate_recipe(
        {"name": "s", "model": {"path": "smollm2-135m-instruct"}, "data": {"train": str(ctx["workdir"] / "x.jsonl")}})))
    out: dict[str, Any] = {}
    out["help_seconds"], _ = _best_of(["lorafit", "--help"], ctx, 5)
    out["validate_seconds"], _ = _best_of(["lorafit", "validate", str(ROOT / "configs" / "quickstart.yaml")], ctx, 5)
    out["python_startup_seconds"], _ = _best_of([sys.executable, "-c", "pass"], ctx, 5)

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_config_only

    folder = build_config_only(ctx["workdir"] / "llama-70b", "llama", "llama-70b")
    seconds, launched = _best_of(["lorafit", "inspect-modules", str(folder), "--json"], ctx, 3)
    out["inspect_70b_seconds"] = seconds if launched["returncode"] == 0 else None
    out["inspect_70b_peak_rss_mb"] = launched["peak_rss_mb"]
    # What no inspect can go below here: importing the libraries that build the skeleton and count the adapter.
    out["inspect_import_floor_seconds"], _ = _best_of(
        [sys.executable, "-c", "import peft, transformers.modeling_utils"], ctx, 3)

    adapter = results["workloads"].get("fixed", {}).get("runs", {}).get("a", {}).get("adapter")
    if adapter and not args.quick:
        merged = ctx["workdir"] / "merged"
        launched = _launch(["lorafit", "merge", adapter, "--out", str(merged), "--json"], ctx["workdir"], "merge",
                           ctx["env"], args.timeout)
        if launched["returncode"] == 0:
            size = sum(p.stat().st_size for p in merged.glob("*.safetensors")) / 2**20
            baseline = results.get("import_baseline_mb") or 0
            out["merge"] = {"peak_rss_mb": launched["peak_rss_mb"], "merged_size_mb": size,
                            "peak_over_size": launched["peak_rss_mb"] / size,
                            "peak_above_import_baseline_over_size": (launched["peak_rss_mb"] - baseline) / size,
                            "wall_seconds": launched["wall_seconds"]}
        else:
            out["merge"] = _fail("merge", launched)
    return out


def evaluate_targets(results: dict) -> list[dict]:
    targets = []

    def target(name: str, value: float | None, op: str, bound: float, note: str = "") -> None:
        passed = None if value is None else (value >= bound if op == ">=" else value <= bound if op == "<=" else
                                             value < bound)
        targets.append({"target": name, "value": value, "bound": f"{op} {bound}", "passed": passed, "note": note})

    fixed = results["workloads"].get("fixed", {}).get("ratios", {})
    ragged = results["workloads"].get("ragged", {}).get("ratios", {})
    target("fixed: a/c tokens/s", fixed.get("a/c"), ">=", 0.95)
    target("ragged: a/c tokens/s (packing)", ragged.get("a/c"), ">=", 1.5)
    target("ragged: a:group/c tokens/s (group_by_length)", ragged.get("a:group/c"), ">=", 1.5)
    bf16_native = results["machine"].get("cpu_native_bf16")
    if results["device"] == "cpu" and not bf16_native:
        target("fixed: a/b (TRL defaults, CPU without native bf16)", fixed.get("a/b"), ">=", 10)
        if "a/b" in ragged:
            target("ragged: a/b (TRL defaults)", ragged.get("a/b"), ">=", 10)
    target("fixed: a/b' (TRL, best precision by hand)", fixed.get("a/b'"), ">=", 1.0)
    target("ragged: a/b' (TRL, best precision by hand)", ragged.get("a/b'"), ">=", 1.0)
    if "qlora/a peak memory" in fixed:
        target("QLoRA peak memory / LoRA peak memory", fixed["qlora/a peak memory"], "<=", 0.5,
               "whole-process RSS, imports included")
    startup = results.get("startup", {})
    if startup:
        target("lorafit --help (s)", startup.get("help_seconds"), "<", 0.5)
        target("lorafit validate (s)", startup.get("validate_seconds"), "<", 0.5)
        floor = startup.get("inspect_import_floor_seconds")
        target("inspect-modules on a 70B config-only folder (s)", startup.get("inspect_70b_seconds"), "<", 5,
               f"of which importing torch+transformers+peft {floor:.1f} s" if floor else "")
        merge = startup.get("merge") or {}
        if merge.get("peak_rss_mb"):
            target("merge: peak RSS above import baseline / merged size", merge["peak_above_import_baseline_over_size"],
                   "<=", 1.3, f"whole process: {merge['peak_over_size']:.2f}x")
    return targets


def _machine_info() -> dict:
    import platform

    from lorafit.models import cpu_has_native_bf16

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "cpu_native_bf16": cpu_has_native_bf16(), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


# ----------------------------------------------------------------------------------------------------
# Report


def render(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    machine = results["machine"]
    console.print(f"[bold]lorafit benchmark[/bold]  model {results['model']}  device {results['device']}  "
                  f"{machine['cores']} cores  native bf16: {machine['cpu_native_bf16']}  "
                  f"matmul peak {results['peak_gflops'] or 0:.0f} GFLOP/s  import baseline "
                  f"{results['import_baseline_mb'] or 0:.0f} MiB")
    for name, workload in results["workloads"].items():
        table = Table(title=f"{name} rows: {workload['rows']} rows, {workload['real_tokens']:,} real tokens, length "
                      f"{workload['min_length']}-{workload['max_row']} (mean {workload['mean_length']:.0f}), batch "
                      f"{results['batch_size']}")
        for column in ("run", "tokens/s", "vs c", "first step (s)", "peak MiB", "MFU", "steps", "padding", "notes"):
            table.add_column(column, justify="left" if column in ("run", "notes") else "right")
        base = workload["runs"].get("c", {}).get("tokens_per_second")
        for run_name, run in workload["runs"].items():
            if not run.get("ok"):
                table.add_row(run_name, "failed", "", "", "", "", "", "", (run.get("error") or "")[-60:])
                continue
            tps = run.get("tokens_per_second")
            spread = run.get("tokens_per_second_all")
            table.add_row(
                run_name, f"{tps:,.1f}" if tps else "-", f"{tps / base:.2f}x" if tps and base else "-",
                _num(run.get("first_step_seconds"), ".1f"), _num(run.get("peak_mb"), ",.0f"), _num(run.get("mfu"), ".1%"),
                str(run.get("steps", "")), _num(run.get("padding_share"), ".0%"),
                (f"runs {', '.join(f'{x:.0f}' for x in spread)} " if spread else "") + _describe(run_name, run))
        console.print(table)
        console.print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in workload["ratios"].items()))
    startup = results.get("startup")
    if startup:
        merge = startup.get("merge") or {}
        console.print(f"start-up: --help {startup['help_seconds']:.2f} s, validate {startup['validate_seconds']:.2f} s "
                      f"(python alone {startup['python_startup_seconds']:.2f} s); inspect-modules 70B "
                      f"{_num(startup.get('inspect_70b_seconds'), '.2f')} s (imports alone "
                      f"{_num(startup.get('inspect_import_floor_seconds'), '.2f')} s)"
                      + (f"; merge peak {merge['peak_rss_mb']:,.0f} MiB for a {merge['merged_size_mb']:,.0f} MiB model"
                         if merge.get("peak_rss_mb") else ""))
    table = Table(title="targets")
    for column in ("target", "value", "bound", "met", "note"):
        table.add_column(column)
    for t in results["targets"]:
        met = {True: "[green]yes[/green]", False: "[red]NO[/red]", None: "-"}[t["passed"]]
        table.add_row(t["target"], _num(t["value"], ".2f"), t["bound"], met, t["note"])
    console.print(table)


def _describe(name: str, run: dict) -> str:
    return {"a": "lorafit train", "a:group": "lorafit, group_by_length", "a:qlora": "lorafit, QLoRA 4-bit",
            "b": "TRL defaults (bf16, grad ckpt)", "b'": "TRL, bf16=False", "b''": "TRL, bf16=False, no grad ckpt",
            "c": "hand loop"}.get(name, "") + (", packing" if name == "a" and any(
                "packing" in n for n in run.get("notes", [])) else "")


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model path, hub id or built-in alias")
    parser.add_argument("--recipe", help="take the model and adapter (LoRA config) from this recipe")
    parser.add_argument("--workloads", default="fixed,ragged", help="comma list: fixed, ragged")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of padded batches per run, fixed rows")
    parser.add_argument("--ragged-steps", type=int, default=6, help="the same for ragged rows")
    parser.add_argument("--b-steps", type=int, default=2, help="steps for TRL defaults (b); the first is warm-up")
    parser.add_argument("--b-ragged", action="store_true", help="also run TRL defaults (b) on ragged rows (slow)")
    parser.add_argument("--trl-tuned", action="store_true", help="also run TRL with bf16=False and no gradient "
                        "checkpointing (b'')")
    parser.add_argument("--runs", help="only these runs, comma list of: a, a:group, a:qlora, b, b', b'', c")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fixed-length", type=int, default=64, help="tokens per row, fixed workload")
    parser.add_argument("--ragged-max", type=int, default=RAGGED_MAX, help="longest row (and max_length), ragged")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--include-qlora", action="store_true", help="also train QLoRA 4-bit on fixed rows")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the fastest round of each run is kept")
    parser.add_argument("--quick", action="store_true", help="tiny random model, few short rows: a smoke test")
    parser.add_argument("--skip-startup", action="store_true", help="skip --help/validate/inspect/merge timings")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    parser.add_argument("--out", default="bench-results.json", help="JSON results file")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (runs, logs, recipes)")
    parser.add_argument("--data-scale", action="store_true", help="data-scale mode instead (scripts/bench_data.py): "
                        "time and memory until the data is ready, lorafit vs TRL, first and cached run")
    parser.add_argument("--rows", default="50000", help="--data-scale: comma list of row counts")
    parser.add_argument("--stream-rows", type=int, default=0, help="--data-scale: also train 10 steps streaming a "
                        "file of this many rows")
    parser.add_argument("--max-length", type=int, default=1024, help="--data-scale: data.max_length / TRL max_length")
    parser.add_argument("--skip-trl", action="store_true", help="--data-scale: lorafit runs only")
    parser.add_argument("--trl-rows", help="--data-scale: comma list of the row counts TRL also runs at (default: "
                        "all of --rows; TRL prepares in one process, over an hour at 500k rows on 2 cores)")
    parser.add_argument("--workdir", help="--data-scale: where the data files and caches go (default .bench-data)")
    parser.add_argument("--runner", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.runs = [r.strip() for r in args.runs.split(",")] if args.runs else None
    args.rows = [int(r) for r in str(args.rows).split(",") if r.strip()]
    args.trl_rows = args.rows if args.trl_rows is None else [int(r) for r in args.trl_rows.split(",") if r.strip()]
    if args.quick and args.data_scale:
        args.rows, args.stream_rows = [2000], args.stream_rows and 5000
    unknown = set(args.workloads) - {"fixed", "ragged"}
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    if args.quick:
        args.steps, args.ragged_steps, args.fixed_length, args.ragged_max = 4, 4, 32, 96
        args.batch_size = min(args.batch_size, 4)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.runner:
        _run_as_runner(*args.runner)
        return 0
    if args.data_scale:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_data import render_data_scale, run_data_scale

        results = run_data_scale(args, {**os.environ, **ENV, "PYTHONPATH": str(ROOT)})
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        render_data_scale(results)
        print(f"results: {args.out}")
        return 0
    if args.device == "auto":
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True)
        args.device = "cuda" if probe.stdout.strip() == "True" else "cpu"
    results = run_benchmark(args)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    render(results)
    print(f"results: {args.out}")
    failed = [t["target"] for t in results["targets"] if t["passed"] is False]
    return 1 if failed and not args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
