"""The docs cannot drift: every recipe README.md and docs/*.md show passes `lorafit validate`, and every relative link
in them reaches a file (and heading) that exists."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafit.recipe import load_recipe, read_yaml_file
from lorafit.train import check_settings

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCED = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```", re.M | re.S)
_LOCAL_DATA = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def _fenced_blocks(language: str):
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in _FENCED.finditer(text):
            if match.group(2) == language:
                line = text.count("\n", 0, match.start()) + 1
                yield pytest.param(textwrap.dedent(match.group(3)), id=f"{doc.relative_to(REPO)}:{line}")


def _as_shipped_or_toy(value: Any, toy: Path) -> Any:
    """A local data file the doc names: the shipped one when the doc's example sits beside configs/ (its
    data/reverse_prefs/...), else the toy data set. Hub ids and held-out fractions stay as written."""
    if not isinstance(value, str) or not value.lower().endswith(_LOCAL_DATA):
        return value
    shipped = CONFIGS / value
    return str(shipped) if shipped.is_file() else str(toy)


@pytest.mark.parametrize("block", _fenced_blocks("yaml"))
def test_every_yaml_block_in_the_docs_passes_lorafit_validate(block, tmp_path, toy_data, make_recipe):
    """Each ```yaml block of README.md and docs/*.md, read by the strict reader, loaded with `extends` and checked as
    `lorafit validate` checks it (load_recipe, then check_settings). A block with a top-level `name` is a whole
    recipe whose `extends` is a shipped recipe in configs/; one without is a fragment, laid over a minimal recipe
    (built-in model, toy data) through `extends`. Local data files the block names are the shipped ones where
    configs/ has them, else a toy file. A block that is not a recipe belongs in another fence (```json, ```text)."""
    shown = tmp_path / "shown.yaml"
    shown.write_text(block, encoding="utf-8")
    raw = read_yaml_file(shown)  # unsafe tags and duplicate keys fail here, as in a user's file
    if "name" in raw:
        if "extends" in raw:
            parent = CONFIGS / raw["extends"]
            assert parent.is_file(), f"extends: {raw['extends']} is not a shipped recipe in configs/"
            raw["extends"] = str(parent)
    else:
        base = tmp_path / "base.yaml"
        base.write_text(json.dumps(make_recipe("smollm2-135m-instruct", toy_data)), encoding="utf-8")
        raw = {"extends": str(base), **raw}
    data = raw.get("data") or {}
    for key in ("train", "eval"):
        if isinstance(data.get(key), list):
            data[key] = [{**item, "path": _as_shipped_or_toy(item["path"], toy_data)} if isinstance(item, dict)
                         else _as_shipped_or_toy(item, toy_data) for item in data[key]]
        elif key in data:
            data[key] = _as_shipped_or_toy(data[key], toy_data)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    check_settings(load_recipe(recipe_file))


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_in_the_docs_reaches_a_file_and_heading(doc):
    """Every relative link or image in README.md and docs/*.md (outside code blocks) names a file that exists,
    resolved from the page's own folder, and a `#anchor` names a heading of the page it points to."""
    text = _FENCED.sub("", doc.read_text(encoding="utf-8"))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", _FENCED.sub("", file.read_text(encoding="utf-8")), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{doc.relative_to(REPO)}: {broken}"
