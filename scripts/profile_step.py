"""Where the time of one LoRA training step goes on this machine (the findings are in docs/performance.md).

    python scripts/profile_step.py                      # SmolLM2-135M, LoRA r16 all-linear, batch 8 x 64 tokens
    python scripts/profile_step.py --length 256 --prompt-share 0.5 --top 30

Loads the model and wraps it as `lorafit train` does (lorafit.models / lorafit.adapters), then times, in this
one process and on the same batch:
  - the phases of a step (forward, backward, optimizer) with the full-vocabulary loss a hand loop computes;
  - the same step with lorafit's trained-positions loss (lorafit/loss.py), when the rows have a prompt share;
  - that step without LoRA dropout (PEFT draws one random mask per adapted module and step);
  - fp32 against bf16 autocast (what TRL's `bf16=True` default runs on a CPU);
and prints torch.profiler's operator table for the fp32 step.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--prompt-share", type=float, default=0.5, help="share of each row that is prompt (untrained)")
    parser.add_argument("--steps", type=int, default=4, help="interleaved timed rounds (after one warm-up step each)")
    parser.add_argument("--top", type=int, default=20, help="rows of the operator table")
    parser.add_argument("--skip-bf16", action="store_true", help="skip the (slow) bf16 autocast step")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from lorafit import adapters, models
    from lorafit.loss import trained_positions_loss
    from lorafit.recipe import validate_recipe

    recipe = validate_recipe({"name": "profile", "model": {"path": args.model}, "data": {"train": "unused.jsonl"},
                              "adapter": {"target_modules": "all-linear"}, "training": {"precision": "fp32"}})
    source = models.resolve_model_source(recipe.model)
    precision, _ = models.choose_precision("fp32")
    model = adapters.wrap_model(recipe, models.load_base_model(recipe, source, precision), gradient_checkpointing=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    torch.manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab - 1, (args.batch_size, args.length))
    labels = ids.clone()
    labels[:, : int(args.length * args.prompt_share)] = -100  # the prompt: not trained
    full_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    lora_dropouts = [m for name, m in model.named_modules() if ".lora_dropout." in f"{name}."]

    def step(loss_kind: str, autocast: bool = False, dropout: bool = True) -> dict[str, float]:
        for module in lora_dropouts:  # eval mode switches a dropout off: what adapter.dropout: 0 gives
            module.train(dropout)
        times = {}
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if loss_kind == "full":
                loss = model(**full_inputs).loss  # transformers' loss: every position through the LM head
            else:
                loss = trained_positions_loss(model, full_inputs)
        times["forward"] = time.perf_counter() - started
        started = time.perf_counter()
        loss.backward()
        times["backward"] = time.perf_counter() - started
        started = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times["optimizer"] = time.perf_counter() - started
        times["step"] = sum(times.values())
        return times

    # Interleaved rounds, fastest of each kept: on a shared machine neighbours only ever slow a step down.
    variants = {"fp32, full-vocabulary loss (hand loop)": ("full", False, True),
                "fp32, trained-positions loss (lorafit)": ("trained", False, True),
                "  ... and adapter.dropout: 0": ("trained", False, False)}
    for variant in variants.values():
        step(*variant)  # warm-up
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, variant in variants.items():
            rounds[name].append(step(*variant))
    if not args.skip_bf16:  # ~20x slower on a CPU without native bf16: one warm-up and one timed step
        name = "bf16 autocast, full loss (TRL bf16=True on CPU)"
        step("full", autocast=True)
        rounds[name] = [step("full", autocast=True)]
    tokens = args.batch_size * args.length
    print(f"model {source}  batch {args.batch_size} x {args.length} tokens  prompt share {args.prompt_share:.0%}  "
          f"threads {torch.get_num_threads()}")
    best = {name: min(runs, key=lambda r: r["step"]) for name, runs in rounds.items()}
    baseline = best["fp32, full-vocabulary loss (hand loop)"]["step"]
    for name, t in best.items():
        print(f"{name:50s} step {t['step']:7.3f} s  (fwd {t['forward']:.3f}, bwd {t['backward']:.3f}, "
              f"opt {t['optimizer']:.3f})  {tokens / t['step']:8.0f} tok/s  x{baseline / t['step']:.2f}")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step("full")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
