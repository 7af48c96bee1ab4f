"""Peak host memory of evaluation's loss: full-vocabulary fp32 logits (before) vs lorafit.loss.summed_next_token_loss.

    python scripts/eval_loss_memory.py                  # SmolLM2-135M (vocab 49,152), batch 8 x 512, half prompt

Each variant runs in its own process on the same batch; prints the peak RSS above the loaded model and both losses.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def worker(variant: str, model_path: str, batch: int, length: int) -> None:
    import resource

    import torch

    from lorafit import models
    from lorafit.loss import summed_next_token_loss
    from lorafit.recipe import validate_recipe

    recipe = validate_recipe({"name": "m", "model": {"path": model_path}, "data": {"train": "unused.jsonl"},
                              "training": {"precision": "fp32"}})
    model = models.load_base_model(recipe, models.resolve_model_source(recipe.model),
                                   models.Precision("fp32", "cpu", "measurement")).eval()
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (batch, length))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # the prompt half is not scored
    with torch.no_grad():  # warm-up pass at a tiny size so one-time allocations are not counted
        model(input_ids=ids[:1, :8])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if variant == "full":
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum").item()
    else:
        loss = summed_next_token_loss(model, ids, mask, labels)[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"variant": variant, "peak_above_model_mib": round(peak - before),
                                  "summed_loss": loss}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--worker", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.batch_size, args.length)
        return
    for variant in ("full", "chunked"):
        run = subprocess.run([sys.executable, __file__, "--worker", variant, "--model", args.model,
                              "--batch-size", str(args.batch_size), "--length", str(args.length)],
                             capture_output=True, text=True, check=False)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            sys.exit(run.stderr[-3000:])
        print(lines[0].removeprefix("RESULT "))


if __name__ == "__main__":
    main()
