"""Evaluation's loss in chunks (lorafit.loss.summed_next_token_loss) equals the full-vocabulary computation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafit.loss import summed_next_token_loss


@pytest.mark.parametrize("chunk_positions", [1, 7, 1024])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_loss_equals_full_logits_loss(tiny_model_factory, arch, chunk_positions):
    """Prompt positions (-100), right padding and chunk sizes from 1 to more than the batch: the same summed
    cross-entropy and count as fp32 logits over every position; GPT-2 has no 2D logits_to_keep and takes the
    full-logits path, still chunked."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch)).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 400, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # right padding
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt
    labels[mask == 0] = -100
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    total, count = summed_next_token_loss(model, ids, mask, labels, chunk_positions=chunk_positions)
    assert count == int((labels[:, 1:] != -100).sum())
    assert total == pytest.approx(expected.item(), abs=1e-5 * count, rel=1e-6)
    assert summed_next_token_loss(model, ids, mask, torch.full_like(labels, -100)) == (0.0, 0)
