"""Property: whatever YAML a user writes and whatever --set they pass, the recipe loader either returns a valid
Recipe or raises LorafitError (one clear message) - never another exception, never a traceback."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lorafit.errors import LorafitError
from lorafit.recipe import SECTIONS, Recipe, dump_recipe, load_recipe

# No example database: nothing is written into the repository; a failure prints the example to reproduce it.
# LORAFIT_FUZZ_EXAMPLES=5000 digs deeper than the default run.
FUZZ = settings(max_examples=int(os.environ.get("LORAFIT_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                print_blob=True, suppress_health_check=[HealthCheck.too_slow])
VALID = {"name": "fuzz", "model": {"path": "smollm2-135m-instruct"}, "data": {"train": "train.jsonl"}}

# Strings that look like the paths recipes hold get resolved against the recipe's folder: fuzz those too.
paths = st.builds(lambda prefix, stem, suffix: prefix + stem + suffix, st.sampled_from(["", "./", "../", "/", "~/"]),
                  st.text(max_size=12), st.sampled_from(["", ".jsonl", ".yaml", ".jinja", "/"]))
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30) | paths)
FIELD_NAMES = ["extends", *(name for model in SECTIONS.values() for name in model.model_fields)]
keys = st.text(max_size=15) | st.sampled_from(FIELD_NAMES)
values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(keys, children, max_size=4), max_leaves=12)
# Hand-written YAML that plain dumping never produces: tags, anchors, merge keys, complex keys, several documents.
TRICKY = [
    "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary aGVsbG8=", "!!set {a, b}",
    "!!omap [a: 1]", "2024-01-01", "2024-01-01T00:00:00Z", "&a [*a]", "{<<: {r: 1}}", "? [a, b]\n: 1", "? {a: 1}\n: 2",
    "a: 1\n---\nb: 2", "---\n...", "*undefined", "!custom 1", "{a: 1, a: 2}", "[", "'", "\t", "\x00", "\ufeffname: x",
    ".nan", "-.inf", "0x1F", "0o17", "1e400", "~", "[[[[[[[[[[]]]]]]]]]]", "key: |\n  text\n", "- - - -",
]
tricky_yaml = st.sampled_from(TRICKY)
FIELDS = [("", "extends"), *((section, name) for section, model in SECTIONS.items() for name in model.model_fields)]
value_texts = values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)) | tricky_yaml


def load_text(text: str, overrides: list[str] = ()) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        check(path, overrides)


def check(path: Path, overrides: list[str]) -> None:
    try:
        recipe = load_recipe(path, overrides)
    except LorafitError as exc:
        assert str(exc).strip(), "an error must say something"
        return
    assert isinstance(recipe, Recipe)
    # What a run does first with a valid recipe must work too: resolve its folder, write it down.
    recipe.run_dir.expanduser().resolve()
    assert yaml.safe_load(dump_recipe(recipe))["name"] == recipe.name


@FUZZ
@given(st.text(max_size=200))
def test_any_text_is_a_recipe_or_a_lorafit_error(text):
    load_text(text)


@FUZZ
@given(values)
def test_any_yaml_document_is_a_recipe_or_a_lorafit_error(document):
    load_text(yaml.safe_dump(document, allow_unicode=True))


@FUZZ
@given(st.sampled_from(FIELDS) | st.tuples(st.sampled_from(sorted(SECTIONS)), keys), value_texts)
def test_any_value_in_any_field_is_a_recipe_or_a_lorafit_error(field, text):
    section, key = field
    raw = yaml.safe_dump(VALID, sort_keys=False)
    indented = text.rstrip("\n").replace("\n", "\n    ")
    if section:
        raw += f"{section}:\n  {yaml.safe_dump(key).splitlines()[0]}:\n    {indented}\n"
    else:
        raw += f"{yaml.safe_dump(key).splitlines()[0]}:\n  {indented}\n"
    load_text(raw)


@FUZZ
@given(value_texts)
@example('"\\0"')  # a NUL byte in a path
@example('"./a\\0b.yaml"')
@example('""')  # the recipe's own folder
@example("recipe.yaml")  # itself: a cycle
@example("[a]")
def test_any_extends_value_is_a_recipe_or_a_lorafit_error(text):
    # `extends:` opens another file, named by the user: paths that are not paths must fail cleanly too.
    load_text("extends:\n  " + text.rstrip("\n").replace("\n", "\n  ") + "\n" + yaml.safe_dump(VALID))


@FUZZ
@given(tricky_yaml, st.sampled_from(["", "name: x\n", "model:\n  path: m\n"]))
def test_unusual_yaml_constructs_are_a_recipe_or_a_lorafit_error(snippet, prefix):
    load_text(prefix + snippet)
    load_text(yaml.safe_dump(VALID) + "extra: " + snippet)


@FUZZ
@given(st.lists(st.text(max_size=40) | st.builds(
    lambda path, value: f"{path}={value}",
    st.lists(keys, min_size=1, max_size=3).map(".".join)
    | st.sampled_from([f"{s}.{f}" if s else f for s, m in SECTIONS.items() for f in m.model_fields]),
    st.text(max_size=20) | values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())), max_size=4))
def test_any_set_override_is_a_recipe_or_a_lorafit_error(overrides):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(yaml.safe_dump(VALID))
        check(path, overrides)

