"""Shared pytest fixtures: tiny offline models and toy datasets (see tests/tiny_models.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
