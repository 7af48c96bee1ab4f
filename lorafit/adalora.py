"""AdaLoRA in lorafit's training loop: the rank budget schedule, its regulariser and its resumable state.

PEFT's AdaLoRA (`adapter.method: adalora`) starts every module at `init_r` singular-value triplets and, while
training, prunes the least important ones until an average of `target_r` remain. PEFT leaves three things to the
training loop, and `AdaLoraTraining` (a mixin of lorafit's trainers, inert for every other method) does them:

- `update_and_allocate(step)` after every optimizer step, with the gradients still there (PEFT: "after
  loss.backward() and before zero_grad()"): the Trainer's `on_optimizer_step` callback event is exactly that point
  (`RankBudget`). Steps are counted from 1, so `tinit` steps run at full rank and the last `tfinal` at the final ranks,
  as PEFT's AdaLoraConfig documents them.
- The orthogonal regulariser, which AdaLoraModel.forward adds only to a loss the model computes itself from `labels`.
  lorafit's causal-LM loss (lorafit/loss.py) and TRL's fused one compute the loss outside the model, so the mixin adds
  it there (`orthogonal_regularisation`); the plain Trainer of a classifier takes the model's own loss, which has it.
- Exact resume. The importance scores (RankAllocator's ipt / exp_avg_ipt / exp_avg_unc) and the rank pattern live
  outside the optimizer, and PEFT saves an adapter cut down to its current rank pattern, which a resumed run could
  not load back into its full-size matrices. So a checkpoint holds the full matrices and `adalora_state.safetensors`
  (the allocator's scores, the rank pattern in its metadata); a resumed run restores both before its first step.

The exported adapter is PEFT's own: cut to the final ranks, with the rank pattern in adapter_config.json, so
`peft.PeftModel.from_pretrained` loads it (and merges it) without lorafit.

This module imports transformers at the top: import it inside the function that trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import transformers

from lorafit.errors import LorafitError
from lorafit.recipe import adalora_schedule_problem

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

    from lorafit.recipe import AdapterSection

STATE_FILE = "adalora_state.safetensors"
_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # RankAllocator's per-weight dictionaries


def is_adalora(model: Any) -> bool:
    """Whether `model` is a PEFT model whose trainable adapter is AdaLoRA."""
    from peft.tuners.adalora import AdaLoraModel

    return isinstance(getattr(model, "base_model", None), AdaLoraModel) and hasattr(model.base_model, "rankallocator")


def final_ranks(model: PeftModel) -> dict[str, int] | None:
    """Each adapted module's rank in the current rank pattern (None before the first pruning)."""
    tuner = model.base_model
    pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern
    if not pattern:
        return None
    suffix = f".lora_E.{tuner.trainable_adapter_name}"
    return {name.removesuffix(suffix).removesuffix(".lora_E"): int(sum(kept)) for name, kept in pattern.items()}


def orthogonal_regularisation(model: PeftModel) -> torch.Tensor:
    """AdaLoRA's regulariser: the mean Frobenius distance of P^T P and Q Q^T from the identity, over every A and B.

    The same value AdaLoraModel.forward adds to a model-computed loss (tests/test_adalora.py compares them).
    """
    import torch

    tuner = model.base_model
    adapter = tuner.trainable_adapter_name
    distances = []
    for name, weight in tuner.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            product = weight @ weight.T if "lora_A" in name else weight.T @ weight
            identity = torch.eye(*product.shape, device=product.device, dtype=product.dtype)
            distances.append(torch.linalg.matrix_norm(product - identity, ord="fro"))
    return torch.stack(distances).mean()


class RankBudget(transformers.TrainerCallback):
    """Runs AdaLoRA's budget schedule: `update_and_allocate` once per optimizer step, gradients still present.

    `total_step` is set from the Trainer's own step count when training begins; a checkpoint's allocator state is
    restored before the first step of a resumed run (`resume_from`), after the Trainer has loaded its weights.
    """

    def __init__(self, model: PeftModel, adapter: AdapterSection):
        self.model = model
        self.adapter = adapter
        self.resume_from: Path | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        tuner = self.model.base_model
        config = tuner.peft_config[tuner.trainable_adapter_name]
        if config.total_step != state.max_steps:  # train.py plans it from the data; the Trainer's count decides
            problem = adalora_schedule_problem(self.adapter, state.max_steps, "as the Trainer counts them")
            if problem:
                raise LorafitError(problem, where="adapter")
            tuner.rankallocator.set_total_step(state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.resume_from is not None:
            restore_state(self.model, self.resume_from)
            self.resume_from = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        # After optimizer.step(), before zero_grad(); state.global_step still counts the steps before this one.
        self.model.base_model.update_and_allocate(state.global_step + 1)


class AdaLoraTraining:
    """Trainer mixin for `adapter.method: adalora` (inert for other methods): adds the `RankBudget` callback and the
    orthogonal regulariser to the training loss, and makes checkpoints resumable exactly (full-rank matrices and the
    allocator state).

    `model_adds_orthogonal_regularisation`: True for a trainer whose loss is the model's own output loss
    (AdaLoraModel.forward has added the term to it already).
    """

    model_adds_orthogonal_regularisation = False

    def __init__(self, *args, adapter: AdapterSection | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank_budget = RankBudget(self.model, adapter) if adapter is not None and is_adalora(self.model) else None
        if self.rank_budget is not None:
            self.add_callback(self.rank_budget)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self.rank_budget is None or self.model_adds_orthogonal_regularisation or not model.training:
            return result
        tuner = self.model.base_model
        weight = tuner.peft_config[tuner.trainable_adapter_name].orth_reg_weight
        if not weight:
            return result
        term = weight * orthogonal_regularisation(self.model)
        # Once per optimizer step: the Trainer divides a micro-batch's loss by the accumulation steps unless the loss
        # is already normalised over the whole step (Trainer.training_step's own test).
        scaled_for_accumulation = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        if scaled_for_accumulation:
            term = term / self.current_gradient_accumulation_steps
        if return_outputs:
            return (result[0] + term, *result[1:])
        return result + term

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.rank_budget is not None and resume_from_checkpoint:
            self.rank_budget.resume_from = Path(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.rank_budget is None or not _internal_call:
            return super().save_model(output_dir, _internal_call)
        # A checkpoint: PEFT would cut the matrices to the current rank pattern, which a resumed run could not load
        # into its full-size ones (and pruned triplets may still come back while the budget shrinks).
        tuner = self.model.base_model
        config = tuner.peft_config[tuner.trainable_adapter_name]
        pattern, config.rank_pattern = config.rank_pattern, None
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            config.rank_pattern = pattern
        if self.args.should_save:
            save_state(self.model, Path(output_dir or self.args.output_dir))


def save_state(model: PeftModel, folder: Path) -> None:
    """Write the allocator's importance scores and the rank pattern (metadata) to `folder`/adalora_state.safetensors."""
    from safetensors.torch import save_file

    tuner = model.base_model
    allocator = tuner.rankallocator
    tensors = {f"{kind}/{name}": value.detach().cpu().contiguous()
               for kind in _SCORES for name, value in getattr(allocator, kind).items()}
    pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern
    save_file(tensors, str(folder / STATE_FILE), metadata={"rank_pattern": json.dumps(pattern)})


def restore_state(model: PeftModel, folder: Path) -> None:
    """Load `save_state`'s file back: the allocator's scores and the adapter config's rank pattern."""
    from safetensors import safe_open

    path = folder / STATE_FILE
    if not path.is_file():
        raise LorafitError(f"the checkpoint has no {STATE_FILE} (the AdaLoRA rank allocator's state)",
                           where=f"--resume {folder}", hint="start again with --overwrite")
    tuner = model.base_model
    allocator = tuner.rankallocator
    weights = dict(tuner.model.named_parameters())
    allocator.reset_ipt()
    with safe_open(str(path), framework="pt") as handle:
        pattern = json.loads((handle.metadata() or {}).get("rank_pattern", "null"))
        for key in handle.keys():
            kind, name = key.split("/", 1)
            getattr(allocator, kind)[name] = handle.get_tensor(key).to(weights[name].device)
    tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = pattern
