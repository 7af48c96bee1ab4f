"""Prompt rows (task grpo / rloo): rows -> chat prompts plus the columns the rewards read, linted before any compute.

Accepted rows (column names can be mapped with data.fields, e.g. `{prompt: question, answer: solution}`):
- `prompt` as text or as chat messages, beside any columns the rewards read (`answer`, ...);
- `messages` whose last turn is the assistant's answer: the turns before it are the prompt, the answer becomes the
  `answer` column (so an SFT data set is an RL data set too).

Every prompt is rendered with the recipe's template (with its system prompt first) exactly as TRL renders it at
generation time; a prompt that leaves less than `generation.max_completion_length` tokens inside `data.max_length`
is dropped and counted, and every row must have the same columns (the rewards read them for every completion).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit import data, rewards
from lorafit.data import DataReport, PreparedData
from lorafit.errors import LorafitError
from lorafit.recipe import Recipe
from lorafit.templates import apply_template, render

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPTS = "prompts"  # the DataReport format of prompt rows
ANSWER = "answer"  # the column a messages row's last assistant turn becomes


@dataclass
class RLReport(DataReport):
    """The DataReport of prompt rows: drops by reason, the longest prompt, the rewards that will score them."""

    rewards: list[str] | None = None
    prompt_tokens_max: int = 0

    def warnings(self) -> list[str]:
        """Drops by reason (nothing is trained from the rows' own text, so there is no end-of-turn check)."""
        return [f"dropped {n} row(s): {reason}" for reason, n in self.dropped.items()]


@dataclass
class RLData(PreparedData):
    """Prompt datasets for TRL's GRPO / RLOO trainers, and the reward functions built from the recipe."""

    rewards: rewards.Rewards | None = None


def prepare_prompt_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, max_completion_length: int, *,
                        allow_code: bool) -> RLData:
    """Read, render and lint the prompts; check every reward's columns; build the rewards (custom code only with
    `allow_code`, its signature checked) — all before any model loads."""
    from datasets import Dataset

    data.check_sources(recipe)
    train_rows, eval_rows, fingerprint = data.split_rows(recipe)
    template = apply_template(recipe.template, tokenizer)
    report = RLReport(format=PROMPTS, template=template, rows_read=len(train_rows) + len(eval_rows),
                      eos_token=tokenizer.eos_token, fingerprint=fingerprint)
    train, evaluation = data.encode_train_and_eval(
        recipe, train_rows, eval_rows, report,
        lambda rows, is_train: prompt_rows(rows, recipe, tokenizer, report, max_completion_length,
                                           where="data.train" if is_train else "data.eval"),
        what="usable prompts", hint="rows need a prompt (text or messages), or messages ending in an assistant answer")
    columns = sorted(train[0])
    rewards.check_reward_columns(recipe.rewards, columns)
    # The loader made every file a reward names absolute (relative to the recipe that named it).
    built = rewards.build_rewards(recipe.rewards, recipe_dir=Path.cwd(), allow_code=allow_code)
    rewards.check_function_columns(built, columns)
    report.train_examples, report.eval_examples, report.rewards = len(train), len(evaluation), built.names
    return RLData(Dataset.from_list(train), Dataset.from_list(evaluation) if evaluation else None, report,
                  rewards=built)


def prompt_rows(rows: list[dict[str, Any]], recipe: Recipe, tokenizer, report: RLReport, max_completion_length: int, *,
                where: str) -> list[dict[str, Any]]:
    """Rows as TRL reads them: `prompt` (chat messages, the system prompt first) and the other columns; rows without
    a prompt, or whose rendered prompt leaves no room for the completion, are dropped and counted in `report`."""
    fields = recipe.data.fields
    limit = recipe.data.max_length - max_completion_length
    system = recipe.template.system_prompt
    specials = data.special_texts(tokenizer)
    special_rows: dict[str, list[int]] = {}
    kept: list[dict[str, Any]] = []
    longest = 0
    for number, row in enumerate(rows, start=1):
        row = {**row, **{name: row[column] for name, column in fields.items() if column in row}}
        prompt, extra = _prompt_of(row)
        if prompt is None:
            report.dropped["no prompt (a prompt column, or messages ending in an assistant answer)"] += 1
            continue
        if system and not any(m.get("role") == "system" for m in prompt):
            prompt = [{"role": "system", "content": system}, *prompt]
        # The SFT lint's special-token check (lorafit/data.py): in a prompt it would end the turn before the model
        # answers; in the answer column it would be scored (and shown in eval) as a real end of turn.
        special = data.special_text_in([prompt, extra.get(ANSWER)], specials)
        if special is not None:
            special_rows.setdefault(special, []).append(number)
            continue
        tokens = len(tokenizer(render(tokenizer, prompt, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"])
        if tokens > limit:
            report.dropped[f"prompt longer than data.max_length - generation.max_completion_length ({limit} "
                           "tokens)"] += 1
            continue
        longest = max(longest, tokens)
        kept.append({**extra, "prompt": prompt})
        if len(report.samples) < 2:
            report.samples.append([(render(tokenizer, prompt, add_generation_prompt=True), False)])
    for special, numbers in special_rows.items():
        report.dropped[data.special_text_reason(special, numbers, where)] += len(numbers)
    report.prompt_tokens_max = max(report.prompt_tokens_max, longest)
    columns = [sorted(row) for row in kept[:1]]
    mismatched = next((i for i, row in enumerate(kept) if sorted(row) != columns[0]), None)
    if mismatched is not None:
        raise LorafitError(f"row {mismatched + 1} has the columns {', '.join(sorted(kept[mismatched]))}, the first "
                           f"row {', '.join(columns[0])}", where=where,
                           hint="every row needs the same columns (the rewards read them for every completion)")
    return kept


def _prompt_of(row: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, dict[str, Any]]:
    """The prompt as chat messages and the row's other columns (a messages row's last answer as `answer`)."""
    extra = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}], extra
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        return [dict(m) for m in prompt], extra
    messages = row.get("messages")
    if isinstance(messages, list) and len(messages) >= 2 and isinstance(messages[-1], dict):
        if messages[-1].get("role") == "assistant":
            extra.setdefault(ANSWER, messages[-1].get("content"))
            return [dict(m) for m in messages[:-1]], extra
    return None, extra
