"""Task dpo: prefer the chosen over the rejected answer of prompt/chosen/rejected pairs (TRL's DPOTrainer).

The reference model is never a second copy in memory: the adapter switched off (the base), or the frozen adapter
the run started from (`preference.reference`). `preference.sft_weight` adds the chosen answers' NLL (RPO).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafit.tasks.preference import PreferenceTask

if TYPE_CHECKING:
    from lorafit.recipe import PreferenceSection, Recipe

# TRL 1.16's DPOConfig.loss_type values (trl/trainer/dpo_config.py).
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def check_reference(task: PreferenceTask, recipe: Recipe, preference: PreferenceSection, losses: tuple[str, ...]) -> None:
    """dpo / kto: the loss is one of the task's, and the reference model is one that can be had."""
    if preference.loss is not None and preference.loss not in losses:
        raise ValueError(f"preference.loss: {preference.loss!r} is not a {task.name} loss; choose one of "
                         f"{', '.join(losses)}")
    if preference.loss == "exo_pair" and preference.label_smoothing == 0:
        raise ValueError("preference.label_smoothing: loss exo_pair needs a value above 0 (the EXO paper uses 1e-3)")
    if preference.reference == "init-adapter" and recipe.adapter.init_from is None:
        raise ValueError("preference.reference: init-adapter needs adapter.init_from (the adapter to copy); "
                         "without it use adapter-disabled")
    if preference.reference == "adapter-disabled" and recipe.adapter.init in ("pissa", "olora"):
        raise ValueError(f"preference.reference: adapter.init {recipe.adapter.init} rewrites the base weights, so "
                         "the adapter switched off is not the original model; use init: default")
    if recipe.adapter.modules_to_save and any(m in ("lm_head", "embed_out") for m in recipe.adapter.modules_to_save):
        raise ValueError(f"adapter.modules_to_save: TRL's {task.name} trainer reads lm_head.weight directly, so a "
                         "trained copy of it would be ignored; remove it")


def reference_trainer_options(recipe: Recipe, preference: PreferenceSection) -> dict[str, Any]:
    """TRL DPOConfig / KTOConfig settings both tasks take from the recipe."""
    # Dropout stays as adapter.dropout says (TRL would switch it off); the reference is never precomputed, so a
    # resumed run scores it exactly as an uninterrupted one.
    # data.num_proc: the processes TRL tokenizes the conversations in.
    return {"max_length": recipe.data.max_length, "beta": preference.beta, "disable_dropout": False,
            "precompute_ref_log_probs": False, "dataset_num_proc": recipe.data.num_proc}


class DPO(PreferenceTask):
    """Direct preference optimisation on pairs."""

    name = "dpo"
    summary = ("dpo: prefer the chosen over the rejected answer of prompt/chosen/rejected pairs (TRL's "
               "DPOTrainer).")

    def check_preference(self, recipe: Recipe, preference: PreferenceSection) -> None:
        check_reference(self, recipe, preference, DPO_LOSSES)
        if (preference.desirable_weight, preference.undesirable_weight) != (1.0, 1.0):
            raise ValueError("preference.desirable_weight / undesirable_weight only apply to task: kto")
        if preference.sft_weight and preference.loss == "sft":
            raise ValueError("preference.sft_weight: loss sft is already the chosen answers' likelihood alone; "
                             "set sft_weight: 0 or choose a preference loss such as sigmoid")

    def trainer_classes(self, recipe: Recipe) -> tuple[type, type, dict[str, Any]]:
        from trl import DPOConfig

        from lorafit import training_loop

        preference = self.preference_of(recipe)
        losses, weights = [preference.loss or "sigmoid"], [1.0]
        if preference.sft_weight:  # RPO: TRL sums the listed losses with these weights
            losses, weights = [*losses, "sft"], [*weights, preference.sft_weight]
        return DPOConfig, training_loop.DPOTrainer, {**reference_trainer_options(recipe, preference), "loss_type": losses,
                                               "loss_weights": weights, "label_smoothing": preference.label_smoothing}


TASK = DPO()
