"""Preference data (task dpo / kto / orpo): rows -> prompt / chosen / rejected conversations, linted before any compute.

Accepted rows (column names can be mapped with data.fields):
- `prompt`, `chosen`, `rejected`: each a string or a list of chat messages;
- `chosen`, `rejected` as whole conversations that share their first turns (the shared turns are the prompt);
- task kto: `prompt`, `completion`, `label` (true = desirable), or the pairs above (chosen rows become desirable,
  rejected rows undesirable).

Every prompt becomes chat messages rendered with the recipe's template, exactly as SFT renders them, so a DPO run
on top of an SFT adapter sees the prompts that adapter was trained on. The lint drops pairs that cannot teach
anything (malformed, an empty side, chosen identical to rejected, a prompt that fills data.max_length, sides that
only differ past the truncation) and reports token lengths; TRL's DPO / KTO trainers then get the conversations and
tokenize them the same way (prompt rendered with the generation prompt, the answer after it). Task orpo reads the
same pairs, but its trainer gets the lint's token ids themselves (`_dataset`).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorafit import data, tasks
from lorafit.data import DataReport, PreparedData
from lorafit.errors import LorafitError
from lorafit.recipe import DataSection, Recipe
from lorafit.templates import Messages, apply_template, render

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAIRS = "prompt/chosen/rejected"
LABELLED = "prompt/completion/label"
_TRUE = {"true", "1", "yes", "desirable", "good"}
_FALSE = {"false", "0", "no", "undesirable", "bad"}
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}  # ShareGPT names


@dataclass
class PreferenceReport(DataReport):
    """The DataReport of preference data, plus token lengths, truncation and (kto) the label balance."""

    token_lengths: dict[str, dict[str, float]] = field(default_factory=dict)  # side -> mean / max tokens
    truncated: int = 0  # kept pairs whose answers data.max_length cuts
    desirable: int = 0  # kto: train rows labelled desirable / undesirable
    undesirable: int = 0

    def warnings(self) -> list[str]:
        """Drops by reason, truncation, and a one-sided kto label balance."""
        notes = [f"dropped {n} pair(s): {reason}" for reason, n in self.dropped.items()]
        if self.truncated:
            notes.append(f"{self.truncated} pair(s) have answers cut at data.max_length; raise it to score them whole")
        if self.format == LABELLED and not (self.desirable and self.undesirable):
            notes.append("kto learns from both desirable and undesirable answers; the train rows hold only "
                         f"{'desirable' if self.desirable else 'undesirable'} ones")
        return notes


@dataclass(frozen=True)
class Pair:
    """One preference pair as conversations, and its token ids as the trainer sees them (truncated)."""

    prompt: Messages
    chosen: Messages
    rejected: Messages
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class Judged:
    """One kto row: a prompt, an answer and whether it is desirable, with token ids as the trainer sees them."""

    prompt: Messages
    completion: Messages
    desirable: bool
    prompt_ids: list[int]
    completion_ids: list[int]


def prepare_preference_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Read, normalise, lint and tokenize-check the recipe's preference data; TRL-ready datasets and a report."""
    from datasets import Dataset

    task = tasks.task_of(recipe)
    data.check_sources(recipe)
    train_rows, eval_rows, fingerprint = data.split_rows(recipe)
    template = apply_template(recipe.template, tokenizer)
    report = PreferenceReport(format=row_format(train_rows or eval_rows, recipe), template=template,
                              rows_read=len(train_rows) + len(eval_rows), eos_token=tokenizer.eos_token,
                              fingerprint=fingerprint)
    train, evaluation = data.encode_train_and_eval(
        recipe, train_rows, eval_rows, report,
        lambda rows, is_train: encode_rows(rows, recipe, tokenizer, report, is_train=is_train),
        what="usable preference rows", hint="rows need prompt, chosen and rejected (kto: prompt, completion, label); "
        "see data.fields")
    if task.judged_rows:
        # TRL's KTO pairs each row with its neighbour for the KL term and so reads rows in order: shuffled here, once.
        random.Random(recipe.training.seed).shuffle(train)
        report.desirable = sum(example.desirable for example in train)
        report.undesirable = len(train) - report.desirable
    report.train_examples, report.eval_examples = len(train), len(evaluation)
    as_ids = task.token_id_rows  # orpo's trainer takes the lint's token ids
    return PreparedData(_dataset(train, Dataset, as_ids=as_ids),
                        _dataset(evaluation, Dataset, as_ids=as_ids) if evaluation else None, report)


def eval_examples(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]],
                  where: str = "data.eval") -> tuple[list[Pair] | list[Judged], Counter]:
    """Eval rows as pairs (or kto's judged answers), linted like training's; also the drops by reason."""
    apply_template(recipe.template, tokenizer)
    report = PreferenceReport(format=row_format(rows, recipe, where), template="")
    return encode_rows(rows, recipe, tokenizer, report, is_train=False), report.dropped


def row_format(rows: list[dict[str, Any]], recipe: Recipe, where: str = "data.train") -> str:
    """PAIRS or LABELLED, from the first row's columns; an error naming the columns (and `where`) otherwise."""
    section = recipe.data
    columns = set(rows[0]) if rows else set()
    has = lambda name: _column(section, name) in columns  # noqa: E731
    if has("chosen") and has("rejected"):
        return PAIRS
    judged = tasks.task_of(recipe).judged_rows
    if judged and has("prompt") and has("completion") and has("label"):
        return LABELLED
    wanted = "prompt, chosen, rejected" + (" (or prompt, completion, label)" if judged else "")
    raise LorafitError(f"{recipe.task} data needs the columns {wanted}; the data has "
                       f"{', '.join(sorted(columns)) or 'no columns'}", where=where,
                       hint="map your column names with data.fields, e.g. {chosen: better, rejected: worse}")


def encode_rows(rows: list[dict[str, Any]], recipe: Recipe, tokenizer: PreTrainedTokenizerBase,
                report: PreferenceReport, *, is_train: bool) -> list[Pair] | list[Judged]:
    """Normalise and tokenize rows, counting each dropped one by reason in `report`."""
    where = "data.train" if is_train else "data.eval"
    fmt = row_format(rows, recipe, where) if rows else PAIRS
    # The SFT lint's special-token check (lorafit/data.py): such text in a prompt or an answer would be tokenized as
    # the real token and end a turn mid-answer, so those rows are dropped and named, never trained.
    specials = data.special_texts(tokenizer)
    columns = [_column(recipe.data, name) for name in ("prompt", "chosen", "rejected", "completion")]
    special_rows: dict[str, list[int]] = {}
    out: list = []
    for number, row in enumerate(rows, start=1):
        special = data.special_text_in([recipe.template.system_prompt, *(row.get(c) for c in columns)], specials)
        if special is not None:
            special_rows.setdefault(special, []).append(number)
            continue
        if fmt == LABELLED:
            judged = _judged(row, recipe, tokenizer, report)
            out.extend([judged] if judged else [])
            continue
        pair = _pair(row, recipe, tokenizer, report)
        if pair is None:
            continue
        if tasks.task_of(recipe).judged_rows:  # pairs are unpaired: each side is a judged answer to the same prompt
            out.append(Judged(pair.prompt, pair.chosen, True, pair.prompt_ids, pair.chosen_ids))
            out.append(Judged(pair.prompt, pair.rejected, False, pair.prompt_ids, pair.rejected_ids))
        else:
            out.append(pair)
        if is_train:
            _count(report, tokenizer, pair)
    for special, numbers in special_rows.items():
        report.dropped[data.special_text_reason(special, numbers, where)] += len(numbers)
    if is_train and fmt == LABELLED:
        for judged in out:
            _count_judged(report, tokenizer, judged)
    if is_train:
        _finish_lengths(report)
    return out


# ----------------------------------------------------------------------------------------------------
# One row


def _pair(row: dict[str, Any], recipe: Recipe, tokenizer, report: PreferenceReport) -> Pair | None:
    section = recipe.data
    chosen, rejected = _messages(row.get(_column(section, "chosen"))), _messages(row.get(_column(section, "rejected")))
    raw_prompt = row.get(_column(section, "prompt"))
    if chosen is None or rejected is None or (raw_prompt is not None and _messages(raw_prompt, "user") is None):
        report.dropped["malformed row (prompt, chosen and rejected must be text or chat messages)"] += 1
        return None
    prompt = _messages(raw_prompt, "user") if raw_prompt is not None else None
    if prompt is None:  # whole conversations: the turns they share are the prompt (TRL's own rule)
        from trl.data_utils import extract_prompt

        split = extract_prompt({"chosen": chosen, "rejected": rejected})
        prompt, chosen, rejected = split["prompt"], split["chosen"], split["rejected"]
    else:
        chosen, rejected = _without_prefix(chosen, prompt), _without_prefix(rejected, prompt)
    prompt = _with_system_prompt(prompt, recipe.template.system_prompt)
    problem = _problem(prompt, chosen, rejected)
    if problem:
        report.dropped[problem] += 1
        return None
    prompt_ids, chosen_ids = _encode(tokenizer, prompt, chosen)
    _, rejected_ids = _encode(tokenizer, prompt, rejected)
    limit = section.max_length
    if len(prompt_ids) >= limit:
        report.dropped["prompt alone fills data.max_length (no answer tokens left)"] += 1
        return None
    room = limit - len(prompt_ids)
    if chosen_ids[:room] == rejected_ids[:room]:
        report.dropped["chosen and rejected only differ past data.max_length"] += 1
        return None
    if len(chosen_ids) > room or len(rejected_ids) > room:
        report.truncated += 1
    return Pair(prompt, chosen, rejected, prompt_ids, chosen_ids[:room], rejected_ids[:room])


def _judged(row: dict[str, Any], recipe: Recipe, tokenizer, report: PreferenceReport) -> Judged | None:
    section = recipe.data
    prompt = _messages(row.get(_column(section, "prompt")), "user")
    completion = _messages(row.get(_column(section, "completion")))
    label = _desirable(row.get(_column(section, "label")))
    if prompt is None or completion is None or label is None:
        report.dropped["malformed row (prompt and completion must be text or chat messages, label true/false)"] += 1
        return None
    completion = _without_prefix(completion, prompt)
    prompt = _with_system_prompt(prompt, recipe.template.system_prompt)
    if not _has_text(prompt) or not _has_text(completion):
        report.dropped["empty prompt or completion"] += 1
        return None
    prompt_ids, completion_ids = _encode(tokenizer, prompt, completion)
    room = section.max_length - len(prompt_ids)
    if room <= 0:
        report.dropped["prompt alone fills data.max_length (no answer tokens left)"] += 1
        return None
    if len(completion_ids) > room:
        report.truncated += 1
    return Judged(prompt, completion, label, prompt_ids, completion_ids[:room])


def _problem(prompt: Messages, chosen: Messages, rejected: Messages) -> str | None:
    if not _has_text(prompt):
        return "empty prompt"
    if not _has_text(chosen) or not _has_text(rejected):
        return "empty chosen or rejected answer"
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return "chosen or rejected does not end with an assistant answer"
    if _texts(chosen) == _texts(rejected):
        return "identical chosen and rejected"
    return None


def _messages(value: Any, role_of_text: str = "assistant") -> Messages | None:
    """Text as one message of `role_of_text`, or a list of chat messages with role aliases resolved; else None."""
    if isinstance(value, str):
        return [{"role": role_of_text, "content": value}]
    if not isinstance(value, list) or not value:
        return None
    messages = []
    for turn in value:
        if not isinstance(turn, dict):
            return None
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        messages.append({"role": _ROLE_ALIASES.get(role, role), "content": content})
    return messages


def _without_prefix(answer: Messages, prompt: Messages) -> Messages:
    """An answer given as the whole conversation (prompt turns first) cut down to the turns after the prompt."""
    return answer[len(prompt):] if len(answer) > len(prompt) and answer[:len(prompt)] == prompt else answer


def _with_system_prompt(prompt: Messages, system_prompt: str | None) -> Messages:
    if system_prompt and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *prompt]
    return prompt


def _has_text(messages: Messages) -> bool:
    return any(m["content"].strip() for m in messages if m["role"] != "system")


def _texts(messages: Messages) -> list[tuple[str, str]]:
    return [(m["role"], m["content"].strip()) for m in messages]


def _desirable(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


def _encode(tokenizer, prompt: Messages, answer: Messages) -> tuple[list[int], list[int]]:
    """Prompt ids (rendered with the generation prompt) and the answer's ids after them, split as TRL splits them."""
    prompt_ids = tokenizer(render(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(render(tokenizer, prompt + answer), add_special_tokens=False)["input_ids"]
    shared = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        shared += 1
    return list(prompt_ids[:shared]), list(full_ids[shared:])


def _column(section: DataSection, name: str) -> str:
    return section.fields.get(name, name)


# ----------------------------------------------------------------------------------------------------
# The report's counts and samples


def _count(report: PreferenceReport, tokenizer, pair: Pair) -> None:
    report.total_tokens += len(pair.prompt_ids) * 2 + len(pair.chosen_ids) + len(pair.rejected_ids)
    report.trained_tokens += len(pair.chosen_ids) + len(pair.rejected_ids)
    report.eos_trained = report.eos_trained or tokenizer.eos_token_id in pair.chosen_ids
    for side, ids in (("prompt", pair.prompt_ids), ("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        report.token_lengths.setdefault(side, {"sum": 0, "max": 0, "n": 0})
        lengths = report.token_lengths[side]
        lengths["sum"] += len(ids)
        lengths["max"] = max(lengths["max"], len(ids))
        lengths["n"] += 1
    if len(report.samples) < 2:  # the prompt, then chosen (scored, highlighted) and rejected (scored, highlighted)
        pieces = [(tokenizer.decode([t]), False) for t in pair.prompt_ids]
        pieces += [(tokenizer.decode([t]), True) for t in pair.chosen_ids]
        pieces += [("\n--- rejected: ", False)] + [(tokenizer.decode([t]), True) for t in pair.rejected_ids]
        report.samples.append(pieces)


def _count_judged(report: PreferenceReport, tokenizer, judged: Judged) -> None:
    report.total_tokens += len(judged.prompt_ids) + len(judged.completion_ids)
    report.trained_tokens += len(judged.completion_ids)
    report.eos_trained = report.eos_trained or tokenizer.eos_token_id in judged.completion_ids
    for side, ids in (("prompt", judged.prompt_ids), ("completion", judged.completion_ids)):
        lengths = report.token_lengths.setdefault(side, {"sum": 0, "max": 0, "n": 0})
        lengths["sum"] += len(ids)
        lengths["max"] = max(lengths["max"], len(ids))
        lengths["n"] += 1
    if len(report.samples) < 2:
        label = "  (desirable)" if judged.desirable else "  (undesirable)"
        report.samples.append([(tokenizer.decode([t]), False) for t in judged.prompt_ids]
                              + [(tokenizer.decode([t]), True) for t in judged.completion_ids] + [(label, False)])


def _finish_lengths(report: PreferenceReport) -> None:
    report.token_lengths = {side: {"mean": round(v["sum"] / v["n"], 1) if v["n"] else 0.0, "max": v["max"]}
                            if "sum" in v else v for side, v in report.token_lengths.items()}


def _dataset(examples: list, dataset_type, *, as_ids: bool = False):
    """The conversations TRL's DPOTrainer / KTOTrainer read (they tokenize them as `_encode` does); with `as_ids`
    (task orpo), each pair's token ids as the lint measured and truncated them.

    TRL's ORPOTrainer tokenizes rendered text its own way: it adds a BOS the template may not have and an EOS after
    the template's end-of-turn (ChatML answers end in "<|im_end|>\n", so it would train "\n<|im_end|>" the model
    never sees at inference). lorafit.orpo_trainer.ORPOTrainer lays these ids out instead, so ORPO trains on exactly
    the tokens DPO and `lorafit eval` score.
    """
    if as_ids:
        return dataset_type.from_dict({"prompt_ids": [e.prompt_ids for e in examples],
                                       "chosen_ids": [e.chosen_ids for e in examples],
                                       "rejected_ids": [e.rejected_ids for e in examples],
                                       "length": _pair_lengths(examples)})
    if examples and isinstance(examples[0], Judged):
        return dataset_type.from_dict({"prompt": [e.prompt for e in examples],
                                       "completion": [e.completion for e in examples],
                                       "label": [e.desirable for e in examples]})
    return dataset_type.from_dict({"prompt": [e.prompt for e in examples], "chosen": [e.chosen for e in examples],
                                   "rejected": [e.rejected for e in examples], "length": _pair_lengths(examples)})


def _pair_lengths(pairs: list) -> list[int]:
    """Each pair's prompt + longer answer in tokens: the `length` column the Trainer's data.group_by_length sorts
    by (TRL's pair batches have no `input_ids` to measure)."""
    return [len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in pairs]
