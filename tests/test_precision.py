"""precision: auto picks what the CPU runs natively; bf16 asked for on a CPU that only emulates it is warned about.

TRL's own default (bf16=True) is ~20x slower than fp32 on an AVX2-only CPU (docs/performance.md), so this is
a speed guarantee as much as a numerics one.
"""

from __future__ import annotations

import pytest
from rich.console import Console

from lorafit import models
from lorafit.errors import LorafitError
from lorafit.recipe import validate_recipe


@pytest.fixture
def cpu(monkeypatch):
    """A CPU-only machine (also when the tests run on one with a GPU); `native(True/False)` sets its bf16 support."""
    monkeypatch.setattr(models, "detect_device", lambda: "cpu")

    def native(value: bool) -> None:
        monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: value)

    return native


def test_auto_picks_fp32_on_a_cpu_without_native_bf16(cpu):
    """precision: auto on a CPU without native bf16 picks fp32, saying why."""
    cpu(False)
    precision, warning = models.choose_precision("auto")
    assert (precision.name, precision.device, warning) == ("fp32", "cpu", None)
    assert "no native bf16" in precision.reason


def test_auto_picks_bf16_on_a_cpu_with_native_bf16(cpu):
    """precision: auto on a CPU with native bf16 picks bf16."""
    cpu(True)
    precision, warning = models.choose_precision("auto")
    assert (precision.name, warning) == ("bf16", None)


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns(cpu):
    """bf16 asked for on a CPU that only emulates it is honoured with a warning naming the cost."""
    cpu(False)
    precision, warning = models.choose_precision("bf16")
    assert precision.name == "bf16"  # honoured, but the user is told what it costs
    assert warning and "emulated" in warning and "precision: auto" in warning
    cpu(True)
    assert models.choose_precision("bf16") == (models.Precision("bf16", "cpu", "set in the recipe"), None)


def test_fp16_on_a_cpu_is_refused(cpu):
    """fp16 on a CPU is refused naming training.precision."""
    cpu(False)
    with pytest.raises(LorafitError, match="training.precision: fp16"):
        models.choose_precision("fp16")


@pytest.mark.parametrize(("native", "requested", "expected", "warned"), [
    (False, "auto", "fp32", False), (True, "auto", "bf16", False), (False, "bf16", "bf16", True),
])
def test_train_reports_the_choice_and_the_warning(make_recipe, cpu, tiny_llama, toy_data, tmp_path, native, requested,
                                                  expected, warned):
    """train (dry run) reports the precision it chose and, for emulated bf16, the warning."""
    from lorafit.train import run_train

    cpu(native)
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", training={"precision": requested}))
    result = run_train(recipe, Console(quiet=True), dry_run=True)
    assert result.precision.name == expected
    assert any(note.startswith(f"precision {expected} on cpu") for note in result.notes)
    assert any("emulated" in note and note.startswith("warning:") for note in result.notes) == warned


def test_auto_picks_fp16_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    """T4 / V100 (compute capability 7.x): torch's default check counts emulated bf16, lorafit's must not."""
    import torch

    asked = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return including_emulation  # what torch answers on a pre-Ampere card

    monkeypatch.setattr(models, "detect_device", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    precision, warning = models.choose_precision("auto")
    assert (precision.name, precision.device, warning) == ("fp16", "cuda", None) and asked == [False]
    with pytest.raises(LorafitError, match="training.precision: bf16"):
        models.choose_precision("bf16")
