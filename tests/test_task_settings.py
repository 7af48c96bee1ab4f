"""Every data, template and training key against every task: each combination either provably takes effect or is
refused with a message naming the key (issue 27, classes 1-3); the same special-token lint for every task's rows;
rows lost to a held-out fraction or an eval file named by where they came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafit import data, models, tasks, train
from lorafit.errors import LorafitError
from lorafit.recipe import Recipe, validate_recipe
from lorafit.training_loop import NonFiniteGuard

LONG = " ".join(["word"] * 80)
REWARDS = [{"name": "exact_match", "column": "answer"}]


def _rows(name: str, n: int = 8) -> list[dict]:
    """Rows in the columns the task reads; row 2 is long (max_length probes cut or drop it)."""
    long = lambda i: LONG if i == 2 else f"thing {i}"  # noqa: E731
    task = tasks.TASKS[name]
    if task.classifier:
        return [{"text": f"review {long(i)}", "label": ["neg", "pos"][i % 2]} for i in range(n)]
    if "preference" in task.sections:
        return [{"prompt": f"colour {i}?", "chosen": f"red {long(i)}", "rejected": f"blue {i}"} for i in range(n)]
    if "rewards" in task.sections:
        return [{"prompt": f"colour {long(i)}?", "answer": f"red {i}"} for i in range(n)]
    # A text column too, which auto-detection passes over for the messages (data.format: text reads it).
    return [{"messages": [{"role": "user", "content": f"colour {i}?"},
                          {"role": "assistant", "content": f"red {long(i)}"}], "text": f"colour {i} is red"}
            for i in range(n)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _raw(make_recipe, model: Path, tmp_path: Path, name: str, *layers: dict) -> dict:
    """The task's base recipe (a quarter held out for eval), then each layer's sections merged in."""
    train_file = _write(tmp_path / f"{name}.jsonl", _rows(name))
    extra = {"rewards": REWARDS, "generation": {"max_completion_length": 16, "num_generations": 4}} if (
        "rewards" in tasks.TASKS[name].sections) else {}
    classes = {"labels": ["neg", "pos"]} if tasks.TASKS[name].classifier else {}
    raw = make_recipe(model, train_file, task=name, data={"eval": 0.25, **classes}, output={"report_to": ["none"]},
                      **extra)
    for layer in layers:
        for section, value in layer.items():
            raw[section] = {**raw.get(section, {}), **value} if isinstance(value, dict) else value
    return raw


def _observed(recipe: Recipe, tokenizer) -> str:
    """What a recipe changes: the prepared rows, the data report, the trainer's arguments and its own options."""
    prepared = tasks.task_of(recipe).prepare_data(recipe, tokenizer, allow_code=False)
    rows = list(prepared.train) if hasattr(prepared.train, "__len__") else ["stream", *prepared.train.take(4)]
    report = {k: v for k, v in prepared.report.to_json().items()
              if k not in ("prepare_seconds", "cache", "cache_path", "fingerprint")}
    precision, _ = models.choose_precision(recipe.training.precision)
    args = train._training_arguments(recipe, prepared, precision).to_dict()
    args.pop("output_dir", None)
    from lorafit import adapters

    checkpointing = adapters.gradient_checkpointing_on(recipe, on_gpu=False, quantized=False)
    # The processes lorafit's own maps would tokenize a large data set in (tiny data is prepared in one by design).
    processes = data.num_proc(recipe.data, 10**6)
    return json.dumps([rows, list(prepared.eval or []), report, args, checkpointing, processes], default=str,
                      sort_keys=True)


def _custom_template() -> str:
    return ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


# key -> (the setting as recipe sections, the tasks that refuse it). Every other task must show its effect.
PREFERENCE = ("dpo", "kto", "orpo")
RL = ("grpo", "rloo")
CLS = "sequence-classification"
SETTINGS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "data.eval": ({"data": {"eval": 0.5}}, ()),
    "data.max_length": ({"data": {"max_length": 40}}, ()),
    "data.packing": ({"data": {"packing": True}}, (CLS, *PREFERENCE, *RL)),
    "data.group_by_length": ({"data": {"group_by_length": True}}, ("kto", *RL)),
    "data.num_proc": ({"data": {"num_proc": 3}}, ("orpo", *RL)),
    "data.format": ({"data": {"format": "text"}}, (CLS, *PREFERENCE, *RL)),
    "data.streaming": ({"data": {"streaming": True, "eval": None}, "training": {"max_steps": 2}},
                       (CLS, *PREFERENCE, *RL)),
    "data.labels": ({"data": {"labels": ["pos", "neg"]}}, ("causal-lm", *PREFERENCE, *RL)),
    "data.split": ({"data": {"split": "validation"}}, tuple(tasks.TASKS)),  # local files have no splits
    "template.name": ({"template": {"name": "alpaca"}}, (CLS,)),
    "template.custom": ({"template": {"name": "custom", "custom": _custom_template()}}, (CLS,)),
    "template.system_prompt": ({"template": {"system_prompt": "Answer briefly."}}, (CLS,)),
    "template.train_on": ({"template": {"train_on": "all"}}, (CLS, *PREFERENCE, *RL)),
    "training.epochs": ({"training": {"epochs": 2}}, ()),
    "training.max_steps": ({"training": {"max_steps": 3}}, ()),
    "training.batch_size": ({"training": {"batch_size": 8}}, ()),
    "training.grad_accum": ({"training": {"grad_accum": 2}}, ()),
    "training.learning_rate": ({"training": {"learning_rate": 1e-3}}, ()),
    "training.scheduler": ({"training": {"scheduler": "linear"}}, ()),
    "training.warmup_ratio": ({"training": {"warmup_ratio": 0.1}}, ()),
    "training.weight_decay": ({"training": {"weight_decay": 0.01}}, ()),
    "training.max_grad_norm": ({"training": {"max_grad_norm": 0.5}}, ()),
    "training.optimizer": ({"training": {"optimizer": "sgd"}}, ()),
    "training.gradient_checkpointing": ({"training": {"gradient_checkpointing": True}}, ()),
    "training.seed": ({"training": {"seed": 7}}, ()),
    "training.logging_steps": ({"training": {"logging_steps": 3}}, ()),
    "training.eval_steps": ({"training": {"eval_steps": 5}}, ()),
    "training.save_steps": ({"training": {"save_steps": 7}}, ()),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _refusal(raw: dict, tokenizer) -> str | None:
    """The refusal's text when the recipe is refused (by the schema or before any row is prepared), else None."""
    try:
        recipe = Recipe.model_validate(raw)
        data.check_sources(recipe)
    except (ValueError, LorafitError) as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def matrix_folder(tmp_path_factory) -> Path:
    """One folder for the matrix's data files, so every setting of a task reads the very same file."""
    return tmp_path_factory.mktemp("settings")


_BASE: dict[str, str] = {}  # task -> what its base recipe prepares and sets (computed once)


@pytest.mark.parametrize("key", list(SETTINGS))
@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_setting_takes_effect_or_is_refused_by_name_for_every_task(make_recipe, tiny_llama, matrix_folder,
                                                                         tokenizer, name, key):
    """The task x key matrix: a refusing task names the key; every other task prepares different rows, a different
    report or different trainer arguments than without the setting (so it cannot have been ignored)."""
    setting, refused_by = SETTINGS[key]
    raw = _raw(make_recipe, tiny_llama, matrix_folder, name, setting)
    refusal = _refusal(raw, tokenizer)
    if name in refused_by:
        assert refusal is not None and key in refusal, refusal
        return
    assert refusal is None, refusal
    if name not in _BASE:
        _BASE[name] = _observed(Recipe.model_validate(_raw(make_recipe, tiny_llama, matrix_folder, name)), tokenizer)
    assert _observed(Recipe.model_validate(raw), tokenizer) != _BASE[name]


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_data_fields_map_the_columns_for_every_task(make_recipe, tiny_llama, tmp_path, tokenizer, name):
    """data.fields takes effect under every task: renamed columns are read through the mapping (and not without it);
    a mapping for a column the task never reads is refused by name."""
    renamed = [{f"my_{key}": value for key, value in row.items()} for row in _rows(name)]
    file = _write(tmp_path / "renamed.jsonl", renamed)
    fields = {key: f"my_{key}" for key in _rows(name)[0]}
    mapped = Recipe.model_validate(_raw(make_recipe, tiny_llama, tmp_path, name, {"data": {"train": str(file),
                                                                                           "fields": fields}}))
    prepared = tasks.task_of(mapped).prepare_data(mapped, tokenizer)
    assert len(prepared.train) > 0
    unmapped = Recipe.model_validate(_raw(make_recipe, tiny_llama, tmp_path, name, {"data": {"train": str(file)}}))
    with pytest.raises(LorafitError):
        tasks.task_of(unmapped).prepare_data(unmapped, tokenizer)
    if "rewards" not in tasks.TASKS[name].sections:  # grpo rows keep any column (the rewards may read it)
        typo = _raw(make_recipe, tiny_llama, tmp_path, name, {"data": {"fields": {"promt": "question"}}})
        assert "data.fields: promt" in (_refusal(typo, tokenizer) or "")


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_data_cache_false_writes_nothing_to_the_cache_for_every_task(make_recipe, tiny_llama, tmp_path, tokenizer,
                                                                     monkeypatch, name):
    """data.cache takes effect under every task: on, the prepared (or raw Arrow) data lands in the cache folder; off,
    nothing does."""
    for cache in (True, False):
        folder = tmp_path / f"cache-{cache}"
        monkeypatch.setenv("LORAFIT_DATA_CACHE", str(folder))
        recipe = Recipe.model_validate(_raw(make_recipe, tiny_llama, tmp_path, name, {"data": {"cache": cache}}))
        tasks.task_of(recipe).prepare_data(recipe, tokenizer)
        written = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
        assert bool(written) == cache, written


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_task_trainer_honours_max_nonfinite_steps_and_save_total_limit(make_recipe, tiny_llama, tmp_path, name):
    """training.max_nonfinite_steps and save_total_limit are read by lorafit's loop for every task: each task's
    trainer has the NaN guard, and no task's own options replace the checkpoint rotation."""
    recipe = Recipe.model_validate(_raw(make_recipe, tiny_llama, tmp_path, name))
    _args, trainer_class, options = tasks.task_of(recipe).trainer_classes(recipe)
    assert issubclass(trainer_class, NonFiniteGuard)
    assert "save_total_limit" not in options and "save_strategy" not in options


def test_eval_steps_without_eval_data_is_refused(make_recipe, tiny_llama, toy_data):
    """training.eval_steps with no data.eval evaluated nothing, silently: refused, naming both keys."""
    raw = make_recipe(tiny_llama, toy_data, training={"eval_steps": 5})
    with pytest.raises(ValueError, match="training.eval_steps: evaluates the data.eval rows"):
        Recipe.model_validate(raw)


# ----------------------------------------------------------------------------------------------------
# Class 2: the SFT lint's special-token check for every task's rows


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_special_token_text_in_any_tasks_rows_is_dropped_and_named(make_recipe, tiny_llama, tmp_path, tokenizer, name):
    """A literal end-of-turn marker inside an answer (chosen / rejected / completion / the grpo answer) or a prompt is
    dropped and named with its row, as the SFT lint does, never trained as a real end of turn."""
    if tasks.TASKS[name].classifier:
        pytest.skip("a classifier reads its text as it is, without a template: no turn can end")
    rows = _rows(name)
    marker = "<|im_end|>"
    assert marker in data.special_texts(tokenizer)
    row = rows[4]
    column = next(c for c in ("chosen", "answer", "messages") if c in row)
    row[column] = (f"red{marker} and more" if column != "messages" else
                   [row[column][0], {"role": "assistant", "content": f"red{marker} and more"}])
    file = _write(tmp_path / "marked.jsonl", rows)
    recipe = validate_recipe(_raw(make_recipe, tiny_llama, tmp_path, name, {"data": {"train": str(file),
                                                                                     "eval": None}}))
    prepared = tasks.task_of(recipe).prepare_data(recipe, tokenizer)
    reasons = [reason for reason in prepared.report.dropped if marker in reason]
    assert len(reasons) == 1 and "row(s) 5" in reasons[0] and "special token text" in reasons[0]
    assert len(prepared.train) == (14 if getattr(tasks.TASKS[name], "judged_rows", False) else 7)


# ----------------------------------------------------------------------------------------------------
# Class 3: rows lost to data.eval named by where they came from; eval asked for and none left: refused


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_an_eval_file_whose_rows_are_all_dropped_is_refused_naming_the_file(make_recipe, tiny_llama, tmp_path,
                                                                           tokenizer, name):
    """Every row of the eval file dropped (here: emptied): the run is refused naming the eval file and the reason,
    never '0 eval examples' and training without the eval it asked for."""
    broken = [{key: "" if isinstance(value, str) and key != "label" else value for key, value in row.items()}
              for row in _rows(name, 3)]
    for row in broken:
        if "messages" in row:
            row["messages"] = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    eval_file = _write(tmp_path / "bad-eval.jsonl", broken)
    recipe = validate_recipe(_raw(make_recipe, tiny_llama, tmp_path, name, {"data": {"eval": str(eval_file)}}))
    with pytest.raises(LorafitError) as caught:
        tasks.task_of(recipe).prepare_data(recipe, tokenizer)
    assert caught.value.where == f"data.eval: {eval_file}"
    assert "no eval rows remain: all 3 row(s) of the eval file were dropped (3 " in caught.value.message


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_a_held_out_fraction_that_takes_every_row_says_so(make_recipe, tiny_llama, tmp_path, tokenizer, name):
    """data.eval 0.99 of 8 rows holds out all of them: the error names data.eval and the fraction, not 'the file has
    no rows'."""
    recipe = validate_recipe(_raw(make_recipe, tiny_llama, tmp_path, name, {"data": {"eval": 0.99}}))
    with pytest.raises(LorafitError) as caught:
        tasks.task_of(recipe).prepare_data(recipe, tokenizer)
    assert caught.value.where == "data.eval"
    assert "a held-out fraction of 0.99 takes all 8 row(s) of data.train" in caught.value.message


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_held_out_rows_all_dropped_is_refused_naming_the_split(make_recipe, tiny_llama, tmp_path, tokenizer, name):
    """A held-out share whose every row is dropped (one row, too few to hold any out) is refused naming the share."""
    file = _write(tmp_path / "one.jsonl", _rows(name, 1))
    recipe = validate_recipe(_raw(make_recipe, tiny_llama, tmp_path, name, {"data": {"train": str(file)}}))
    with pytest.raises(LorafitError) as caught:
        tasks.task_of(recipe).prepare_data(recipe, tokenizer)
    assert caught.value.where == "data.eval: 0.25 held out of data.train"
    assert "no eval rows remain" in caught.value.message
