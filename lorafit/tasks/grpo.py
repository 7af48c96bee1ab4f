"""Task grpo: online RL against checkable rewards (TRL's GRPOTrainer); task rloo (lorafit/tasks/rloo.py) reuses it.

Each step samples `generation.num_generations` completions per prompt with the adapter, scores them with the
recipe's `rewards:` (lorafit/rewards.py: a weighted sum, each reward logged on its own), and pushes the adapter
towards the completions that beat their group. Rows are prompts (`prompt` as text or messages, or `messages` whose
last assistant turn becomes the `answer` column) plus any columns the rewards read. Before any model loads, the
prompts are rendered with the recipe's template, prompts that leave no room for `max_completion_length` inside
`data.max_length` are dropped and counted, every reward's column is checked against the data, and custom reward
code is loaded (only with --allow-code) and its signature checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lorafit.errors import LorafitError
from lorafit.tasks.base import Task, last_logged

if TYPE_CHECKING:
    from lorafit.data import PreparedData
    from lorafit.evaluate import EvalInputs, EvalPlan
    from lorafit.recipe import GenerationSection, Recipe, RLSection

# TRL 1.16's GRPOConfig.loss_type values (trl/trainer/grpo_config.py).
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
# What TRL's GRPO / RLOO trainers log about the rollouts, kept in metrics.json (with each reward's mean).
RL_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
              "kl", "entropy")


class GRPO(Task):
    """Group-relative policy optimisation of the adapter on prompts, against the recipe's rewards."""

    name = "grpo"
    summary = ("grpo: online RL: sample completions of each prompt, score them with the recipe's rewards and learn "
               "from the ones that beat their group (TRL's GRPOTrainer).")
    sections = frozenset({"rewards", "generation", "rl"})
    prepares_in_parallel = False  # prompts are rendered once, in this process; completions are sampled in training
    takes_loss: ClassVar[bool] = True  # rl.loss and rl.scale_rewards apply (rloo has one loss, unscaled)

    def check_recipe(self, recipe: Recipe) -> None:
        if not recipe.rewards:
            raise ValueError(f"rewards: task {self.name} learns from rewards; list at least one, e.g. "
                             "rewards: [{name: exact_match, column: answer}]")
        data, generation, rl = recipe.data, generation_of(recipe), rl_of(recipe)
        if data.packing or data.format != "auto":
            key = "packing" if data.packing else "format"
            raise ValueError(f"data.{key}: task {self.name} reads prompts (and the columns its rewards score) and "
                             f"generates the answers itself; remove data.{key}")
        if data.group_by_length:
            raise ValueError(f"data.group_by_length: task {self.name} batches each prompt's group of completions "
                             "together; set group_by_length: false")
        if recipe.template.train_on != "completions":
            raise ValueError(f"template.train_on: {self.name} trains on the sampled completions only; remove train_on")
        if recipe.adapter.method in ("adalora", "prefix"):
            raise ValueError(f"adapter.method: {recipe.adapter.method} is not supported with task: {self.name} "
                             "(TRL's trainer computes the loss itself and samples through generate()); use method: "
                             "lora")
        if generation.max_completion_length >= data.max_length:
            raise ValueError(f"generation.max_completion_length: {generation.max_completion_length} leaves no room "
                             f"for the prompt inside data.max_length ({data.max_length}); raise data.max_length or "
                             "lower max_completion_length")
        completions = recipe.training.batch_size * recipe.training.grad_accum
        if completions % generation.num_generations:
            raise ValueError(f"generation.num_generations: {generation.num_generations} must divide the completions "
                             f"sampled per step, training.batch_size x grad_accum = {completions} (each prompt's group "
                             "is scored together); e.g. batch_size "
                             f"{generation.num_generations} or num_generations {_divisor_at_least_two(completions)}")
        if not self.takes_loss and (rl.loss is not None or rl.scale_rewards is not None):
            key = "loss" if rl.loss is not None else "scale_rewards"
            raise ValueError(f"rl.{key}: task {self.name} has one loss (leave-one-out advantages, not scaled); "
                             f"remove rl.{key}")
        if rl.reference == "init-adapter" and recipe.adapter.init_from is None:
            raise ValueError("rl.reference: init-adapter needs adapter.init_from (the adapter to copy); without it "
                             "use adapter-disabled")
        if rl.reference == "adapter-disabled" and rl.beta > 0 and recipe.adapter.init in ("pissa", "olora"):
            raise ValueError(f"rl.reference: adapter.init {recipe.adapter.init} rewrites the base weights, so the "
                             "adapter switched off is not the original model; use init: default")

    def prepare_data(self, recipe: Recipe, tokenizer, *, allow_code: bool = False) -> PreparedData:
        from lorafit.prompt_data import prepare_prompt_data

        return prepare_prompt_data(recipe, tokenizer, generation_of(recipe).max_completion_length,
                                   allow_code=allow_code)

    def trainer_classes(self, recipe: Recipe) -> tuple[type, type, dict[str, Any]]:
        from trl import GRPOConfig

        from lorafit import training_loop

        rl = rl_of(recipe)
        return GRPOConfig, training_loop.GRPOTrainer, {**self.rollout_options(recipe), "loss_type": rl.loss or "dapo",
                                                 "scale_rewards": rl.scale_rewards or "group"}

    def rollout_options(self, recipe: Recipe) -> dict[str, Any]:
        """The GRPOConfig / RLOOConfig settings both tasks take from the recipe."""
        generation, rl = generation_of(recipe), rl_of(recipe)
        return {
            "num_generations": generation.num_generations, "max_completion_length": generation.max_completion_length,
            "temperature": generation.temperature, "top_p": generation.top_p, "beta": rl.beta,
            "epsilon": rl.epsilon, "num_iterations": rl.num_iterations,
            "reward_weights": [spec.weight for spec in recipe.rewards],
            # Dropout stays as adapter.dropout says; the rows' extra columns reach the rewards, so none is dropped.
            "disable_dropout": False, "remove_unused_columns": False,
            # The log-probabilities are computed in the training precision lorafit chose, as the rest of the model.
            "cast_lm_head_to_fp32": False,
            # The rows hold prompt and completion ids, no input_ids for the Trainer to count; TRL logs num_tokens.
            "include_num_input_tokens_seen": "no",
        }

    def trainer_options(self, recipe: Recipe, tokenizer, prepared: PreparedData) -> dict[str, Any]:
        return {"reward_funcs": prepared.rewards.functions, "reference": rl_of(recipe).reference}

    def logged_metrics(self, recipe: Recipe) -> tuple[str, ...]:
        from lorafit.rewards import reward_names

        return (*RL_METRICS, *(f"rewards/{name}/mean" for name in reward_names(recipe.rewards)))

    def metric_fields(self, recipe: Recipe, history: list[dict], report) -> dict[str, Any]:
        # The completions are the model's own samples: no supervised share of a data set's tokens.
        return {"supervised_token_share": None,
                "rl": {key: last_logged(history, key) for key in self.logged_metrics(recipe)}}

    def eval_plan(self, inputs: EvalInputs) -> EvalPlan:
        """Held-out prompts answered greedily: the causal-LM scores against the answer column (loss, exact match,
        ROUGE-L), and each reward's mean over the greedy answers, base vs adapters."""
        from lorafit import data, rewards
        from lorafit.evaluate import EvalPlan, conversation_plan
        from lorafit.prompt_data import PROMPTS, RLReport, prompt_rows

        recipe, tokenizer = inputs.recipe, inputs.tokenizer
        rows = data.eval_rows(recipe, inputs.data_file, limit=inputs.samples, conversations=False)
        report = RLReport(format=PROMPTS, template="")
        prompts = prompt_rows(rows.raw, recipe, tokenizer, report, generation_of(recipe).max_completion_length,
                              where=rows.described)
        inputs.notes.extend(f"skipped {n} eval row(s): {reason}" for reason, n in report.dropped.items())
        reference = _reference_column(recipe)
        answered = [row for row in prompts if isinstance(row.get(reference), str)]
        if not answered:
            raise LorafitError(f"no eval prompt has an answer in column '{reference}'", where=rows.described,
                               hint="eval rows need the column the rewards compare against")
        rewards.check_reward_columns(recipe.rewards, sorted(answered[0]))
        built = rewards.build_rewards(recipe.rewards, recipe_dir=Path.cwd(), allow_code=inputs.allow_code)
        plan = conversation_plan(inputs, [row["prompt"] + [{"role": "assistant", "content": row[reference]}]
                                          for row in answered], rows.described)
        columns = {key: [row.get(key) for row in answered] for key in answered[0] if key != "prompt"}
        prompts_of = [row["prompt"] for row in answered]

        def measure(model, name: str, adapter):
            score, outputs = plan.measure(model, name, adapter)
            ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in outputs]
            score.rewards = rewards.mean_rewards(built, prompts_of, outputs, ids, columns)
            return score, outputs

        return EvalPlan(plan.examples, plan.described, plan.template, plan.max_new_tokens, measure, plan.sample_rows)


TASK = GRPO()


def generation_of(recipe: Recipe) -> GenerationSection:
    """The recipe's generation section, or its defaults when absent."""
    from lorafit.recipe import GenerationSection

    return recipe.generation or GenerationSection()


def rl_of(recipe: Recipe) -> RLSection:
    """The recipe's rl section, or its defaults when absent."""
    from lorafit.recipe import RLSection

    return recipe.rl or RLSection()


def _divisor_at_least_two(n: int) -> int:
    return next((d for d in range(min(n, 8), 1, -1) if n % d == 0), 2)


def _reference_column(recipe: Recipe) -> str:
    """The column eval compares answers with: the first column a reward reads, else `answer`."""
    from lorafit.prompt_data import ANSWER

    return next((column for spec in recipe.rewards for column in spec.columns()), ANSWER)


