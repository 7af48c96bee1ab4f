"""The training loss where TRL's fused LM head has no fast kernel (CPU, MPS): only trained positions are projected.

TRL's `SFTTrainer` computes the loss with a chunked, fused LM head. On CUDA it runs Triton kernels over the
trained positions only; elsewhere it falls back to torch ops over *every* position, adds entropy and
top-1 statistics, and recomputes the vocabulary projection in backward. On a CPU that made a SmolLM2-135M
step ~25% slower than a plain cross-entropy (see docs/performance.md). `SFTTrainer.compute_loss` is the
documented extension point: the `TrainedPositionsLoss` mixin here (part of `lorafit.training_loop.SFTTrainer`) runs
the LM head on the positions whose next token is a trained label, through transformers' documented
`logits_to_keep` forward argument, so prompt, padding and packing-boundary positions cost nothing in the
vocabulary-sized head. The value is the same mean next-token cross-entropy (tests/test_packing.py checks it
against TRL's).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

# Devices where TRL's fused LM head runs its Triton kernels; everywhere else it falls back to slow torch ops.
_FUSED_HEAD_DEVICES = ("cuda", "xpu")


def supports_trained_positions_loss(model: nn.Module) -> bool:
    """True when the causal LM slices hidden states with transformers' `slice_logits_to_keep` (2D masks allowed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules.get(type(base).__module__)
    return getattr(module, "slice_logits_to_keep", None) is not None


def trained_positions_loss(model: nn.Module, inputs: dict[str, Any],
                           num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the trained labels, the value TRL's and transformers' causal LM loss give.

    Divides by `num_items_in_batch` when the Trainer passes it (gradient accumulation), else by the number of
    trained labels in this batch.
    """
    import torch

    labels = inputs["labels"]
    next_labels = labels[:, 1:]
    trained = next_labels != -100
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = trained  # position t predicts token t + 1
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    model_inputs["use_cache"] = False
    logits = model(**model_inputs, logits_to_keep=keep).logits  # (trained positions, vocab)
    summed = torch.nn.functional.cross_entropy(logits.float(), next_labels[trained], reduction="sum")
    count = trained.sum() if num_items_in_batch is None else num_items_in_batch
    return summed / torch.as_tensor(count, device=summed.device).clamp(min=1)


class TrainedPositionsLoss:
    """SFTTrainer mixin: off CUDA, the loss projects only trained positions through the LM head.

    TRL's per-step entropy / token-accuracy logs are not computed on that path (they cost a full pass over the
    vocabulary for every position); the loss, learning rate and grad norm are logged as before.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_positions_loss = (
            self.args.device.type not in _FUSED_HEAD_DEVICES
            and supports_trained_positions_loss(self.model)
            and not self.aux_loss_enabled  # MoE router loss: TRL's path adds it
            and self.args.loss_type == "nll"
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.trained_positions_loss:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss = trained_positions_loss(model, inputs, num_items_in_batch)
        # As in SFTTrainer: `num_items_in_batch` counts every rank's tokens and DDP averages the gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return loss


def summed_next_token_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           labels: torch.Tensor, *, chunk_positions: int = 1024) -> tuple[float, int]:
    """Summed next-token cross-entropy over the labels that are not -100, and their count (for evaluation).

    The vocabulary projection is the largest tensor of a forward pass (batch 8 x 1,024 tokens x a 152k vocabulary
    is 5 GB in fp32), so the model projects only the positions that predict a label (`logits_to_keep`, as in
    training) and the fp32 cross-entropy runs over `chunk_positions` of them at a time, never over all at once.
    """
    import torch

    next_labels = labels[:, 1:]
    scored = next_labels != -100
    count = int(scored.sum())
    if count == 0:
        return 0.0, 0
    with torch.no_grad():
        if supports_trained_positions_loss(model):
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = scored  # position t predicts token t + 1
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                           use_cache=False).logits  # (scored positions, vocab) in the model's dtype
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][scored]
        targets = next_labels[scored]
        total = 0.0
        for start in range(0, count, chunk_positions):
            chunk = slice(start, start + chunk_positions)
            total += torch.nn.functional.cross_entropy(logits[chunk].float(), targets[chunk], reduction="sum").item()
    return total, count
