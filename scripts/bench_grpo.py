"""A lorafit GRPO step vs TRL's GRPOTrainer with its defaults, side by side (docs/performance.md, "GRPO").

One invocation runs both in fresh processes, one after the other, on the same workload: the model, prompts, group
size, completions per step, completion length, rewards (the same functions), LoRA shape, learning rate and seed of
a lorafit recipe (default configs/quickstart-grpo.yaml):

- lorafit: the recipe through `lorafit.train.run_train`, with only max_steps, no eval, no checkpoints written
  mid-run and no trackers changed;
- trl: `trl.GRPOTrainer(model=<the same model folder>, reward_funcs=..., args=GRPOConfig(...), peft_config=...)`
  with GRPOConfig's defaults (bf16, gradient checkpointing, loss dapo, ...) except the workload above and what must
  be set at all: `use_cpu=True` on a CPU-only machine, `output_dir`, logging every step and no trackers.

Both children get the same environment (OMP_NUM_THREADS is passed through unchanged: set it for both, e.g.
OMP_NUM_THREADS=1 on a busy 2-core machine). Seconds per step is the median time between the ends of consecutive
optimizer steps (sampling, rewards, forward, backward, optimizer) over steps 2..N, measured the same way on both
sides; peak RSS is each child's ru_maxrss. Mean rewards are each run's logged reward per step, at the same seed.

    OMP_NUM_THREADS=1 python scripts/bench_grpo.py [--recipe configs/quickstart-grpo.yaml] [--steps 5] [--out /tmp/bench-grpo]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _recipe(path: Path, steps: int, out: Path):
    from lorafit.recipe import load_recipe

    return load_recipe(path, [f"training.max_steps={steps}", "data.eval=null", f"training.save_steps={steps}",
                              f"output.dir={out}", "output.report_to=[none]"])


def run_lorafit(recipe_path: Path, steps: int, out: Path) -> dict:
    """The recipe through lorafit's own train function; the logged history."""
    from rich.console import Console

    from lorafit.train import run_train

    result = run_train(_recipe(recipe_path, steps, out), Console(quiet=True), overwrite=True)
    return {"history": result.metrics.loss_history, "precision": result.metrics.precision,
            "gradient_checkpointing": "auto (off on a CPU)"}


def run_trl(recipe_path: Path, steps: int, out: Path) -> dict:
    """TRL's GRPOTrainer with GRPOConfig's defaults on the recipe's workload; the logged history."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lorafit import models, rewards
    from lorafit.prompt_data import ANSWER

    recipe = _recipe(recipe_path, steps, out)
    model_dir = models.resolve_model_source(recipe.model)
    rows = [json.loads(line) for line in Path(recipe.data.train).read_text().splitlines() if line.strip()]
    # The rows as a TRL user writes them: the conversation before the answer as the prompt, the answer beside it.
    dataset = Dataset.from_list([{"prompt": row["messages"][:-1], ANSWER: row["messages"][-1]["content"]}
                                 for row in rows])
    built = rewards.build_rewards(recipe.rewards, recipe_dir=Path(recipe_path).parent, allow_code=False)
    generation, t, adapter = recipe.generation, recipe.training, recipe.adapter
    config = GRPOConfig(
        output_dir=str(out), use_cpu=True,  # TRL refuses to start on a CPU-only machine without it
        max_steps=steps, logging_steps=1, report_to="none", save_strategy="no",
        # The workload, as in the lorafit recipe:
        num_generations=generation.num_generations, max_completion_length=generation.max_completion_length,
        temperature=generation.temperature, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate, seed=t.seed,
        reward_weights=[spec.weight for spec in recipe.rewards],
    )
    peft_config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                             target_modules=adapter.target_modules, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=built.functions, args=config, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft_config)
    trainer.train()
    return {"history": trainer.state.log_history, "precision": "bf16" if config.bf16 else "fp32",
            "gradient_checkpointing": config.gradient_checkpointing}


def _stamp_steps() -> list[float]:
    """The time each optimizer step ends, for either side the same way: lorafit's run_train takes no callbacks, so
    the bench (not lorafit) wraps transformers' CallbackHandler.on_step_end, which every Trainer calls once a step."""
    from transformers.trainer_callback import CallbackHandler

    stamps: list[float] = []
    on_step_end = CallbackHandler.on_step_end

    def stamped(self, args, state, control):
        stamps.append(time.perf_counter())
        return on_step_end(self, args, state, control)

    CallbackHandler.on_step_end = stamped
    return stamps


def _child(kind: str, recipe: Path, steps: int, out: Path) -> None:
    """Run one side in this process and print its JSON summary as the last line."""
    started = time.perf_counter()
    stamps = _stamp_steps()
    result = (run_lorafit if kind == "lorafit" else run_trl)(recipe, steps, out / kind)
    logged = [entry for entry in result["history"] if "reward" in entry]
    step_times = [later - earlier for earlier, later in itertools.pairwise(stamps)]  # steps 2..N: no warm-up
    print(json.dumps({
        "kind": kind, "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "step_seconds": [round(s, 2) for s in step_times],
        "seconds_per_step": round(statistics.median(step_times), 2) if step_times else None,
        "rewards": [round(entry["reward"], 4) for entry in logged if "reward" in entry],
        "mean_length": [round(entry["completions/mean_length"], 2) for entry in logged
                        if "completions/mean_length" in entry],
        "precision": result["precision"], "gradient_checkpointing": result["gradient_checkpointing"],
        "torch_threads": __import__("torch").get_num_threads(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO_ROOT / "configs" / "quickstart-grpo.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-grpo"))
    parser.add_argument("--child", choices=("lorafit", "trl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.recipe.resolve(), args.steps, args.out)
        return
    runs = {}
    for kind in ("lorafit", "trl"):
        done = subprocess.run([sys.executable, __file__, "--child", kind, "--recipe", str(args.recipe.resolve()),
                               "--steps", str(args.steps), "--out", str(args.out)],
                              capture_output=True, text=True, cwd=REPO_ROOT, env=os.environ.copy(), check=False)
        if done.returncode:
            sys.exit(f"{kind} failed:\n{done.stderr[-4000:]}")
        runs[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(runs[kind]), flush=True)
    lorafit, trl = runs["lorafit"], runs["trl"]
    summary = {
        "recipe": str(args.recipe), "steps": args.steps, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "lorafit_seconds_per_step": lorafit["seconds_per_step"], "trl_seconds_per_step": trl["seconds_per_step"],
        "step_ratio_lorafit_over_trl": round(lorafit["seconds_per_step"] / trl["seconds_per_step"], 2),
        "lorafit_peak_rss_mib": lorafit["peak_rss_mib"], "trl_peak_rss_mib": trl["peak_rss_mib"],
        "lorafit_mean_reward": round(statistics.mean(lorafit["rewards"]), 4),
        "trl_mean_reward": round(statistics.mean(trl["rewards"]), 4),
        "goal_met (ratio <= 0.7)": lorafit["seconds_per_step"] <= 0.7 * trl["seconds_per_step"],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
