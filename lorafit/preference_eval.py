"""`lorafit eval` for task dpo / kto / orpo: how strongly each model prefers the chosen answers of held-out pairs.

Each answer's log-probability given its prompt (summed over the answer's tokens, as DPO scores it) is measured
for the base and for each adapter. Two views, side by side:

- pair accuracy / log-prob margin: how often a model gives the chosen answer the higher log-probability, and by
  how much on average. Defined for the base too, so it shows where training started.
- reward accuracy / reward margin: the reward the task's trainer logs (rewards/accuracies, rewards/margins), of
  chosen minus rejected. dpo / kto: the implicit reward beta * (log p_model - log p_base), measured against the
  base; for kto rows (one answer, labelled), reward accuracy is the share whose reward has the label's sign.
  orpo has no reference model: its reward is beta * the answer's mean log-probability per token (TRL's
  ORPOTrainer), so reward accuracy is the share of pairs whose chosen answer has the higher per-token
  log-probability, defined for the base too. It differs from pair accuracy only where the answers' lengths differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafit.preference_data import Judged, Pair

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# What "reward" means in the scores: dpo / kto against the base, orpo without a reference (as each trainer logs it).
REWARD_VS_BASE = "beta x log-ratio to the base"
REWARD_PER_TOKEN = "beta x mean log-prob per answer token, no reference (ORPO)"


@dataclass
class PreferenceScores:
    """One model's preference metrics on the held-out pairs (None where they do not apply)."""

    pairs: int
    pair_accuracy: float | None  # share of pairs with log p(chosen) > log p(rejected)
    logp_margin: float | None  # mean log p(chosen) - log p(rejected)
    reward_accuracy: float | None  # share of pairs (kto: rows) the reward gets right
    reward_margin: float | None  # mean reward(chosen) - reward(rejected) (kto: desirable minus undesirable)
    reward: str = REWARD_VS_BASE  # what the reward is (shown in the eval table, kept in report.json)


def answer_logps(model, examples: list[Pair] | list[Judged], tokenizer: PreTrainedTokenizerBase,
                 batch_size: int) -> list[tuple[float, ...]]:
    """Per example, the summed log-probability of each answer given the prompt: (chosen, rejected) or (completion,)."""
    sequences = []
    for example in examples:
        answers = ((example.chosen_ids, example.rejected_ids) if isinstance(example, Pair)
                   else (example.completion_ids,))
        sequences.extend((example.prompt_ids, answer) for answer in answers)
    sums = _summed_logps(model, sequences, tokenizer, batch_size)
    width = 2 if examples and isinstance(examples[0], Pair) else 1
    return [tuple(sums[i:i + width]) for i in range(0, len(sums), width)]


def preference_scores(examples: list[Pair] | list[Judged], logps: list[tuple[float, ...]],
                      base_logps: list[tuple[float, ...]] | None, beta: float, *,
                      reference_free: bool = False) -> PreferenceScores:
    """Pair accuracy and log-prob margin of one model; reward accuracy and margin against the base's log-probs, or
    with `reference_free` (orpo, pairs only) ORPO's own reward, each answer's mean log-prob per token."""
    n = len(examples)
    if reference_free:
        margins = [chosen - rejected for chosen, rejected in logps]
        rewards = [beta * (c / len(e.chosen_ids) - r / len(e.rejected_ids))
                   for (c, r), e in zip(logps, examples, strict=True)]
        return PreferenceScores(
            pairs=n, pair_accuracy=sum(m > 0 for m in margins) / n, logp_margin=sum(margins) / n,
            reward_accuracy=sum(r > 0 for r in rewards) / n, reward_margin=sum(rewards) / n, reward=REWARD_PER_TOKEN)
    if examples and isinstance(examples[0], Pair):
        margins = [chosen - rejected for chosen, rejected in logps]
        rewards = None if base_logps is None else [
            beta * ((c - bc) - (r - br)) for (c, r), (bc, br) in zip(logps, base_logps, strict=True)]
        return PreferenceScores(
            pairs=n, pair_accuracy=sum(m > 0 for m in margins) / n, logp_margin=sum(margins) / n,
            reward_accuracy=None if rewards is None else sum(r > 0 for r in rewards) / n,
            reward_margin=None if rewards is None else sum(rewards) / n)
    if base_logps is None:
        return PreferenceScores(pairs=n, pair_accuracy=None, logp_margin=None, reward_accuracy=None,
                                reward_margin=None)
    rewards = [beta * (own[0] - base[0]) for own, base in zip(logps, base_logps, strict=True)]
    good = [r for r, e in zip(rewards, examples, strict=True) if e.desirable]
    bad = [r for r, e in zip(rewards, examples, strict=True) if not e.desirable]
    right = sum((r > 0) == e.desirable for r, e in zip(rewards, examples, strict=True))
    margin = (sum(good) / len(good) - sum(bad) / len(bad)) if good and bad else None
    return PreferenceScores(pairs=n, pair_accuracy=None, logp_margin=None, reward_accuracy=right / n,
                            reward_margin=margin)


def _summed_logps(model, sequences: list[tuple[list[int], list[int]]], tokenizer, batch_size: int) -> list[float]:
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        rows = [prompt + answer for prompt, answer in batch]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for i, (prompt, answer) in enumerate(batch):
            # The answer's tokens sit at positions len(prompt) .. len(prompt)+len(answer)-1, predicted one step earlier.
            sums.append(token_logps[i, len(prompt) - 1:len(prompt) - 1 + len(answer)].sum().item())
    return sums
