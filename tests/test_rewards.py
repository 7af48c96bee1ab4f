"""The RL rewards (lorafit/rewards.py): each built-in on hand-made cases, the recipe entries, custom code."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from lorafit import rewards
from lorafit.errors import LorafitError, RunFailed

SPECS = TypeAdapter(list[rewards.RewardSpec])


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def build(entries: list[dict], tmp_path: Path, *, allow_code: bool = False) -> rewards.Rewards:
    return rewards.build_rewards(SPECS.validate_python(entries), tmp_path, allow_code=allow_code)


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


# ---- the built-in scorers ------------------------------------------------------------------------------------


def test_exact_match_cases():
    """Exact (surrounding whitespace ignored), near (case differs), wrong, empty, and a chat-style completion."""
    completions = ["nose bee cheese lamp", "  nose bee cheese lamp\n", "Nose bee cheese lamp", "lamp", "",
                   chat("nose bee cheese lamp")]
    assert rewards.exact_match(completions, ["nose bee cheese lamp"] * 6) == [1, 1, 0, 0, 0, 1]
    assert rewards.exact_match([""], [""]) == [1.0]


def test_normalized_exact_match_cases():
    """Case, punctuation, articles and runs of whitespace are ignored; different words are not."""
    completions = ["The Nose, bee  cheese lamp.", "nose bee cheese", "", chat("NOSE bee cheese lamp!")]
    assert rewards.normalized_exact_match(completions, ["nose bee cheese lamp"] * 4) == [1, 0, 0, 1]


def test_word_overlap_is_rouge_l_and_respects_order():
    """Exact scores 1, the input echoed (reversed order) only 1/4, a missing word partial, empty and wrong 0."""
    reference = "nose bee cheese lamp"
    scores = rewards.word_overlap(["nose bee cheese lamp", "lamp cheese bee nose", "nose bee cheese", "", "dog",
                                   chat("nose bee cheese lamp")], [reference] * 6)
    assert scores[0] == 1.0 and scores[5] == 1.0
    assert scores[1] == pytest.approx(0.25)
    assert scores[2] == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert scores[3] == 0.0 and scores[4] == 0.0


def test_normalization_matches_lorafit_eval():
    """The rewards score like `lorafit eval` (same normalisation and ROUGE-L), so training and eval agree."""
    from lorafit import evaluate

    pairs = [("The Nose, bee.", "nose bee"), ("a b c d", "d c b a"), ("", ""), ("x", ""), ("Lamp  cheese", "lamp")]
    for prediction, reference in pairs:
        assert rewards.normalize_answer(prediction) == evaluate.normalize_answer(prediction)
        assert rewards.rouge_l(prediction, reference) == evaluate.rouge_l(prediction, reference)


def test_char_overlap_cases():
    """Identical texts 1, one character off close to 1, disjoint 0, empty vs text 0, chat-style read as text."""
    scores = rewards.char_overlap(["abcd", "abce", "wxyz", "", chat("abcd")], ["abcd"] * 5)
    assert scores[0] == 1.0 and scores[4] == 1.0
    assert scores[1] == pytest.approx(0.75)
    assert scores[2] == 0.0 and scores[3] == 0.0


def test_regex_and_think_format():
    """Full match vs search; the think layout needs a closed think block and a non-empty answer after it."""
    assert rewards.regex_match(["answer: 42", "the answer: 42", ""], r"answer: \d+") == [1, 0, 0]
    assert rewards.regex_match(["answer: 42", "the answer: 42", ""], r"answer: \d+", mode="search") == [1, 1, 0]
    good = "<think>\nfour words, reversed\n</think>\nnose bee"
    cases = [good, chat(good), "<think>x</think>", "nose bee", "<think>unclosed nose bee", ""]
    assert rewards.regex_match(cases, rewards.THINK_PATTERN) == [1, 1, 0, 0, 0, 0]


def test_numeric_match_cases():
    """The last number counts (thousands separators, signs, decimals); a text reference gives its last number."""
    completions = ["3 apples and 4 pears: 7", "so 1,234.5", "about 7.0000001", "-3", "no number", "", chat("= 7")]
    assert rewards.numeric_match(completions, [7, "#### 1234.5", 7, "-3", 7, 7, "7"]) == [1, 1, 1, 1, 0, 0, 1]
    assert rewards.numeric_match(["7.1"], [7]) == [0.0]
    assert rewards.numeric_match(["7.1"], [7], tolerance=0.2) == [1.0]
    assert rewards.numeric_match(["105"], [100], tolerance=0.1, relative=True) == [1.0]
    assert rewards.numeric_match(["5"], ["no number here"]) == [0.0]


def test_valid_json_cases():
    """An object, a fenced object and a bare number are JSON; trailing text, an empty string and prose are not."""
    completions = ['{"a": 1}', '```json\n{"a": [1, 2]}\n```', "42", '{"a": 1} done', "", "hello", chat('["x"]')]
    assert rewards.valid_json(completions) == [1, 1, 1, 0, 0, 0, 1]


def test_json_schema_reward(tmp_path):
    """Matches the schema 1; valid JSON that breaks it (missing key, wrong enum, wrong type) 0; not JSON 0."""
    schema = {"type": "object", "required": ["name", "mood"],
              "properties": {"name": {"type": "string"}, "mood": {"enum": ["happy", "sad"]}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    built = build([{"name": "json_schema", "schema_file": "schema.json"}], tmp_path)
    completions = ['{"name": "a", "mood": "happy"}', '{"name": "a"}', '{"name": "a", "mood": "bored"}',
                   '{"name": 3, "mood": "sad"}', "nope", chat('{"name": "b", "mood": "sad"}')]
    assert built.functions[0](completions=completions) == [1, 0, 0, 0, 0, 1]


def test_json_schema_file_errors(tmp_path):
    """A missing file, a file that is not JSON and an invalid schema each stop the build, naming the entry."""
    entry = [{"name": "json_schema", "schema_file": "schema.json"}]
    with pytest.raises(LorafitError, match="cannot read") as caught:
        build(entry, tmp_path)
    assert caught.value.where == "rewards[0].schema_file"
    (tmp_path / "schema.json").write_text("{not json")
    with pytest.raises(LorafitError, match="not JSON"):
        build(entry, tmp_path)
    (tmp_path / "schema.json").write_text('{"type": 12}')
    with pytest.raises(LorafitError, match="not a valid JSON Schema"):
        build(entry, tmp_path)


def test_length_penalties():
    """Within the bound 0; beyond it minus the fraction over, floored at -1; min_length mirrors it."""
    assert rewards.length_penalty([0, 10, 15, 20, 100], 10) == [0, 0, -0.5, -1, -1]
    assert rewards.length_penalty([0, 5, 10, 30], 10, bound="min") == [-1, -0.5, 0, 0]


def test_length_rewards_count_tokens_or_chars(tmp_path):
    """tokens reads TRL's completion_ids; chars reads the text (chat-style too)."""
    built = build([{"name": "max_length", "tokens": 4}, {"name": "min_length", "chars": 4}], tmp_path)
    by_tokens, by_chars = built.functions
    assert by_tokens(completions=["a", "b"], completion_ids=[[1, 2, 3], [1, 2, 3, 4, 5, 6]]) == [0.0, -0.5]
    assert by_chars(completions=["ab", chat("abcd")], completion_ids=None) == [-0.5, 0.0]
    with pytest.raises(ValueError, match="completion_ids"):
        by_tokens(completions=["a"])


# ---- recipe entries --------------------------------------------------------------------------------------------


def test_issue_entries_validate_and_declare_columns():
    """The issue's entries parse to their classes; each says which columns it reads."""
    specs = SPECS.validate_python([
        {"name": "exact_match", "column": "answer", "weight": 1.0},
        {"name": "word_overlap", "column": "answer", "weight": 0.5},
        {"name": "max_length", "tokens": 32, "weight": 0.1},
        {"function": "rewards.py:score", "weight": 2},
    ])
    assert [type(s).__name__ for s in specs] == ["ExactMatchReward", "WordOverlapReward", "MaxLengthReward",
                                                 "CustomReward"]
    assert [s.columns() for s in specs] == [("answer",), ("answer",), (), ()]
    assert [s.display_name() for s in specs] == ["exact_match", "word_overlap", "max_length", "score"]
    assert set(rewards.BUILTIN_REWARDS) >= {"exact_match", "json_schema", "think_format", "numeric_match"}


@pytest.mark.parametrize("entry, message", [
    ({"name": "exact_match"}, "column"),  # a needed parameter missing
    ({"name": "exact_match", "column": "a", "colum": "b"}, "colum"),  # a typo: extra fields are refused
    ({"name": "exact_mach", "column": "a"}, "exact_match"),  # unknown name: the error lists the built-ins
    ({"column": "a"}, "`name`"),  # neither name nor function
    ({"name": "max_length", "tokens": 3, "chars": 4}, "exactly one"),
    ({"name": "max_length"}, "exactly one"),
    ({"name": "regex", "pattern": "(unclosed"}, "does not compile"),
    ({"function": "rewards.py"}, "pattern"),
    ({"name": "valid_json", "weight": float("nan")}, "finite"),
])
def test_bad_entries_are_refused(entry, message):
    """Each malformed entry fails validation with a message that points at the problem."""
    with pytest.raises(ValidationError, match=message):
        SPECS.validate_python([entry])


def test_missing_column_is_named_before_compute():
    """A reward that reads a column the data lacks: one error naming the reward, column and a close match."""
    specs = SPECS.validate_python([{"name": "valid_json"}, {"name": "exact_match", "column": "answr"}])
    rewards.check_reward_columns(specs, ["prompt", "answr"])
    with pytest.raises(LorafitError, match="reward exact_match needs column 'answr'") as caught:
        rewards.check_reward_columns(specs, ["prompt", "answer"])
    assert caught.value.where == "rewards[1].column" and "answer" in caught.value.hint


def test_builder_names_weights_and_duplicate_labels(tmp_path):
    """Functions are named for TRL's per-reward logs, weights kept in order; two entries with one name need a label."""
    built = build([{"name": "exact_match", "column": "answer"},
                   {"name": "word_overlap", "column": "answer", "weight": 0.5}], tmp_path)
    assert [f.__name__ for f in built.functions] == built.names == ["exact_match", "word_overlap"]
    assert built.weights == [1.0, 0.5]
    # TRL's call: keyword arguments, the row's columns beside prompts and the state
    scores = built.functions[1](prompts=["p", "p"], completions=["x y", chat("y x")], completion_ids=[[1], [2]],
                                answer=["x y", "x y"], trainer_state=None, log_extra=None, log_metric=None)
    assert scores == [1.0, 0.5]
    with pytest.raises(LorafitError, match="logged as 'exact_match'"):
        build([{"name": "exact_match", "column": "a"}, {"name": "exact_match", "column": "b"}], tmp_path)
    relabelled = build([{"name": "exact_match", "column": "a"},
                        {"name": "exact_match", "column": "b", "label": "exact_b"}], tmp_path)
    assert relabelled.names == ["exact_match", "exact_b"]


# ---- custom rewards --------------------------------------------------------------------------------------------


def test_custom_reward_refused_without_the_flag(tmp_path):
    """Without allow_code the file is not even read: one error naming the flag."""
    write(tmp_path, "mine.py", "raise SystemExit('must not run')\n")
    with pytest.raises(LorafitError, match="runs Python code") as caught:
        build([{"function": "mine.py:score"}], tmp_path)
    assert rewards.ALLOW_CODE_FLAG in str(caught.value) and caught.value.where == "rewards[0].function"


def test_custom_reward_loads_relative_to_recipe_and_leaves_no_trace(tmp_path):
    """Loaded from the recipe's folder; columns by name or **kwargs; sys.path and sys.modules unchanged."""
    import sys

    write(tmp_path, "mine.py", """
        def by_column(completions, answer):
            return [float(c == a) for c, a in zip(completions, answer)]

        def by_kwargs(completions, **kwargs):
            return [len(kwargs["prompts"][i]) for i in range(len(completions))]
    """)
    path_before, modules_before = list(sys.path), set(sys.modules)
    built = build([{"function": "mine.py:by_column"}, {"function": "mine.py:by_kwargs", "label": "prompt_len"}],
                  tmp_path, allow_code=True)
    assert sys.path == path_before and set(sys.modules) == modules_before
    kwargs = {"prompts": ["ab", "abc"], "completions": ["x", "y"], "completion_ids": [[1], [2]],
              "answer": ["x", "z"], "trainer_state": None}
    assert built.functions[0](**kwargs) == [1.0, 0.0]
    assert built.functions[1](**kwargs) == [2.0, 3.0]
    assert built.names == ["by_column", "prompt_len"]
    assert rewards.custom_reward_columns(built.functions[0].user_function) == ("answer",)


@pytest.mark.parametrize("source, message", [
    ("def score(texts):\n    return [0.0]\n", "must take `completions`"),
    ("def score(completions, /, **kw):\n    return [0.0]\n", "positional-only"),
    ("async def score(completions, **kw):\n    return [0.0]\n", "async"),
    ("def other(completions):\n    return [0.0]\n", "no function score"),
    ("import not_a_module_anywhere\n", "importing mine.py failed"),
])
def test_custom_reward_signature_checked_up_front(tmp_path, source, message):
    """A function TRL could not call (or a file that will not import) fails at build time, not mid-run."""
    write(tmp_path, "mine.py", source)
    with pytest.raises(LorafitError, match=message):
        build([{"function": "mine.py:score"}], tmp_path, allow_code=True)


def test_custom_reward_missing_file(tmp_path):
    """A function path that points at no file is named."""
    with pytest.raises(LorafitError, match="does not exist"):
        build([{"function": "nowhere.py:score"}], tmp_path, allow_code=True)


def test_custom_reward_exception_names_the_row_with_the_users_traceback(tmp_path):
    """The failing row (completion position, prompt, completion) and the user's frames, not lorafit's."""
    write(tmp_path, "mine.py", """
        def helper(text):
            return 1 / len(text)

        def score(completions, **kwargs):
            return [helper(c) for c in completions]
    """)
    reward = build([{"function": "mine.py:score"}], tmp_path, allow_code=True).functions[0]
    with pytest.raises(RunFailed) as caught:
        reward(prompts=["p0", "p1", "p2"], completions=["ok", "", "ok"], completion_ids=[[1], [], [1]])
    text = str(caught.value)
    assert "reward score raised ZeroDivisionError on completion 1" in text
    assert "'p1'" in text and "mine.py" in text and "in helper" in text and "1 / len(text)" in text
    assert "rewards.py" not in text  # lorafit's wrapper frames are cut off


@pytest.mark.parametrize("returned, message", [
    ("[1.0]", "returned 1 scores for 2 completions"),
    ("[1.0, 'high']", "returned 'high' \\(str\\) for completion 1, not a number"),
    ("[1.0, None]", "returned None \\(NoneType\\) for completion 1"),
    ("[1.0, float('nan')]", "returned nan for completion 1"),
    ("7", "returned int, not a list"),
])
def test_custom_reward_wrong_returns_name_the_reward(tmp_path, returned, message):
    """Wrong count, a non-number, None, NaN, a scalar: each a clear error naming the reward."""
    write(tmp_path, "mine.py", f"def score(completions, **kwargs):\n    return {returned}\n")
    reward = build([{"function": "mine.py:score", "label": "mine"}], tmp_path, allow_code=True).functions[0]
    with pytest.raises(RunFailed, match=f"reward mine {message}"):
        reward(completions=["a", "b"])


def test_checked_scores_accept_bools_and_numpy_like_numbers():
    """bool and other numbers.Real values are accepted as floats; a tuple or generator is fine too."""
    assert rewards.check_scores("r", (True, 0, 2.5), 3) == [1.0, 0.0, 2.5]
    assert rewards.check_scores("r", (x for x in [1, 2]), 2) == [1.0, 2.0]
    assert all(isinstance(v, float) and math.isfinite(v) for v in rewards.check_scores("r", [1, 2], 2))
