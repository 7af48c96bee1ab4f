"""Task orpo: SFT on the chosen answers plus an odds-ratio penalty on the rejected ones, without a reference model,
from the same pairs as dpo (TRL's experimental ORPOTrainer, wrapped in lorafit/orpo_trainer.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafit.tasks.preference import PreferenceTask

if TYPE_CHECKING:
    from lorafit.recipe import PreferenceSection, Recipe

# What TRL's ORPO trainer logs besides the rewards: its two loss terms (the chosen answers' NLL, the mean log-sigmoid
# of the log odds ratio) and the mean log odds ratio itself.
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")


class ORPO(PreferenceTask):
    """Odds-ratio preference optimisation: reference-free."""

    name = "orpo"
    summary = ("orpo: SFT on the chosen answers plus an odds-ratio penalty on the rejected ones, without a reference "
               "model, from the same pairs as dpo (TRL's experimental ORPOTrainer).")
    token_id_rows = True
    reference_free = True
    prepares_in_parallel = False  # the trainer takes the lint's token ids: nothing is tokenized in processes

    def check_preference(self, recipe: Recipe, preference: PreferenceSection) -> None:
        from lorafit.recipe import PreferenceSection

        # ORPO has one loss (the chosen answers' NLL + beta x the odds-ratio term) and no reference model.
        if preference.loss is not None:
            raise ValueError(f"preference.loss: orpo has one loss (the chosen answers' NLL plus beta x the "
                             f"odds-ratio term), not {preference.loss!r}; remove preference.loss")
        if preference.reference == "init-adapter":
            raise ValueError("preference.reference: orpo has no reference model, so there is no adapter to copy as "
                             "one; remove reference (adapter.init_from alone continues the SFT adapter)")
        # label_smoothing, the kto weights and any key a later dpo / kto feature adds: refused, never ignored.
        unused = [key for key, spec in PreferenceSection.model_fields.items()
                  if key not in ("beta", "reference") and getattr(preference, key) != spec.default]
        if unused:
            raise ValueError(f"preference.{unused[0]}: not used by task orpo, whose loss is the chosen answers' NLL "
                             f"plus beta x the odds-ratio term (only beta applies); remove {unused[0]}")

    def logged_metrics(self, recipe: Recipe) -> tuple[str, ...]:
        return (*super().logged_metrics(recipe), *ORPO_METRICS)

    def adalora_refusal(self) -> str:
        # No reference copy here, but ORPO's loss is computed by TRL from the logits, so AdaLoRA's orthogonal
        # regulariser and rank schedule (lorafit/adalora.py, wired into the SFT and classifier trainers) would not run.
        return ("adapter.method: adalora is not supported with task: orpo (lorafit runs AdaLoRA's rank schedule in "
                "the SFT and classifier trainers only); use method: lora")

    def trainer_classes(self, recipe: Recipe) -> tuple[type, type, dict[str, Any]]:
        # TRL keeps it under trl.experimental, imported only here (lorafit/orpo_trainer.py).
        from lorafit import orpo_trainer

        # The rows are token ids laid out by ORPOTrainer.tokenize_row; the collator needs every column it makes.
        return orpo_trainer.ORPOConfig, orpo_trainer.ORPOTrainer, {
            "max_length": recipe.data.max_length, "beta": self.preference_of(recipe).beta, "disable_dropout": False,
            "remove_unused_columns": False}

    def trainer_options(self, recipe: Recipe, tokenizer, prepared) -> dict[str, Any]:
        return {}  # reference-free: no reference model to choose


TASK = ORPO()
