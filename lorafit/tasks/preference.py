"""What task dpo, kto and orpo share: pairs (or judged answers) read by lorafit/preference_data.py, TRL's preference
trainers, the implicit rewards they log, and an eval that adds how strongly each model prefers the chosen answers.

Not a task itself: lorafit/tasks/dpo.py, kto.py and orpo.py subclass `PreferenceTask`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from lorafit.errors import LorafitError
from lorafit.tasks.base import Task, last_logged

if TYPE_CHECKING:
    from lorafit.evaluate import EvalInputs, EvalPlan
    from lorafit.recipe import PreferenceSection, Recipe

# What TRL's DPO / KTO / ORPO trainers log about the implicit rewards (KTO has no accuracies), kept in metrics.json.
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label")  # data.fields a preference task maps


class PreferenceTask(Task):
    """A task that learns from answers judged better or worse (pairs, or kto's labelled answers)."""

    sections = frozenset({"preference"})
    judged_rows: ClassVar[bool] = False  # kto: each answer is one labelled row (pairs are split into two)
    token_id_rows: ClassVar[bool] = False  # orpo: the trainer takes the lint's token ids, not conversations
    reference_free: ClassVar[bool] = False  # orpo: no reference model; its reward is per-token, not vs the base

    def check_recipe(self, recipe: Recipe) -> None:
        # Settings that mean nothing for pairs are refused rather than ignored, each naming its key.
        self.check_preference(recipe, self.preference_of(recipe))
        data = recipe.data
        if data.packing or data.format != "auto":
            key = "packing" if data.packing else "format"
            raise ValueError(f"data.{key}: task {self.name} reads prompt/chosen/rejected (or prompt/completion/label) "
                             f"rows and pads each pair; remove data.{key}")
        unknown = sorted(set(data.fields) - set(PREFERENCE_COLUMNS))
        if unknown:
            raise ValueError(f"data.fields: {', '.join(unknown)} is not a {self.name} column; map prompt, chosen, "
                             "rejected (dpo, orpo) or prompt, completion, label (kto) to your column names")
        if recipe.template.train_on != "completions":
            raise ValueError(f"template.train_on: {self.name} scores the answers only; remove train_on")
        if recipe.adapter.method == "adalora" and recipe.adapter.init_from is None:
            raise ValueError(self.adalora_refusal())

    def check_preference(self, recipe: Recipe, preference: PreferenceSection) -> None:
        """The preference section's rules for this task (loss, weights, reference); ValueError naming the key."""

    def adalora_refusal(self) -> str:
        """Why adapter.method adalora cannot train this task."""
        return (f"adapter.method: adalora is not supported with task: {self.name} (TRL's {self.name} trainer copies "
                "the adapter as its reference and AdaLoRA allows one trainable adapter only); use method: lora")

    @staticmethod
    def preference_of(recipe: Recipe) -> PreferenceSection:
        """The recipe's preference section, or its defaults when absent."""
        from lorafit.recipe import PreferenceSection

        return recipe.preference or PreferenceSection()

    def prepare_data(self, recipe: Recipe, tokenizer, *, allow_code: bool = False):
        from lorafit.preference_data import prepare_preference_data

        return prepare_preference_data(recipe, tokenizer)

    def trainer_options(self, recipe: Recipe, tokenizer, prepared) -> dict[str, Any]:
        # The reference model: the adapter switched off, or its frozen start (lorafit/training_loop.py AdapterReference).
        return {"reference": self.preference_of(recipe).reference}

    def logged_metrics(self, recipe: Recipe) -> tuple[str, ...]:
        return PREFERENCE_METRICS

    def metric_fields(self, recipe: Recipe, history: list[dict], report) -> dict[str, Any]:
        # Preference tuning scores both answers: no SFT supervision share.
        logged = self.logged_metrics(recipe)
        logged = (*logged, *(f"eval_{key}" for key in logged))
        return {"supervised_token_share": None, "preference": {key: last_logged(history, key) for key in logged}}

    def eval_plan(self, inputs: EvalInputs) -> EvalPlan:
        """The causal-LM scores on the chosen (desirable) answers, plus each model's preference scores on the pairs:
        reward against the base (the adapter switched off), or orpo's reference-free reward."""
        from lorafit import data, preference_eval
        from lorafit.evaluate import EvalPlan, conversation_plan
        from lorafit.preference_data import Pair, eval_examples

        recipe, tokenizer = inputs.recipe, inputs.tokenizer
        rows = data.eval_rows(recipe, inputs.data_file, limit=inputs.samples, conversations=False)
        pairs, dropped = eval_examples(recipe, tokenizer, rows.raw, rows.described)
        inputs.notes.extend(f"skipped {n} eval row(s): {reason}" for reason, n in dropped.items())
        if not pairs:
            raise LorafitError("no usable eval pairs", where=rows.described, hint="rows need prompt, chosen and "
                               "rejected (kto: prompt, completion, label)")
        good = [(p.prompt, p.chosen) for p in pairs] if isinstance(pairs[0], Pair) else [
            (p.prompt, p.completion) for p in pairs if p.desirable]
        plan = conversation_plan(inputs, [prompt + answer for prompt, answer in good], rows.described,
                                 dropped=rows.dropped)
        beta, logps = self.preference_of(recipe).beta, {}

        def measure(model, name: str, adapter):
            score, outputs = plan.measure(model, name, adapter)
            logps[name] = preference_eval.answer_logps(model, pairs, tokenizer, inputs.batch_size)
            score.preference = preference_eval.preference_scores(
                pairs, logps[name], logps["base"] if adapter is not None else None, beta,
                reference_free=self.reference_free)
            return score, outputs

        return EvalPlan(plan.examples, plan.described, plan.template, plan.max_new_tokens, measure, plan.sample_rows)
