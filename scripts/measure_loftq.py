"""How much closer `adapter.init: loftq` starts a QLoRA model to the full-precision one than the 4-bit base alone.

    python scripts/measure_loftq.py                          # SmolLM2-135M-Instruct (built in), r 16 and 64
    python scripts/measure_loftq.py --model path/to/model --ranks 8 16 --out loftq.json

Loads the model three ways, as `lorafit train` does (lorafit.models / lorafit.adapters): full precision (fp32), 4-bit
NF4 with a default LoRA start (B = 0: exactly the 4-bit base), and 4-bit with the LoftQ start. On a few chat prompts
it prints, against the full-precision model: mean |logit difference|, KL(full || model) per token and top-1 agreement;
and the summed weight error the LoftQ start leaves (lorafit.adapter_init.LoftqReport). Before any training: this is
the start LoftQ gives, not what training then reaches.
"""

from __future__ import annotations

import argparse
import json
import time

PROMPTS = (
    "What is the capital of France?",
    "Reverse the order of these words: apple river stone cloud",
    "Write one sentence about the sea.",
    "List three colours and one thing of each colour.",
)


def _recipe(model: str, rank: int, init: str, quantized: bool):
    from lorafit.recipe import validate_recipe

    raw = {"name": "loftq", "model": {"path": model}, "data": {"train": "unused.jsonl"},
           "adapter": {"r": rank, "dropout": 0.0, "init": init}, "training": {"precision": "fp32"}}
    if quantized:
        raw["quantization"] = {"bits": 4}
    return validate_recipe(raw)


def _logits(model, prompts) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=ids).logits[0].float() for ids in prompts]


def _compare(got: list, want: list) -> dict[str, float]:
    import torch

    diffs = torch.cat([(g - w).abs().flatten() for g, w in zip(got, want, strict=True)])
    kl = torch.cat([torch.nn.functional.kl_div(g.log_softmax(-1), w.log_softmax(-1), log_target=True,
                                               reduction="none").sum(-1) for g, w in zip(got, want, strict=True)])
    top1 = torch.cat([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want, strict=True)]).float()
    return {"mean_abs_logit_diff": diffs.mean().item(), "kl_per_token": kl.mean().item(),
            "top1_agreement": top1.mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    import torch

    from lorafit import adapter_init, adapters, models

    torch.manual_seed(0)
    precision = models.Precision("fp32", "cpu", "measurement")
    recipe = _recipe(args.model, args.ranks[0], "default", quantized=False)
    source = models.resolve_model_source(recipe.model)
    tokenizer = models.load_tokenizer(recipe, source)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"] for p in PROMPTS]
    full = _logits(models.load_base_model(recipe, source, precision), prompts)
    results = []
    for rank in args.ranks:
        for init in ("default", "loftq"):
            recipe = _recipe(args.model, rank, init, quantized=True)
            started = time.perf_counter()
            model = adapters.wrap_model(recipe, models.load_base_model(recipe, source, precision),
                                        gradient_checkpointing=False)
            seconds = time.perf_counter() - started
            models.keep_4bit_layers_as_trained(model)
            start = adapter_init.start_of(model)
            row = {"rank": rank, "init": init, **_compare(_logits(model, prompts), full),
                   "load_and_wrap_seconds": round(seconds, 1), "note": start.note if start else None}
            results.append(row)
            print(json.dumps(row), flush=True)
            del model
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "prompts": list(PROMPTS), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
