"""What bad data gets: missing, empty, malformed or wrong-column files, rows that cannot teach anything,
and a tokenizer without a pad token. Each test's name and docstring say the case it covers.

The rule checked throughout: a non-zero exit code, one message naming the field, file or value and what to
do, no traceback (unless --debug), and nothing the user had is lost or changed.
"""

from __future__ import annotations

import json

import pytest
from cli_helpers import QUICK, QUIET, assert_one_line_error, cli, write_recipe

from lorafit import models
from lorafit.recipe import validate_recipe
from lorafit.train import run_train

pytestmark = pytest.mark.usefixtures("cli_in_this_process")


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "data file not found"),
     ("", "the data file is empty"),
     ('{"prompt": "a", "completion": "b"}\n{"prompt": \n', "bad.jsonl:2: malformed JSON line"),
     ('{"question": "a", "answer": "b"}\n', "cannot tell the data format from columns answer, question"),
     ('{"prompt": "' + "word " * 200 + '", "completion": "b"}\n', "no trainable rows remain (1 no completion tokens")],
)
def test_bad_data_is_reported_before_any_model_load_or_folder(make_recipe, tiny_llama, tmp_path, no_model_load, content,
                                                              expected):
    """Missing, empty, malformed or wrong-column data files are reported (file:line) before any model loads."""
    data = tmp_path / "bad.jsonl"
    if content is not None:
        data.write_text(content)
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, data, tmp_path / "run", QUICK))
    assert_one_line_error(*cli("train", str(recipe)), expected)
    assert not (tmp_path / "run").exists()


def test_dropped_rows_are_counted_and_training_goes_on(make_recipe, tiny_llama, tmp_path):
    """Rows that cannot teach anything are dropped and counted by reason; the rest still train."""
    data = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "red", "completion": "apple"}] * 4 + [{"prompt": "word " * 200, "completion": "x"},
                                                             {"prompt": "red", "completion": None}]
    data.write_text("\n".join(json.dumps(row) for row in rows))
    result = run_train(validate_recipe(make_recipe(tiny_llama, data, tmp_path / "run", QUICK)), QUIET, dry_run=True)
    assert result.report.train_examples == 4
    assert "data: dropped 1 row(s): no completion tokens left after truncation to data.max_length" in result.notes
    assert "data: dropped 1 row(s): empty or malformed prompt-completion row" in result.notes


def test_tokenizer_without_pad_token_still_trains_end_of_turn(make_recipe, tiny_model_factory, toy_data, tmp_path):
    """A tokenizer with no pad token (or pad == eos) still trains the end-of-turn token, so the model learns to stop."""
    from transformers import AutoTokenizer

    folder = tiny_model_factory("llama")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    recipe = validate_recipe(make_recipe(folder, toy_data, tmp_path / "run", QUICK))
    tokenizer = models.load_tokenizer(recipe, str(folder))
    assert tokenizer.pad_token == tokenizer.eos_token  # pad == eos ...
    from lorafit.data import prepare_data

    prepared = prepare_data(recipe, tokenizer)
    assert prepared.report.eos_trained  # ... and the end-of-turn is still a trained label
    assert all(tokenizer.eos_token_id in row["labels"] for row in prepared.train)
