"""Task causal-lm (SFT): learn to write the completions of chat, alpaca, prompt/completion or text rows.

The shared pipeline's defaults are this task's (lorafit/tasks/base.py): rows are read, rendered with the template
and linted by lorafit/data.py, trained by TRL's SFTTrainer with lorafit's guards (lorafit/training_loop.py), and scored
in eval by completion loss and greedy answers (lorafit/evaluate.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafit.tasks.base import Task

if TYPE_CHECKING:
    from lorafit.recipe import Recipe


# The columns data.fields may rename under this task: those of each row format (lorafit/data_sources.py), alpaca's
# optional input among them.
SFT_COLUMNS = ("messages", "prompt", "completion", "instruction", "input", "output", "text")


class CausalLM(Task):
    """Supervised fine-tuning on completions."""

    name = "causal-lm"
    summary = "causal-lm: learn to write the completions (SFT)."
    data_driven_init = True
    streams = True
    mixes_sources = True

    def check_recipe(self, recipe: Recipe) -> None:
        # A mapping for a column no row format reads would be ignored: a typo such as {promt: question} is refused.
        entries = recipe.data.train if isinstance(recipe.data.train, list) else []
        mappings = [recipe.data.fields, *(getattr(entry, "fields", None) or {} for entry in entries)]
        unknown = sorted({key for mapping in mappings for key in mapping} - set(SFT_COLUMNS))
        if unknown:
            raise ValueError(f"data.fields: {', '.join(unknown)} is not a column any {self.name} row format reads; "
                             f"map {', '.join(SFT_COLUMNS)} to your column names, e.g. {{prompt: question}}")

    def prepare_data(self, recipe: Recipe, tokenizer, *, allow_code: bool = False):
        from lorafit import data

        return data.prepare_data(recipe, tokenizer)

    def trainer_classes(self, recipe: Recipe) -> tuple[type, type, dict[str, Any]]:
        from trl import SFTConfig

        from lorafit import training_loop

        return SFTConfig, training_loop.SFTTrainer, {"max_length": recipe.data.max_length, "packing": recipe.data.packing}

    def trainer_options(self, recipe: Recipe, tokenizer, prepared) -> dict[str, Any]:
        return {"adapter": recipe.adapter}  # AdaLoRA's schedule (lorafit/adalora.py; inert for the other methods)


TASK = CausalLM()
