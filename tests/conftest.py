"""Shared pytest fixtures: tiny offline models, toy datasets (see tests/tiny_models.py) and the one recipe factory."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prepared data goes to a throwaway cache, never the user's (subprocesses inherit it); tests that check the
# cache itself point LORAFIT_DATA_CACHE at their own tmp_path.
if "LORAFIT_DATA_CACHE" not in os.environ:
    import tempfile

    os.environ["LORAFIT_DATA_CACHE"] = tempfile.mkdtemp(prefix="lorafit-test-data-cache-")

# Make `import tiny_models` work regardless of pytest's import mode (prepend/importlib).
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from tiny_models import build_tiny_model, write_toy_dataset  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: slow test (real training / larger models); deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (+ ChatML tokenizer) folder, built once per test session. Treat as read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture
def tiny_model_factory(tmp_path: Path) -> Callable[..., Path]:
    """``make(arch="llama", **kwargs) -> Path``: build a tiny model into a fresh folder under tmp_path.

    kwargs go to :func:`tiny_models.build_tiny_model` (with_chat_template, seed, generation_markers,
    config overrides).
    """
    counter = {"n": 0}

    def make(arch: str = "llama", **kwargs) -> Path:
        counter["n"] += 1
        return build_tiny_model(tmp_path / f"{arch}_{counter['n']}", arch, **kwargs)

    return make


@pytest.fixture
def toy_data(tmp_path: Path) -> Path:
    """64-row colour->thing toy dataset in chat ``messages`` jsonl format."""
    return write_toy_dataset(tmp_path / "toy.jsonl", n=64, fmt="messages")


@pytest.fixture
def toy_data_factory(tmp_path: Path) -> Callable[..., Path]:
    """``make(fmt="messages", n=64, seed=0, name=None) -> Path``: toy jsonl in any supported format."""

    def make(fmt: str = "messages", n: int = 64, seed: int = 0, name: str | None = None) -> Path:
        return write_toy_dataset(tmp_path / (name or f"toy_{fmt}_{n}_{seed}.jsonl"), n=n, fmt=fmt, seed=seed)

    return make


def _recipe(model: Path | str, train: Path | str | list[dict[str, Any]], out: Path | str | None = None, /,
            *presets: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A raw recipe dict (JSON is YAML, so `json.dumps` of it is a recipe file). The paths are positional-only, so
    `model={...}` is a section like any other. `train` is a file, or a list of sources (`{"path": ..., "weight": ...}`)
    taken as it is.

    Without `out`: only name, model and data.train, the schema's defaults for the rest (for recipes that are
    validated or read, never trained). With `out`: a few quick steps on a tiny model (6 steps, a checkpoint every 2,
    r=8, no dropout, data.max_length 64, constant lr 1e-2, no trackers) writing into `out`.
    Then each preset, then `sections`, are applied in order: a dict updates that section's keys, anything else
    replaces the top-level value (e.g. task="sequence-classification").
    """
    raw: dict[str, Any] = {"name": "tiny", "model": {"path": str(model)},
                           "data": {"train": train if isinstance(train, list) else str(train)}}
    if out is not None:
        raw["adapter"] = {"r": 8, "dropout": 0.0}
        raw["data"]["max_length"] = 64
        raw["training"] = {"max_steps": 6, "batch_size": 4, "grad_accum": 1, "learning_rate": 1e-2,
                           "logging_steps": 1, "save_steps": 2, "warmup_ratio": 0.0, "scheduler": "constant"}
        raw["output"] = {"dir": str(out), "report_to": ["none"]}
    for layer in (*presets, sections):
        for key, value in layer.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture(scope="session")
def make_recipe() -> Callable[..., dict[str, Any]]:
    """``make(model, train, out=None, *presets, **sections) -> dict``: the one way tests build a recipe.

    See `_recipe` for the defaults; pass the dict to `lorafit.recipe.validate_recipe` for a Recipe object.
    """
    return _recipe


@pytest.fixture
def cli_in_this_process(monkeypatch):
    """The CLI turns library progress bars off through the environment before they are imported; in this process
    they already are, so do what it does directly (a bar on stderr is not an error line). What the CLI changes
    for the process (environment, library log levels) is put back afterwards, for the tests that follow.

    Test files that run the CLI in-process use it for every test: `pytestmark = pytest.mark.usefixtures(...)`."""
    import datasets
    from transformers.utils import logging as hf_logging

    for name in ("TRANSFORMERS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        original = os.environ.get(name)
        monkeypatch.setenv(name, original or "")  # recorded: monkeypatch puts the variable back as it was
        if original is None:
            monkeypatch.delenv(name)
    loggers = {name: logging.getLogger(name).level for name in ("transformers", "peft", "trl", "datasets",
                                                               "accelerate", "torch")}
    was_enabled = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    yield
    if was_enabled[0]:
        hf_logging.enable_progress_bar()
    if was_enabled[1]:
        datasets.enable_progress_bars()
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a base model is loaded: recipe and data errors must come before that."""
    from lorafit import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error was found")

    monkeypatch.setattr(models, "load_base_model", refuse)
