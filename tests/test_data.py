"""Data normalisation, templates and loss masking: exactly the completion (and end-of-turn) is trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorafit.data import prepare_data
from lorafit.errors import LorafitError
from lorafit.recipe import validate_recipe
from lorafit.templates import apply_template, encode_messages


@pytest.fixture
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])


def test_completion_masking_trains_exactly_the_answer_and_end_of_turn(make_recipe, tokenizer):
    apply_template(validate_recipe(make_recipe("unused", "x")).template, tokenizer)
    messages = [{"role": "user", "content": "Color: red"}, {"role": "assistant", "content": "apple"}]
    encoded = encode_messages(tokenizer, messages, train_on="completions")
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert encoded.labels[:n_prompt] == [-100] * n_prompt  # every prompt token masked
    assert all(label != -100 for label in encoded.labels[n_prompt:])  # every completion token trained
    assert trained_text(tokenizer, encoded.input_ids, encoded.labels) == "apple<|im_end|>\n"
    assert tokenizer.eos_token_id in encoded.labels


def test_every_assistant_turn_of_a_multi_turn_chat_is_trained(make_recipe, tokenizer):
    apply_template(validate_recipe(make_recipe("unused", "x")).template, tokenizer)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red"},
                {"role": "assistant", "content": "apple"}, {"role": "user", "content": "blue"},
                {"role": "assistant", "content": "sky"}]
    encoded = encode_messages(tokenizer, messages, train_on="completions")
    assert trained_text(tokenizer, encoded.input_ids, encoded.labels) == "apple<|im_end|>\nsky<|im_end|>\n"


def test_train_on_all_trains_every_token(make_recipe, tokenizer):
    apply_template(validate_recipe(make_recipe("unused", "x")).template, tokenizer)
    messages = [{"role": "user", "content": "red"}, {"role": "assistant", "content": "apple"}]
    encoded = encode_messages(tokenizer, messages, train_on="all")
    assert encoded.labels == encoded.input_ids


@pytest.mark.parametrize("fmt", ["messages", "alpaca", "prompt-completion"])
def test_every_format_is_detected_and_trains_only_the_answer(make_recipe, tokenizer, toy_data_factory, fmt):
    prepared = prepare_data(validate_recipe(make_recipe("unused", toy_data_factory(fmt, n=12))), tokenizer)
    report = prepared.report
    assert report.format == fmt and report.train_examples == 12 and not report.dropped
    assert report.eos_trained
    row = prepared.train[0]
    answer = trained_text(tokenizer, row["input_ids"], row["labels"])
    assert answer.strip().removesuffix("<|im_end|>").strip() in {"apple", "sky", "grass", "banana", "snow", "night"}


def test_text_format_trains_everything_and_appends_eos(make_recipe, tokenizer, toy_data_factory):
    prepared = prepare_data(validate_recipe(make_recipe("unused", toy_data_factory("text", n=4))), tokenizer)
    row = prepared.train[0]
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tokenizer.eos_token_id


def test_alpaca_template_ends_responses_with_eos(make_recipe, tokenizer, toy_data_factory):
    recipe = validate_recipe(make_recipe("unused", toy_data_factory("alpaca", n=4), template={"name": "alpaca"}))
    prepared = prepare_data(recipe, tokenizer)
    row = prepared.train[0]
    assert trained_text(tokenizer, row["input_ids"], row["labels"]).endswith(tokenizer.eos_token + "\n\n")
    assert "### Instruction:" in tokenizer.decode(row["input_ids"])


def test_tokenizer_without_template_falls_back_to_chatml(make_recipe, tiny_model_factory, toy_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory("llama", with_chat_template=False))
    prepared = prepare_data(validate_recipe(make_recipe("unused", toy_data)), tokenizer)
    assert prepared.report.template == "chatml" and prepared.report.eos_trained


def test_field_mapping_for_other_column_names(make_recipe, tokenizer, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "apple"}) for i in range(3)))
    fields = {"prompt": "question", "completion": "answer"}
    prepared = prepare_data(validate_recipe(make_recipe("unused", path, data={"fields": fields})), tokenizer)
    assert prepared.report.format == "prompt-completion" and prepared.report.train_examples == 3


def test_held_out_fraction_and_eval_file(make_recipe, tokenizer, toy_data_factory):
    train = toy_data_factory(n=20)
    prepared = prepare_data(validate_recipe(make_recipe("unused", train, data={"eval": 0.25})), tokenizer)
    assert (prepared.report.train_examples, prepared.report.eval_examples) == (15, 5)
    held_out = toy_data_factory(n=6, seed=1)
    prepared = prepare_data(validate_recipe(make_recipe("unused", train, data={"eval": str(held_out)})), tokenizer)
    assert (prepared.report.train_examples, prepared.report.eval_examples) == (20, 6)


def test_rows_without_completion_after_truncation_are_dropped_and_counted(make_recipe, tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "word " * 200, "completion": "apple"}, {"prompt": "red", "completion": "apple"},
            {"prompt": "red", "completion": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    prepared = prepare_data(validate_recipe(make_recipe("unused", path, data={"max_length": 32})), tokenizer)
    assert prepared.report.train_examples == 1
    assert prepared.report.dropped == {"no completion tokens left after truncation to data.max_length": 1,
                                       "empty or malformed prompt-completion row": 1}
    assert all("dropped 1 row" in w for w in prepared.report.warnings())


def test_no_trainable_rows_aborts_with_the_reasons(make_recipe, tokenizer, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 200, "completion": "apple"}))
    with pytest.raises(LorafitError, match="no trainable rows remain .*1 no completion tokens left after truncation"):
        prepare_data(validate_recipe(make_recipe("unused", path, data={"max_length": 16})), tokenizer)


@pytest.mark.parametrize(
    ("content", "expected"),
    [("{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\",\n", "bad.jsonl:2: malformed JSON line"),
     ("", "the data file is empty"),
     ("[1, 2]\n", "bad.jsonl:1: expected a JSON object")],
)
def test_bad_data_files_report_file_and_line(make_recipe, tokenizer, tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(LorafitError, match=expected.replace("[", r"\[")):
        prepare_data(validate_recipe(make_recipe("unused", path)), tokenizer)


def test_missing_data_file_and_unknown_columns(make_recipe, tokenizer, tmp_path):
    with pytest.raises(LorafitError, match="data file not found"):
        prepare_data(validate_recipe(make_recipe("unused", tmp_path / "nope.jsonl")), tokenizer)
    path = tmp_path / "cols.jsonl"
    path.write_text(json.dumps({"q": 1, "a": 2}))
    with pytest.raises(LorafitError, match="cannot tell the data format from columns a, q"):
        prepare_data(validate_recipe(make_recipe("unused", path)), tokenizer)
    with pytest.raises(LorafitError, match="format alpaca needs column"):
        prepare_data(validate_recipe(make_recipe("unused", path, data={"format": "alpaca"})), tokenizer)


def test_pad_equal_to_eos_still_trains_eos(make_recipe, tiny_model_factory, toy_data):
    folder: Path = tiny_model_factory("llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token  # the common "pad = eos" setup
    prepared = prepare_data(validate_recipe(make_recipe("unused", toy_data)), tokenizer)
    assert prepared.report.eos_trained
    assert tokenizer.eos_token_id in prepared.train[0]["labels"]
