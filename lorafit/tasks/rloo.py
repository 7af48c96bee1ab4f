"""Task rloo: online RL with REINFORCE leave-one-out advantages (TRL's RLOOTrainer): each completion's baseline is
the mean reward of the other completions of its prompt. Everything else (rows, rewards, generation, the reference,
eval) is task grpo's (lorafit/tasks/grpo.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafit.tasks.grpo import GRPO

if TYPE_CHECKING:
    from lorafit.recipe import Recipe


class RLOO(GRPO):
    """REINFORCE leave-one-out on the recipe's rewards."""

    name = "rloo"
    summary = ("rloo: online RL like grpo, each completion's baseline the mean reward of its group's others (TRL's "
               "RLOOTrainer).")
    takes_loss = False

    def trainer_classes(self, recipe: Recipe) -> tuple[type, type, dict[str, Any]]:
        from trl import RLOOConfig

        from lorafit import training_loop

        options = self.rollout_options(recipe)
        options.pop("cast_lm_head_to_fp32")  # a GRPOConfig setting RLOOConfig does not have
        return RLOOConfig, training_loop.RLOOTrainer, options


TASK = RLOO()
