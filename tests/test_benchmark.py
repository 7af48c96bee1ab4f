"""`lorafit eval --benchmark`: lm-evaluation-harness tasks on the base and each adapter, side by side.

The end-to-end tests run the shipped local task (configs/benchmarks/reverse_words.yaml) on a tiny model and need
the `bench` extra (in `dev`); without lm-eval installed they skip. The option checks and the statistics run always.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, cli
from lorafit import benchmark
from tiny_models import write_lora_run

REPO = Path(__file__).resolve().parents[1]
LOCAL_TASK = REPO / "configs" / "benchmarks" / "reverse_words.yaml"

pytestmark = pytest.mark.usefixtures("cli_in_this_process")


@pytest.fixture
def lora_run(tmp_path: Path, tiny_llama: Path) -> Path:
    """A run folder with a random (non-zero) LoRA adapter on the tiny model."""
    return write_lora_run(tmp_path / "run", tiny_llama).parent


def test_missing_extra_is_one_line_before_any_model_loads(lora_run, monkeypatch, no_model_load):
    """Without lm-eval installed, --benchmark fails with one line naming the extra, before a model loads."""
    monkeypatch.setattr(benchmark, "harness_installed", lambda: False)
    code, lines = cli("eval", str(lora_run / "recipe.yaml"), "--adapter", str(lora_run / "adapter"),
                      "--benchmark", "hellaswag")
    assert_one_line_error(code, lines, "--benchmark", "lorafit[bench]")


def test_limit_without_benchmark_is_refused(lora_run, no_model_load):
    """--limit applies to benchmarks only; alone it is one line pointing at --samples."""
    code, lines = cli("eval", str(lora_run / "recipe.yaml"), "--adapter", str(lora_run / "adapter"), "--limit", "5")
    assert_one_line_error(code, lines, "--limit", "--samples")


def test_missing_task_file_is_one_line(lora_run, tmp_path, no_model_load):
    """A task YAML path that does not exist is one line naming it, before a model loads."""
    pytest.importorskip("lm_eval")
    missing = tmp_path / "nope.yaml"
    code, lines = cli("eval", str(lora_run / "recipe.yaml"), "--adapter", str(lora_run / "adapter"),
                      "--benchmark", str(missing))
    assert_one_line_error(code, lines, str(missing), "not found")


def test_unknown_task_name_is_one_line(lora_run, no_model_load):
    """A task name the harness does not know is one line with close matches, before a model loads."""
    pytest.importorskip("lm_eval")
    code, lines = cli("eval", str(lora_run / "recipe.yaml"), "--adapter", str(lora_run / "adapter"),
                      "--benchmark", "hellaswagg")
    assert_one_line_error(code, lines, "unknown lm-eval task 'hellaswagg'", "hellaswag")


def test_local_task_reads_its_data_relative_to_the_yaml(tmp_path, monkeypatch):
    """A task YAML's data_files are resolved against the YAML's folder, so the task runs from any directory."""
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(tmp_path)
    plan = benchmark.check_benchmarks([str(LOCAL_TASK)], limit=4)
    files = plan.tasks[0]["dataset_kwargs"]["data_files"]["test"]
    assert Path(files) == REPO / "configs" / "data" / "reverse_words" / "eval.jsonl"
    assert not plan.needs_index  # local tasks only: the harness's ~15k task index is not built


def test_base_and_adapter_side_by_side_on_the_local_task(lora_run, tmp_path, monkeypatch):
    """The shipped local task runs on the base and the adapter (through the harness's peft= loading): report.json,
    --json and `lorafit runs` hold each model's accuracy, the adapter's difference and its standard error."""
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(tmp_path)  # the task's data path is relative to the YAML, not to here
    code, lines = cli("eval", str(lora_run / "recipe.yaml"), "--adapter", str(lora_run / "adapter"),
                      "--benchmark", str(LOCAL_TASK), "--limit", "6", "--samples", "2")
    assert code == 0, lines
    report = json.loads((lora_run / "eval" / "report.json").read_text())
    rows = {row["metric"]: row for row in report["benchmarks"]}
    assert set(rows) == {"acc", "acc_norm"}
    acc = rows["acc"]
    assert acc["task"] == "lorafit_reverse_words" and acc["documents"] == 6 and acc["higher_is_better"]
    base, adapter = acc["models"]
    assert base["name"] == "base" and base["difference"] is None
    assert adapter["name"] == "run"
    assert adapter["difference"] == pytest.approx(adapter["value"] - base["value"])
    assert adapter["difference_stderr"] is not None and adapter["difference_stderr"] >= 0

    from lorafit import run_folder
    from lorafit.runs import read_run

    run_folder.write_marker(lora_run, "run", status="finished")  # what `lorafit train` leaves: `runs` lists it
    info = read_run(lora_run)
    assert info.benchmarks == {"lorafit_reverse_words acc": adapter["difference"],
                               "lorafit_reverse_words acc_norm": rows["acc_norm"]["models"][1]["difference"]}
    assert info.benchmark_regressions == sum(row["models"][1]["regression"] for row in rows.values())


def _harness_result(values: list[float], metric: str = "acc") -> dict:
    """What simple_evaluate returns for one task, reduced to the keys lorafit reads."""
    n = len(values)
    mean = sum(values) / n
    stderr = (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5
    return {"results": {"t": {"alias": "t", f"{metric},none": mean, f"{metric}_stderr,none": stderr}},
            "higher_is_better": {"t": {metric: True}}, "n-samples": {"t": {"original": n, "effective": n}},
            "samples": {"t": [{"doc_id": i, "filter": "none", metric: v} for i, v in enumerate(values)]}}


def test_paired_difference_flags_a_drop_beyond_the_noise():
    """The difference's standard error is the paired one (same documents); a consistent drop is a regression, a
    difference within two standard errors is not."""
    base = [1.0] * 20
    worse = [1.0] * 10 + [0.0] * 10  # -0.5, paired stderr ~0.115: beyond the noise
    noisy = [0.0, 1.0] + [1.0] * 18  # -0.05, paired stderr 0.05: within it
    rows = benchmark.compare({"base": _harness_result(base), "worse": _harness_result(worse),
                              "noisy": _harness_result(noisy)})
    (row,) = rows
    _, worse_model, noisy_model = row.models
    assert worse_model.difference == pytest.approx(-0.5)
    assert worse_model.difference_stderr == pytest.approx((0.25 * 20 / 19) ** 0.5 / 20 ** 0.5)
    assert worse_model.regression and not noisy_model.regression
    assert benchmark.regressions(rows) == [
        "warning: worse is worse than the base on t acc: -0.500 (standard error 0.115, 20 documents)"]
