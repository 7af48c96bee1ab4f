"""Task kto: learn from answers labelled desirable or not, prompt/completion/label rows or pairs (TRL's KTOTrainer).

Pairs are split into a desirable and an undesirable row. KTO's KL term pairs each row with its batch neighbour, so
the rows are shuffled once (lorafit/preference_data.py) and read in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafit.tasks.dpo import check_reference, reference_trainer_options
from lorafit.tasks.preference import PreferenceTask

if TYPE_CHECKING:
    from lorafit.recipe import PreferenceSection, Recipe

# TRL 1.16's KTOConfig.loss_type values.
KTO_LOSSES = ("kto", "apo_zero_unpaired")


class KTO(PreferenceTask):
    """Kahneman-Tversky optimisation on judged answers."""

    name = "kto"
    summary = ("kto: learn from answers labelled desirable or not, prompt/completion/label rows or pairs (TRL's "
               "KTOTrainer).")
    judged_rows = True

    def check_preference(self, recipe: Recipe, preference: PreferenceSection) -> None:
        check_reference(self, recipe, preference, KTO_LOSSES)
        if preference.sft_weight:
            raise ValueError("preference.sft_weight only applies to task: dpo")
        if preference.label_smoothing:
            raise ValueError("preference.label_smoothing only applies to task: dpo")
        if (preference.loss or "kto") == "kto" and recipe.training.batch_size < 2:
            raise ValueError("training.batch_size: kto estimates its KL term from the other rows of a batch and "
                             "needs batch_size >= 2")
        if recipe.data.group_by_length:
            raise ValueError("data.group_by_length: kto keeps the data order fixed (its KL term pairs neighbours); "
                             "set group_by_length: false")

    def trainer_classes(self, recipe: Recipe) -> tuple[type, type, dict[str, Any]]:
        from trl import KTOConfig

        from lorafit import training_loop

        preference = self.preference_of(recipe)
        # The rows are read in order (shuffled once when prepared): the KL term pairs neighbours.
        return KTOConfig, training_loop.KTOTrainer, {**reference_trainer_options(recipe, preference),
                                               "loss_type": preference.loss or "kto",
                                               "desirable_weight": preference.desirable_weight,
                                               "undesirable_weight": preference.undesirable_weight,
                                               "train_sampling_strategy": "sequential"}


TASK = KTO()
