"""Rewards for online RL (task grpo / rloo): the recipe's `rewards:` entries, the built-in scorers, custom code.

A reward scores a batch of completions against the row's columns and returns one float per completion.
The recipe lists rewards as entries (`RewardSpec`): a built-in by `name` with its parameters, or the
user's own function by `function: path.py:name`. `build_rewards` turns the list into what TRL's
GRPOTrainer / RLOOTrainer take: `reward_funcs` (one callable per entry, its `__name__` the entry's label,
so TRL logs `rewards/<label>/mean` for each) and `reward_weights`. Every callable checks what it returns
(one finite number per completion) and names the reward when it does not.

A completion is a string, or, for a conversational prompt, TRL's list of messages
(`[{"role": "assistant", "content": "..."}]`); the scorers read the text of its messages.

Custom rewards run the user's Python, so `load_custom_reward` refuses unless the command line allowed it
(`--allow-code`): a recipe alone never runs code. The contract for such a function is in
`load_custom_reward`'s docstring.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import json
import math
import numbers
import re
import string
import sys
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from lorafit.errors import LorafitError, RunFailed

Completion = str | list[dict[str, Any]]
ALLOW_CODE_FLAG = "--allow-code"
_PREVIEW_CHARS = 200

# ---------------------------------------------------------------------------------------------------------------
# Text helpers shared by the scorers
# ---------------------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# A number as people write it: sign, thousands separators, decimals, exponent ("-1,234.5", "3e-4", ".5").
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
_JSON_FENCE = re.compile(r"\A```(?:json)?\s*\n?(.*?)\n?```\Z", re.DOTALL | re.IGNORECASE)
THINK_PATTERN = r"\s*<think>.*?</think>\s*\S.*"


def completion_text(completion: Completion) -> str:
    """The text of one completion: the string itself, or the messages' contents joined (TRL's chat form).

    A message's content may be a string or a list of parts (`{"type": "text", "text": ...}`); non-text
    parts are skipped.
    """
    if isinstance(completion, str):
        return completion
    pieces = []
    for message in completion:
        content = message.get("content", "")
        if isinstance(content, str):
            pieces.append(content)
        else:
            pieces.extend(part.get("text", "") for part in content if part.get("type") == "text")
    return "".join(pieces)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD-style; as `lorafit eval` does)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over the words of the normalised texts: 2PR/(P+R) of their longest common subsequence."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for token in pred:
        current = [0]
        for j, other in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def last_number(text: str) -> float | None:
    """The last number written in `text` ("... so the answer is 1,234.5." -> 1234.5), or None."""
    for match in reversed(list(_NUMBER.finditer(text))):
        token = match.group().replace(",", "")
        if any(ch.isdigit() for ch in token):
            try:
                return float(token)
            except ValueError:
                continue
    return None


def parse_json(text: str) -> tuple[bool, Any]:
    """(True, value) when `text`, stripped and unwrapped from one ```json fence, is a JSON document."""
    text = text.strip()
    fenced = _JSON_FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        return False, None


# ---------------------------------------------------------------------------------------------------------------
# The built-in scorers: pure functions, one float per completion
# ---------------------------------------------------------------------------------------------------------------


def exact_match(completions: Sequence[Completion], references: Sequence[Any]) -> list[float]:
    """1.0 when the completion equals the reference after stripping surrounding whitespace, else 0.0."""
    return [float(completion_text(c).strip() == str(r).strip()) for c, r in _pairs(completions, references)]


def normalized_exact_match(completions: Sequence[Completion], references: Sequence[Any]) -> list[float]:
    """1.0 when the completion equals the reference after `normalize_answer` (case, punctuation, articles, spaces)."""
    return [float(normalize_answer(completion_text(c)) == normalize_answer(str(r)))
            for c, r in _pairs(completions, references)]


def word_overlap(completions: Sequence[Completion], references: Sequence[Any]) -> list[float]:
    """ROUGE-L F1 over normalised words, in [0, 1]: partial credit that respects word order.

    Chosen over bag-of-words token F1 because order matters in many answers: for "reverse these words",
    echoing the input scores 1.0 under token F1 but only 1/n under ROUGE-L. It is also the ROUGE-L that
    `lorafit eval` reports, so the training signal and the eval score agree.
    """
    return [rouge_l(completion_text(c), str(r)) for c, r in _pairs(completions, references)]


def char_overlap(completions: Sequence[Completion], references: Sequence[Any]) -> list[float]:
    """Character similarity in [0, 1]: difflib's ratio 2M/T (M matched characters, T both lengths), stripped texts."""
    return [difflib.SequenceMatcher(None, completion_text(c).strip(), str(r).strip(), autojunk=False).ratio()
            for c, r in _pairs(completions, references)]


def regex_match(completions: Sequence[Completion], pattern: str, mode: str = "full") -> list[float]:
    """1.0 when the completion matches `pattern` (dot matches newlines): the whole text (`full`) or anywhere (`search`)."""
    compiled = re.compile(pattern, re.DOTALL)
    match = compiled.fullmatch if mode == "full" else compiled.search
    return [float(match(completion_text(c)) is not None) for c in completions]


def numeric_match(completions: Sequence[Completion], references: Sequence[Any], tolerance: float = 1e-6,
                  relative: bool = False) -> list[float]:
    """1.0 when the last number in the completion is within `tolerance` of the reference's (last) number.

    The reference may be a number or a text ("#### 72" -> 72). With `relative`, the tolerance is a fraction
    of the reference's magnitude. No number in the completion (or none in the reference) scores 0.0.
    """
    scores = []
    for c, r in _pairs(completions, references):
        got = last_number(completion_text(c))
        want = float(r) if isinstance(r, numbers.Real) and not isinstance(r, bool) else last_number(str(r))
        if got is None or want is None:
            scores.append(0.0)
            continue
        bound = tolerance * abs(want) if relative else tolerance
        scores.append(float(abs(got - want) <= bound))
    return scores


def valid_json(completions: Sequence[Completion]) -> list[float]:
    """1.0 when the completion is one JSON document (surrounding whitespace and one ```json fence allowed)."""
    return [float(parse_json(completion_text(c))[0]) for c in completions]


def json_schema_match(completions: Sequence[Completion], validator: Any) -> list[float]:
    """1.0 when the completion is JSON (as `valid_json`) and `validator` (a jsonschema validator) accepts it."""
    scores = []
    for c in completions:
        ok, value = parse_json(completion_text(c))
        scores.append(float(ok and validator.is_valid(value)))
    return scores


def length_penalty(lengths: Sequence[int], limit: int, bound: str = "max") -> list[float]:
    """0.0 within the bound; beyond it, minus the excess as a fraction of `limit`, down to -1.0.

    `bound` max: a length of 1.5 x limit scores -0.5. `bound` min: a length of half the limit scores -0.5.
    """
    if bound == "max":
        return [-min(1.0, max(0, n - limit) / limit) for n in lengths]
    return [-min(1.0, max(0, limit - n) / limit) for n in lengths]


def _pairs(completions: Sequence[Completion], references: Sequence[Any]) -> zip:
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    return zip(completions, references)


# ---------------------------------------------------------------------------------------------------------------
# The recipe's entries
# ---------------------------------------------------------------------------------------------------------------


class _Reward(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    weight: float = Field(1.0, description="This reward's weight in the sum TRL turns into advantages.")
    label: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$",
        description="The name this reward is logged under (rewards/<label>/mean); default its name, or the "
                    "function's name for a custom reward. Needed when two entries would log under one name.",
    )

    def columns(self) -> tuple[str, ...]:
        """The data columns this reward reads, so a lint can check the data has them before any compute."""
        return ()

    def display_name(self) -> str:
        raise NotImplementedError


class _Builtin(_Reward):
    name: str = Field(description="Which built-in reward this entry is.")

    def display_name(self) -> str:
        return self.label or self.name


class _ColumnReward(_Builtin):
    column: str = Field(description="The data column holding each row's reference answer.")

    def columns(self) -> tuple[str, ...]:
        return (self.column,)


class ExactMatchReward(_ColumnReward):
    """1.0 when the completion equals the column's value (surrounding whitespace ignored), else 0.0."""

    name: Literal["exact_match"]


class NormalizedExactMatchReward(_ColumnReward):
    """Exact match after lower-casing and dropping punctuation, articles and extra whitespace."""

    name: Literal["normalized_exact_match"]


class WordOverlapReward(_ColumnReward):
    """ROUGE-L F1 over normalised words against the column: partial credit in [0, 1] that respects order."""

    name: Literal["word_overlap"]


class CharOverlapReward(_ColumnReward):
    """Character similarity to the column in [0, 1] (2 x matched characters / total characters)."""

    name: Literal["char_overlap"]


class NumericMatchReward(_ColumnReward):
    """1.0 when the last number in the completion is within the tolerance of the column's (last) number."""

    name: Literal["numeric_match"]
    tolerance: float = Field(1e-6, ge=0, description="Largest accepted difference from the reference number.")
    relative: bool = Field(False, description="Read tolerance as a fraction of the reference's magnitude.")


class RegexReward(_Builtin):
    """1.0 when the completion matches the pattern, else 0.0."""

    name: Literal["regex"]
    pattern: str = Field(description="A Python regular expression; `.` matches newlines too.")
    mode: Literal["full", "search"] = Field(
        "full", description="full: the whole completion must match; search: a match anywhere counts."
    )

    @model_validator(mode="after")
    def _compiles(self) -> RegexReward:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"pattern does not compile: {exc}") from None
        return self


class ThinkFormatReward(_Builtin):
    """1.0 for `<think>...</think>` followed by a non-empty answer (pattern `THINK_PATTERN`), else 0.0."""

    name: Literal["think_format"]


class ValidJsonReward(_Builtin):
    """1.0 when the completion is one JSON document (a single ```json fence around it is allowed)."""

    name: Literal["valid_json"]


class JsonSchemaReward(_Builtin):
    """1.0 when the completion is JSON that the schema accepts (validated with the jsonschema package)."""

    name: Literal["json_schema"]
    schema_file: str = Field(description="A JSON Schema file, relative to the recipe's folder.")


class _LengthReward(_Builtin):
    tokens: int | None = Field(None, gt=0, description="The bound in completion tokens (as TRL counts them).")
    chars: int | None = Field(None, gt=0, description="The bound in characters of the completion's text.")

    @model_validator(mode="after")
    def _one_unit(self) -> _LengthReward:
        if (self.tokens is None) == (self.chars is None):
            raise ValueError("set exactly one of tokens or chars")
        return self


class MaxLengthReward(_LengthReward):
    """0.0 up to the bound, then minus the excess as a fraction of the bound (down to -1.0)."""

    name: Literal["max_length"]


class MinLengthReward(_LengthReward):
    """0.0 from the bound up, below it minus the shortfall as a fraction of the bound (down to -1.0)."""

    name: Literal["min_length"]


class CustomReward(_Reward):
    """The user's Python function; runs only when the command line allows code (--allow-code)."""

    function: str = Field(
        pattern=r"^[^:]+\.py:[A-Za-z_][A-Za-z0-9_]*$",
        description="path.py:function_name, the path relative to the recipe's folder. See load_custom_reward "
                    "for the signature it must have.",
    )

    def display_name(self) -> str:
        return self.label or self.function.rsplit(":", 1)[1]


BUILTIN_REWARDS: dict[str, type[_Reward]] = {
    model.model_fields["name"].annotation.__args__[0]: model  # type: ignore[attr-defined]
    for model in (ExactMatchReward, NormalizedExactMatchReward, WordOverlapReward, CharOverlapReward,
                  NumericMatchReward, RegexReward, ThinkFormatReward, ValidJsonReward, JsonSchemaReward,
                  MaxLengthReward, MinLengthReward)
}


def _reward_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return "custom" if "function" in value else value.get("name")
    return "custom" if isinstance(value, CustomReward) else getattr(value, "name", None)


RewardSpec = Annotated[
    Annotated[CustomReward, Tag("custom")] | Annotated[ExactMatchReward, Tag("exact_match")]
    | Annotated[NormalizedExactMatchReward, Tag("normalized_exact_match")]
    | Annotated[WordOverlapReward, Tag("word_overlap")] | Annotated[CharOverlapReward, Tag("char_overlap")]
    | Annotated[NumericMatchReward, Tag("numeric_match")] | Annotated[RegexReward, Tag("regex")]
    | Annotated[ThinkFormatReward, Tag("think_format")] | Annotated[ValidJsonReward, Tag("valid_json")]
    | Annotated[JsonSchemaReward, Tag("json_schema")] | Annotated[MaxLengthReward, Tag("max_length")]
    | Annotated[MinLengthReward, Tag("min_length")],
    Discriminator(
        _reward_kind, custom_error_type="reward_kind",
        custom_error_message=f"each reward needs `name` (a built-in: {', '.join(BUILTIN_REWARDS)}) or `function`",
    ),
]
"""One `rewards:` entry: a built-in by `name`, or `function: path.py:name`. Validate lists with a TypeAdapter
or as a field (`rewards: list[RewardSpec]`)."""


def check_reward_columns(specs: Sequence[_Reward], columns: Sequence[str]) -> None:
    """Raise before any compute when a reward reads a column the data lacks (names the entry and the columns)."""
    for index, spec in enumerate(specs):
        for column in spec.columns():
            if column not in columns:
                close = difflib.get_close_matches(column, columns, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"the data has: {', '.join(columns) or 'nothing'}"
                raise LorafitError(
                    f"reward {spec.display_name()} needs column '{column}', which the data lacks",
                    where=f"rewards[{index}].column", hint=hint,
                )


# ---------------------------------------------------------------------------------------------------------------
# From entries to TRL's reward_funcs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rewards:
    """What GRPOConfig / the trainer take: `functions` (reward_funcs) and `weights` (reward_weights), in order."""

    functions: list[Callable[..., list[float]]]
    weights: list[float]
    names: list[str]


def build_rewards(specs: Sequence[_Reward], recipe_dir: Path, *, allow_code: bool) -> Rewards:
    """One checked callable per entry, named for TRL's per-reward logs; custom code only with allow_code."""
    names = [spec.display_name() for spec in specs]
    for index, name in enumerate(names):
        if names.index(name) != index:
            raise LorafitError(
                f"two rewards are logged as '{name}' (entries {names.index(name)} and {index})",
                where=f"rewards[{index}]", hint="give one of them a `label`",
            )
    functions = []
    for index, spec in enumerate(specs):
        if isinstance(spec, CustomReward):
            functions.append(load_custom_reward(spec, recipe_dir, allow_code, index=index))
        else:
            functions.append(_builtin_function(spec, recipe_dir, index))
    return Rewards(functions=functions, weights=[spec.weight for spec in specs], names=names)


def reward_names(specs: Sequence[_Reward]) -> list[str]:
    """The names the entries are logged under (rewards/<name>/mean), in order."""
    return [spec.display_name() for spec in specs]


def check_function_columns(built: Rewards, columns: Sequence[str]) -> None:
    """Raise before any compute when a custom reward names a column (without a default) the data lacks."""
    for index, function in enumerate(built.functions):
        user = getattr(function, "user_function", None)
        missing = [c for c in custom_reward_columns(user) if c not in columns] if user is not None else []
        if missing:
            raise LorafitError(f"reward {built.names[index]} takes the column '{missing[0]}', which the data lacks",
                               where=f"rewards[{index}].function",
                               hint=f"the data has: {', '.join(columns)}; give the parameter a default, or take "
                                    "**kwargs")


def mean_rewards(built: Rewards, prompts: Sequence[Any], completions: Sequence[Completion],
                 completion_ids: Sequence[Sequence[int]], columns: dict[str, list[Any]]) -> dict[str, float]:
    """Each reward's mean over `completions` (eval's greedy answers), and their weighted sum's mean as `reward`."""
    means: dict[str, float] = {}
    total = [0.0] * len(completions)
    for function, weight, name in zip(built.functions, built.weights, built.names, strict=True):
        scores = function(prompts=list(prompts), completions=list(completions), completion_ids=list(completion_ids),
                          **columns)
        means[name] = sum(scores) / len(scores) if scores else 0.0
        total = [t + weight * s for t, s in zip(total, scores, strict=True)]
    return {"reward": sum(total) / len(total) if total else 0.0, **means}


def _builtin_function(spec: _Reward, recipe_dir: Path, index: int) -> Callable[..., list[float]]:
    score = _builtin_scorer(spec, recipe_dir, index)
    name = spec.display_name()

    def reward(completions: Sequence[Completion], completion_ids: Sequence[Sequence[int]] | None = None,
               **columns: Any) -> list[float]:
        for column in spec.columns():
            if column not in columns:
                raise LorafitError(f"reward {name} needs column '{column}', which the rows lack",
                                   where=f"rewards[{index}].column")
        return check_scores(name, score(completions, completion_ids, columns), len(completions))

    reward.__name__ = reward.__qualname__ = name
    return reward


def _builtin_scorer(spec: _Reward, recipe_dir: Path, index: int) -> Callable[[Sequence, Any, dict], list[float]]:
    """The scorer for one built-in entry as f(completions, completion_ids, columns)."""
    column = spec.columns()[0] if spec.columns() else None
    by_reference = {ExactMatchReward: exact_match, NormalizedExactMatchReward: normalized_exact_match,
                    WordOverlapReward: word_overlap, CharOverlapReward: char_overlap}
    if type(spec) in by_reference:
        function = by_reference[type(spec)]
        return lambda completions, _ids, columns: function(completions, columns[column])
    if isinstance(spec, NumericMatchReward):
        return lambda completions, _ids, columns: numeric_match(completions, columns[column], spec.tolerance,
                                                                spec.relative)
    if isinstance(spec, RegexReward):
        return lambda completions, _ids, _columns: regex_match(completions, spec.pattern, spec.mode)
    if isinstance(spec, ThinkFormatReward):
        return lambda completions, _ids, _columns: regex_match(completions, THINK_PATTERN)
    if isinstance(spec, ValidJsonReward):
        return lambda completions, _ids, _columns: valid_json(completions)
    if isinstance(spec, JsonSchemaReward):
        validator = load_schema_validator(recipe_dir / spec.schema_file, where=f"rewards[{index}].schema_file")
        return lambda completions, _ids, _columns: json_schema_match(completions, validator)
    if isinstance(spec, MaxLengthReward | MinLengthReward):
        bound = "max" if isinstance(spec, MaxLengthReward) else "min"
        limit = spec.tokens or spec.chars

        def by_length(completions: Sequence[Completion], ids: Sequence[Sequence[int]] | None, _columns: dict):
            if spec.tokens is not None:
                if ids is None:
                    raise ValueError(f"reward {spec.display_name()} counts tokens: pass completion_ids")
                lengths = [len(i) for i in ids]
            else:
                lengths = [len(completion_text(c)) for c in completions]
            return length_penalty(lengths, limit, bound)

        return by_length
    raise AssertionError(f"no scorer for {type(spec).__name__}")


def load_schema_validator(path: Path, *, where: str) -> Any:
    """A jsonschema validator for the schema file (its draft from `$schema`, else the newest), schema checked."""
    try:
        import jsonschema
    except ImportError:
        raise LorafitError("reward json_schema needs the jsonschema package", where=where,
                           hint="pip install jsonschema") from None
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LorafitError(f"cannot read the schema file {path}: {exc.strerror}", where=where) from None
    except ValueError as exc:
        raise LorafitError(f"the schema file {path} is not JSON: {exc}", where=where) from None
    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise LorafitError(f"the schema file {path} is not a valid JSON Schema: {exc.message}", where=where) from None
    return validator_class(schema)


def check_scores(name: str, scores: Any, expected: int) -> list[float]:
    """The scores as floats, or a RunFailed naming the reward: one finite number per completion."""
    if isinstance(scores, str | bytes) or not isinstance(scores, Sequence):
        try:
            scores = list(scores)
        except TypeError:
            raise RunFailed(f"reward {name} returned {type(scores).__name__}, not a list of numbers") from None
    if len(scores) != expected:
        raise RunFailed(f"reward {name} returned {len(scores)} scores for {expected} completions",
                        hint="return one number per completion, in order")
    values = []
    for position, score in enumerate(scores):
        if not isinstance(score, numbers.Real):
            raise RunFailed(f"reward {name} returned {score!r} ({type(score).__name__}) for completion {position}, "
                            "not a number")
        value = float(score)
        if not math.isfinite(value):
            raise RunFailed(f"reward {name} returned {value} for completion {position}",
                            hint="rewards must be finite numbers")
        values.append(value)
    return values


# ---------------------------------------------------------------------------------------------------------------
# Custom rewards: the user's code, only with --allow-code
# ---------------------------------------------------------------------------------------------------------------


def load_custom_reward(spec: CustomReward, recipe_dir: Path, allow_code: bool, *,
                       index: int = 0) -> Callable[..., list[float]]:
    """The user's reward function, loaded from its file and wrapped so failures name the reward and the row.

    The contract: the function is called once per batch with keyword arguments only, and returns one number
    per completion, in order.
    - `completions`: list of completions (strings, or lists of message dicts for conversational prompts);
    - `prompts`: the matching prompts, in the same form;
    - `completion_ids`: the completions' token ids;
    - every other column of the data, as a list aligned with `completions` (e.g. `answer`);
    - from TRL also `trainer_state`, `log_extra`, `log_metric`.
    It must name every parameter it takes (no positional-only ones) and either accept `**kwargs` or name only
    parameters from that list: it must take `completions`, unless it takes `**kwargs`. The columns it names
    without defaults are the data columns it needs (checked against the data by `custom_reward_columns`).

    The file is run as a module that is not left in `sys.modules`, and `sys.path` is not changed.
    """
    where = f"rewards[{index}].function"
    if not allow_code:
        raise LorafitError(f"reward {spec.function} runs Python code from the recipe's folder", where=where,
                           hint=f"add {ALLOW_CODE_FLAG} to the command if you trust that file")
    file_part, function_name = spec.function.rsplit(":", 1)
    path = (recipe_dir / file_part).resolve()
    if not path.is_file():
        raise LorafitError(f"reward file {path} does not exist", where=where)
    function = _load_function(path, function_name, where)
    check_custom_signature(function, where=where)
    name = spec.display_name()

    def reward(completions: Sequence[Completion], **kwargs: Any) -> list[float]:
        try:
            scores = _call(function, completions, kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's code: any exception is theirs, shown with their frames
            raise _failure(name, function, path, completions, kwargs, exc) from None
        return check_scores(name, scores, len(completions))

    reward.__name__ = reward.__qualname__ = name
    reward.user_function = function  # type: ignore[attr-defined]
    return reward


def custom_reward_columns(function: Callable[..., Any]) -> tuple[str, ...]:
    """The data columns a custom reward names without a default (what a lint checks the data for)."""
    given = {"completions", "prompts", "completion_ids", "trainer_state", "log_extra", "log_metric"}
    return tuple(p.name for p in inspect.signature(function).parameters.values()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
                 and p.name not in given)


def check_custom_signature(function: Callable[..., Any], *, where: str) -> None:
    """Refuse, before any model loads, a function TRL could not call with the keyword arguments it passes."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        raise LorafitError("the reward's signature cannot be read", where=where) from None
    names = {p.name for p in parameters}
    if any(p.kind is p.POSITIONAL_ONLY for p in parameters):
        raise LorafitError("a reward function is called with keywords only; it has positional-only parameters",
                           where=where, hint="drop the `/` from its signature")
    has_var_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters)
    if not has_var_keyword and "completions" not in names:
        raise LorafitError("a reward function must take `completions` (or **kwargs)", where=where,
                           hint="def score(completions, answer, **kwargs) -> list[float]")
    if inspect.iscoroutinefunction(function):
        raise LorafitError("async reward functions are not supported", where=where)


def _load_function(path: Path, function_name: str, where: str) -> Callable[..., Any]:
    module_name = f"_lorafit_reward_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise LorafitError(f"cannot load {path} as a Python module", where=where)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up while it runs
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's module: any failure to import is theirs
        raise LorafitError(f"importing {path.name} failed:\n{_user_traceback(exc, path)}", where=where) from None
    finally:
        sys.modules.pop(module_name, None)
    function = getattr(module, function_name, None)
    if not callable(function):
        defined = sorted(n for n, v in vars(module).items() if isinstance(v, types.FunctionType) and
                         not n.startswith("_"))
        raise LorafitError(f"{path.name} has no function {function_name}", where=where,
                           hint=f"functions there: {', '.join(defined) or 'none'}")
    return function


def _call(function: Callable[..., Any], completions: Sequence[Completion], kwargs: dict[str, Any]) -> Any:
    parameters = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return function(completions=completions, **kwargs)
    passed = {"completions": completions, **kwargs}
    return function(**{name: value for name, value in passed.items() if name in parameters})


def _failure(name: str, function: Callable[..., Any], path: Path, completions: Sequence[Completion],
             kwargs: dict[str, Any], exc: BaseException) -> RunFailed:
    """The first row the function fails on alone (the batch when none does), with the user's traceback."""
    row, row_exc = None, exc
    for position in range(len(completions)):
        one = {key: value[position:position + 1] if _per_row(value, len(completions)) else value
               for key, value in kwargs.items()}
        try:
            _call(function, completions[position:position + 1], one)
        except Exception as error:  # noqa: BLE001 - the user's code, called again row by row
            row, row_exc = position, error
            break
    if row is None:
        what = f"a batch of {len(completions)} completions"
    else:
        prompts = kwargs.get("prompts")
        prompt = f"prompt {_preview(prompts[row])}; " if _per_row(prompts, len(completions)) else ""
        what = f"completion {row} ({prompt}completion {_preview(completions[row])})"
    return RunFailed(f"reward {name} raised {type(row_exc).__name__} on {what}:\n"
                     f"{_user_traceback(row_exc, path)}")


def _per_row(value: Any, count: int) -> bool:
    return isinstance(value, list | tuple) and len(value) == count


def _preview(value: Any) -> str:
    text = completion_text(value) if isinstance(value, str | list) else repr(value)
    text = repr(text)
    return text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "...'"


def _user_traceback(exc: BaseException, path: Path) -> str:
    """The traceback from the first frame in the user's file on (lorafit's and TRL's frames dropped)."""
    tb = exc.__traceback__
    while tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve() != path:
        tb = tb.tb_next
    frames = tb if tb is not None else exc.__traceback__
    return "".join(traceback.format_exception(type(exc), exc, frames, chain=False)).rstrip()
