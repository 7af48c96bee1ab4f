"""What bad input and faults get: each test's name and docstring say the case it covers.

The rule checked throughout: a non-zero exit code, one message naming the field, file or value and what to
do, no traceback (unless --debug), and nothing the user had is lost or changed. Faults that cannot be caused
for real on a CPU test machine (out of memory, disk full, a crash mid-save) are simulated by patching
torch or our own progress callback inside the test only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console
from run_signals import signal_at_step
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorafit import checkpoints, models, run_folder
from lorafit.cli import app
from lorafit.errors import EXIT_INTERRUPTED, EXIT_RUN_FAILED, EXIT_USER_ERROR, Interrupted, LorafitError, RunFailed
from lorafit.progress import ProgressCallback
from lorafit.recipe import load_recipe, validate_recipe
from lorafit.train import run_train

QUIET = Console(quiet=True)
MINIMAL = "name: demo\nmodel:\n  path: smollm2-135m-instruct\ndata:\n  train: train.jsonl\n"


# A few quick steps on a tiny model (conftest's make_recipe): 6 steps, a checkpoint every 2, rank 4, 48 tokens.
QUICK = {"name": "rel", "adapter": {"r": 4}, "data": {"max_length": 48}}


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def cli(*args: str) -> tuple[int, list[str]]:
    """Run the CLI in-process; the exit code and the non-empty stderr lines."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_line_error(code: int, lines: list[str], *expected: str, exit_code: int = EXIT_USER_ERROR) -> str:
    assert code == exit_code, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def checkpoint_steps(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in checkpoints.complete_checkpoints(run / "checkpoints")]


def digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _cli_in_this_process(monkeypatch):
    """The CLI turns library progress bars off through the environment before they are imported; in this process
    they already are, so do what it does directly (a bar on stderr is not an error line). What the CLI changes
    for the process (environment, library log levels) is put back afterwards, for the tests that follow."""
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

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error was found")

    monkeypatch.setattr(models, "load_base_model", refuse)


def fail_at_step(monkeypatch, step: int, exc: BaseException) -> None:
    original = ProgressCallback.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            raise exc
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(ProgressCallback, "on_step_end", on_step_end)


def fail_saving(monkeypatch, checkpoint_name: str, exc: BaseException) -> None:
    """Make torch.save fail half-way through writing `checkpoint_name` (after its adapter weights are written)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if checkpoint_name in str(f):
            raise exc
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


# ----------------------------------------------------------------------------------------------------
# Recipes: checked before any model is loaded or folder created


def test_unsafe_yaml_tags_are_refused_and_never_executed(tmp_path):
    """A recipe with a !!python/object/apply tag: validate and train refuse it, and the command never runs."""
    marker = tmp_path / "pwned"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MINIMAL + f"output:\n  dir: !!python/object/apply:os.system ['touch {marker}']\n")
    for command in ("validate", "train"):
        assert_one_line_error(*cli(command, str(recipe)), str(recipe), "python/object/apply")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [(MINIMAL + "adapter:\n  lora_r: 8\n", "adapter.lora_r: unknown key; did you mean 'r'?"),
     (MINIMAL + "training:\n  learnig_rate: 0.1\n",
      "training.learnig_rate: unknown key; did you mean 'learning_rate'?"),
     (MINIMAL + "training:\n  epochs: 1\n  epochs: 2\n", "duplicate key 'epochs'")],
)
def test_unknown_misspelled_and_duplicate_keys(tmp_path, text, expected):
    """An unknown key, a misspelled key (with the suggestion) and a duplicate key are one-line errors."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert_one_line_error(*cli("train", str(recipe)), expected)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("section", "expected"),
    [({"adapter": {"r": 0}}, "adapter.r: must be greater than 0"),
     ({"adapter": {"dropout": 1.0}}, "adapter.dropout: must be less than 1"),
     ({"training": {"learning_rate": 0}}, "training.learning_rate: must be greater than 0"),
     ({"training": {"learning_rate": "INF"}}, "training.learning_rate: must be a finite number"),
     ({"training": {"bf16": True, "fp16": True}}, "did you mean 'precision'"),
     ({"quantization": {"bits": 4}, "adapter": {"init": "pissa"}}, "cannot start from a quantized model"),
     ({"training": {"precision": "fp16"}}, "training.precision: fp16: fp16 mixed precision needs a GPU")],
)
def test_out_of_range_or_contradictory_values_fail_before_any_model_load(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                         no_model_load, section, expected):
    """Out-of-range or contradictory values are refused naming the key, before any model loads or folder is made."""
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, **section))
    recipe.write_text(recipe.read_text().replace('"INF"', ".inf"))  # YAML's spelling of infinity; JSON has none
    assert_one_line_error(*cli("train", str(recipe)), expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "directory", "not-utf8", "truncated"])
def test_missing_empty_directory_binary_or_truncated_recipe(tmp_path, case):
    """A recipe path that is missing, empty, a folder, not UTF-8 or cut off mid-value: one line naming the file."""
    path = tmp_path / "r.yaml"
    if case == "empty":
        path.write_text("")
    elif case == "directory":
        path.mkdir()
    elif case == "not-utf8":
        path.write_bytes(b"name: caf\xe9\n")
    elif case == "truncated":
        path.write_text(MINIMAL + 'training:\n  scheduler: "cos')  # cut off in the middle of a value
    expected = {"missing": "file not found", "empty": "the file is empty", "directory": "is a directory",
                "not-utf8": "not UTF-8", "truncated": "line 7"}[case]
    assert_one_line_error(*cli("train", str(path)), str(path), expected)


@pytest.mark.parametrize(
    ("override", "expected"),
    [("adapter.lora_r=8", "adapter.lora_r: unknown key; did you mean 'r'?"),
     ("training.max_steps=many", "training.max_steps: must be a valid integer"),
     ("training.learning_rate=[1, 2]", "training.learning_rate: must be a valid number"),
     ("max_steps", "expected section.key=value"),
     ("name.sub=1", "'name' is not a section")],
)
def test_bad_set_overrides(tmp_path, override, expected):
    """--set with an unknown key, a wrong type or a malformed item fails like the same mistake in the file."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MINIMAL)
    assert_one_line_error(*cli("train", str(recipe), "--set", override), expected)


# ----------------------------------------------------------------------------------------------------
# Models and adapters


@pytest.mark.parametrize("path", ["/no/such/model/folder", "no-such-org/no-such-model"])
def test_missing_model_or_unreachable_hub_id_fails_before_the_output_folder(make_recipe, toy_data, tmp_path,
                                                                            no_model_load, path):
    """A model folder that does not exist, or a hub id that cannot be reached, fails before the output folder exists."""
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(Path(path), toy_data, tmp_path / "run", QUICK))
    assert_one_line_error(*cli("train", str(recipe)), f"model.path: {path}")
    assert not (tmp_path / "run").exists()


def copy_model(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_model_with_custom_code_is_refused_unless_trusted(make_recipe, tiny_llama, toy_data, tmp_path, no_model_load):
    """A model that ships its own Python code is refused until model.trust_remote_code: true allows it."""
    model = copy_model(tiny_llama, tmp_path / "remote")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(model, toy_data, tmp_path / "run", QUICK))
    assert_one_line_error(*cli("train", str(recipe)), "ships its own Python code", "model.trust_remote_code: true")
    assert not (tmp_path / "run").exists()
    trusted = validate_recipe(make_recipe(model, toy_data, tmp_path / "run", QUICK, model={"trust_remote_code": True}))
    assert models.resolve_model_source(trusted.model) == str(model)  # the flag is what allows it


def test_pickle_only_weights_are_refused_unless_allowed(make_recipe, tiny_llama, toy_data, tmp_path, no_model_load):
    """A model with pickle weights only is refused until model.allow_pickle_weights: true allows it."""
    model = copy_model(tiny_llama, tmp_path / "pickled")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(model, toy_data, tmp_path / "run", QUICK))
    assert_one_line_error(*cli("train", str(recipe)), "pickle", "model.allow_pickle_weights: true")
    assert not (tmp_path / "run").exists()
    raw = make_recipe(model, toy_data, tmp_path / "run", QUICK, model={"allow_pickle_weights": True})
    allowed = validate_recipe(raw)
    assert models.resolve_model_source(allowed.model) == str(model)


def test_target_modules_matching_nothing_list_what_the_model_has(make_recipe, tiny_llama, toy_data, tmp_path):
    """target_modules that match nothing: the error lists the modules the model has and the presets."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, adapter={"target_modules": ["query", "value"]})
    message = assert_one_line_error(*cli("train", str(write_recipe(tmp_path / "r.yaml", raw))),
                                    "adapter.target_modules", "query, value match no module")
    assert "q_proj x2" in message and "v_proj x2" in message and "all-linear" in message
    assert not (tmp_path / "run").exists()


def save_untrained_adapter(base: Path, folder: Path) -> Path:
    """A PEFT adapter for `base` without training (shapes are all that matter here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("override", "expected"), [({"hidden_size": 32}, "hidden_size"),
                                                    ({"vocab_size": 600}, "vocab_size")])
def test_adapter_for_another_base_is_refused_by_merge_and_eval(make_recipe, tiny_llama, tiny_model_factory, toy_data,
                                                               tmp_path, override, expected):
    """merge and eval refuse an adapter made for a base of another hidden size or vocabulary, naming the mismatch."""
    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    other = tiny_model_factory("llama", **override)
    code, lines = cli("merge", str(adapter), "--base", str(other), "--out", str(tmp_path / "merged"))
    assert_one_line_error(code, lines, str(adapter), expected)
    assert not (tmp_path / "merged").exists()
    raw = make_recipe(other, toy_data, tmp_path / "run", QUICK, data={"eval": str(toy_data)})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    code, lines = cli("eval", str(recipe), "--adapter", str(adapter), "--out", str(tmp_path / "eval"))
    assert_one_line_error(code, lines, str(adapter), expected)


def test_precision_or_quantization_the_hardware_cannot_do(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch):
    """bf16 on a CPU without it trains with a warning and auto picks fp32; fp16 on a CPU and 4-bit without
    bitsandbytes are refused."""
    monkeypatch.setattr(models, "detect_device", lambda: "cpu")
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    # bf16 without native support: trains, but with a visible note (never a silent 20x slowdown).
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, training={"precision": "bf16"}))
    result = run_train(recipe, QUIET, dry_run=True)
    assert any(note.startswith("warning:") and "~20x slower" in note for note in result.notes)
    auto = run_train(validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK)), QUIET, dry_run=True)
    assert auto.precision.name == "fp32" and "no native bf16" in auto.precision.reason
    # fp16 on a CPU: refused with the reason.
    with pytest.raises(LorafitError, match="training.precision: fp16: fp16 mixed precision needs a GPU"):
        run_train(validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                              training={"precision": "fp16"})), QUIET)
    # 4-bit without a usable bitsandbytes: refused, naming the section and the fix.
    from transformers import AutoModelForCausalLM

    def no_bitsandbytes(*args, **kwargs):
        raise ImportError("Using `bitsandbytes` 4-bit quantization requires bitsandbytes")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_bitsandbytes)
    with pytest.raises(LorafitError, match="quantization: .*bitsandbytes.*pip install bitsandbytes"):
        run_train(validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                              quantization={"bits": 4})), QUIET)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------
# Data


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


# ----------------------------------------------------------------------------------------------------
# Runs and files


def test_finished_run_is_refused_without_overwrite_and_kept(make_recipe, tiny_llama, toy_data, tmp_path, no_model_load):
    """A folder holding a finished run is refused without --overwrite, and nothing in it changes."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    run_folder.write_marker(run, "run", files=["adapter", "metrics.json"], status="finished")
    before = digest_tree(run)
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, run, QUICK))
    assert_one_line_error(*cli("train", str(recipe)), "already holds a finished run", "--overwrite")
    assert digest_tree(run) == before


@pytest.mark.parametrize("where", ["root", "home", "cwd", "model", "data"])
def test_dangerous_output_folders_are_refused(make_recipe, tiny_llama, toy_data, tmp_path, no_model_load, where):
    """output.dir pointing at the home folder, the current folder, the model or the data folder is refused."""
    out = {"root": Path("/"), "home": Path.home(), "cwd": Path.cwd(), "model": tiny_llama,
           "data": toy_data.parent}[where]
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, out, QUICK))
    for flag in ("--overwrite", "--dry-run"):
        assert_one_line_error(*cli("train", str(recipe), flag), "refusing to write a run into", "output.dir")


def test_files_lorafit_did_not_write_are_never_replaced(make_recipe, tiny_llama, toy_data, tmp_path, no_model_load):
    """Files in output.dir that lorafit did not write are never replaced: the run is refused."""
    run = tmp_path / "project"
    run.mkdir()
    (run / "README.md").write_text("my notes")
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, run, QUICK))
    assert_one_line_error(*cli("train", str(recipe), "--overwrite"),
                          "already holds README.md, which lorafit did not write")
    assert (run / "README.md").read_text() == "my notes"


def test_overwrite_and_rotation_delete_only_what_lorafit_wrote(make_recipe, tiny_llama, toy_data, tmp_path):
    """--overwrite and save_total_limit rotation delete only lorafit's own checkpoints and files, never the user's."""
    run = tmp_path / "run"
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, run, QUICK,
                                         training={"max_steps": 4, "save_steps": 1, "save_total_limit": 1}))
    run.mkdir()
    (run / "notes.txt").write_text("keep me too")
    run_folder.write_marker(run, "run", files=["checkpoints"], status="interrupted")
    foreign = run / "checkpoints" / "checkpoint-100"  # looks like an HF checkpoint; HF's rotation would delete it
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep me")
    run_train(recipe, QUIET, overwrite=True)
    assert checkpoint_steps(run) == [4]  # rotated down to save_total_limit ...
    assert (foreign / "mine.txt").read_text() == "keep me"  # ... without touching what is not ours
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text("{}")  # `lorafit eval` of the adapter about to be replaced: stale
    run_folder.write_marker(run / "eval", "eval", files=["report.json"], status="finished")
    run_folder.write_marker(run, "run", files=["eval"], status="finished")
    run_train(recipe, QUIET, overwrite=True)  # --overwrite replaces only lorafit's files
    assert (foreign / "mine.txt").read_text() == "keep me" and (run / "notes.txt").read_text() == "keep me too"
    assert not (run / "eval").exists()
    assert (run / "metrics.json").exists() and checkpoint_steps(run) == [4]
    assert not (run / "checkpoints" / checkpoints.STAGING).exists()


def test_resume_with_a_different_recipe_is_refused_with_the_diff(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                 monkeypatch):
    """--resume with another model/adapter/data than the checkpoints were trained with is refused, showing the diff."""
    run = tmp_path / "run"
    raw = make_recipe(tiny_llama, toy_data, run, QUICK, training={"max_steps": 2})
    signal_at_step(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run_train(validate_recipe(raw), QUIET)
    monkeypatch.undo()
    before = digest_tree(run)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe was compared")

    monkeypatch.setattr(models, "load_base_model", refuse)
    changed = {**raw, "adapter": {**raw["adapter"], "r": 8}, "data": {**raw["data"], "max_length": 32}}
    recipe = write_recipe(tmp_path / "changed.yaml", changed)
    message = assert_one_line_error(*cli("train", str(recipe), "--resume"), "refusing to resume", "different recipe")
    assert "adapter.r: 4 -> 8" in message and "data.max_length: 48 -> 32" in message and "adapter.alpha" in message
    # The data file itself is fingerprinted too.
    extra_row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    toy_data.write_text(toy_data.read_text().rstrip("\n") + "\n" + json.dumps(extra_row) + "\n")
    message = assert_one_line_error(*cli("train", str(write_recipe(tmp_path / "same.yaml", raw)), "--resume"))
    assert f"data file {toy_data}: contents changed" in message
    assert digest_tree(run) == before


def test_interrupt_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(make_recipe, tiny_llama, toy_data,
                                                                              tmp_path, monkeypatch):
    """Ctrl-C saves a checkpoint at the step boundary; --resume ends with the adapter of a run never stopped."""
    straight = run_train(validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "straight", QUICK)), QUIET)
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))

    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK))
    signal_at_step(monkeypatch, 3, sig=signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        run_train(recipe, QUIET, resume_command="lorafit train r.yaml --resume")
    assert str(info.value) == "interrupted at step 3; checkpoint saved; resume with: lorafit train r.yaml --resume"
    assert info.value.exit_code == EXIT_INTERRUPTED
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert checkpoint_steps(tmp_path / "run") == [2, 3]  # stopped at the step boundary, with a checkpoint
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "metrics.json").exists()
    assert load_recipe(tmp_path / "run" / "recipe.yaml") == recipe  # the run folder alone can resume it
    monkeypatch.undo()

    resumed = run_train(recipe, QUIET, resume=True)
    assert resumed.metrics.global_step == straight.metrics.global_step == 6
    expected, got = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "run")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name


def test_second_interrupt_stops_at_once_keeping_the_last_complete_checkpoint(make_recipe, tiny_llama, toy_data,
                                                                             tmp_path, monkeypatch):
    """A second Ctrl-C stops at once; the last complete checkpoint is kept and resume continues from it."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK))
    signal_at_step(monkeypatch, 3, times=2)
    with pytest.raises(Interrupted, match=r"interrupted again: stopped at once at step 3; the last complete "
                                          r"checkpoint \(.*checkpoint-2\) is kept; resume with"):
        run_train(recipe, QUIET)
    assert checkpoint_steps(tmp_path / "run") == [2]
    monkeypatch.undo()
    assert run_train(recipe, QUIET, resume=True).metrics.global_step == 6


def test_cli_interrupt_exits_130_with_the_resume_command(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch):
    """An interrupted `lorafit train` exits 130 with one line giving the exact resume command."""
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK))
    signal_at_step(monkeypatch, 2)
    code, lines = cli("train", str(recipe), "--set", "training.max_steps=5")
    expected = f"interrupted at step 2; checkpoint saved; resume with: lorafit train {recipe} --set " \
               f"training.max_steps=5 --resume"
    assert_one_line_error(code, lines, expected, exit_code=EXIT_INTERRUPTED)
    monkeypatch.undo()
    code, lines = cli(*shlex.split(expected.split("resume with: ")[1])[1:])
    assert code == 0, lines
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"] == 5


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_and_resume_skips_it(make_recipe, tiny_llama, toy_data,
                                                                                  tmp_path, monkeypatch):
    """A crash half-way through a save leaves the previous checkpoint intact; resume skips the incomplete one."""
    run = tmp_path / "run"
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, run, QUICK))
    fail_saving(monkeypatch, "checkpoint-4", RuntimeError("simulated crash in the middle of a save"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(recipe, QUIET)
    monkeypatch.undo()
    assert checkpoint_steps(run) == [2] and not (run / "checkpoints" / "checkpoint-4").exists()
    partial = run / "checkpoints" / checkpoints.STAGING / "checkpoint-4"
    assert (partial / "adapter_model.safetensors").exists() and not (partial / "trainer_state.json").exists()
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2

    result = run_train(recipe, QUIET, resume=True)
    assert any("skipped the incomplete checkpoint-4" in note for note in result.notes)
    assert result.metrics.global_step == 6 and checkpoint_steps(run) == [4, 6]
    assert not partial.exists()


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_and_resume_skips_it(make_recipe, tiny_llama, toy_data,
                                                                                  tmp_path):
    """kill -9 during a save leaves the previous checkpoint intact; resume skips and removes the incomplete one."""
    run = tmp_path / "run"
    raw = make_recipe(tiny_llama, toy_data, run, QUICK)
    child = textwrap.dedent("""
        import json, os, signal, sys
        import torch
        from rich.console import Console
        from lorafit.recipe import validate_recipe
        from lorafit.train import run_train

        real_save = torch.save

        def save(obj, f, *args, **kwargs):  # killed half-way through writing checkpoint-4
            real_save(obj, f, *args, **kwargs)
            if "checkpoint-4" in str(f):
                os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save
        run_train(validate_recipe(json.loads(sys.argv[1])), Console(quiet=True))
    """)
    proc = subprocess.run([sys.executable, "-c", child, json.dumps(raw)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert checkpoint_steps(run) == [2] and not (run / "checkpoints" / "checkpoint-4").exists()
    assert (run / "checkpoints" / checkpoints.STAGING / "checkpoint-4").exists()
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    result = run_train(validate_recipe(raw), QUIET, resume=True)
    assert any("skipped the incomplete checkpoint-4" in note for note in result.notes)
    assert result.metrics.global_step == 6


@pytest.mark.slow
def test_sigterm_to_the_cli_process_saves_and_resumes(make_recipe, tiny_llama, toy_data, tmp_path):
    """SIGTERM to the CLI process saves a checkpoint, exits 130, and --resume finishes the run."""
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                                          training={"max_steps": 400, "save_steps": 1000}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen(["lorafit", "train", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr
    assert f"checkpoint saved; resume with: lorafit train {recipe} --resume" in stderr
    step = checkpoint_steps(tmp_path / "run")[-1]
    assert 2 <= step < 400
    done = subprocess.run(["lorafit", "train", str(recipe), "--resume", "--set", f"training.max_steps={step + 2}"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["global_step"] == step + 2


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_exports_nothing(make_recipe, tiny_llama, toy_data, tmp_path):
    """NaN losses stop the run after max_nonfinite_steps in a row, keep the last good checkpoint, export nothing."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(
        tiny_llama, toy_data, run, QUICK, training={"learning_rate": 1e30, "save_steps": 1, "max_nonfinite_steps": 2}))
    message = assert_one_line_error(*cli("train", str(recipe)), "training: loss was NaN/inf for 2 steps in a row",
                                    "no adapter was exported", "training.learning_rate", exit_code=EXIT_RUN_FAILED)
    assert "the last complete checkpoint" in message
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()
    steps = checkpoint_steps(run)
    assert steps and max(steps) < 6
    for checkpoint in checkpoints.complete_checkpoints(run / "checkpoints"):
        weights = load_file(checkpoint / "adapter_model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), checkpoint


def test_nan_weights_are_never_exported(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch):
    """Weights that turned NaN are never exported: the run fails naming the parameter."""
    original = ProgressCallback.on_train_end

    def poison(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
        return original(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(ProgressCallback, "on_train_end", poison)
    with pytest.raises(RunFailed, match="the trained weights hold NaN/inf .*lora_B.*no adapter was exported"):
        run_train(validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                              training={"max_steps": 2})), QUIET)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("MPS backend out of memory (MPS allocated: 17 GB)")])
def test_out_of_memory_names_the_knobs_and_their_values(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch,
                                                        error):
    """Out of memory: one message with the batch size, grad accum, max_length, checkpointing, quantization and
    precision in use."""
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                                          training={"precision": "fp32"}))
    fail_at_step(monkeypatch, 3, error)
    message = assert_one_line_error(*cli("train", str(recipe)), "out of memory", exit_code=EXIT_RUN_FAILED)
    for knob in ("training.batch_size=4", "training.grad_accum=1", "data.max_length=48",
                 "training.gradient_checkpointing=off", "quantization=none", "precision=fp32",
                 "lower training.batch_size", "quantization: {bits: 4}"):
        assert knob in message, knob
    assert checkpoint_steps(tmp_path / "run") == [2]


def test_disk_full_during_a_save_is_explained_and_the_last_checkpoint_kept(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                           monkeypatch):
    """Disk full during a save: the message gives the free space and the knobs, the last complete checkpoint is kept."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, run, QUICK))
    fail_saving(monkeypatch, "checkpoint-4", OSError(errno.ENOSPC, "No space left on device"))
    message = assert_one_line_error(*cli("train", str(recipe)), f"output.dir: {run}", "disk full", "free",
                                    "checkpoint-2) is kept", "save_total_limit", exit_code=EXIT_RUN_FAILED)
    assert f"resume with: lorafit train {recipe} --resume" in message
    assert checkpoint_steps(run) == [2] and not (run / "checkpoints" / checkpoints.STAGING).exists()


def test_secrets_from_the_environment_never_reach_the_run_folder(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                 monkeypatch):
    """Hub tokens and tracker keys in the environment never appear in any file of the run folder."""
    secrets = {"HF_TOKEN": "hf_PLANTEDsecret0123456789", "HUGGING_FACE_HUB_TOKEN": "hf_PLANTEDsecret9876543210",
               "WANDB_API_KEY": "wandb-PLANTED-key-4242", "MLFLOW_TRACKING_TOKEN": "mlflow-PLANTED-token-77",
               "COMET_API_KEY": "comet-PLANTED-key-11"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, run, QUICK, training={"max_steps": 2, "save_steps": 1},
                         output={"report_to": ["tensorboard"]}))
    run_train(recipe, QUIET)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"training_args.bin", "recipe.yaml", "README.md", "metrics.json"} <= {p.name for p in files}
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    for path in files:
        content = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in content, f"{name} leaked into {path}"
    args = torch.load(next(p for p in files if p.name == "training_args.bin"), weights_only=False)
    assert args.hub_token is None and not args.push_to_hub


# ----------------------------------------------------------------------------------------------------
# Found by trying it as a new user would: ownership, one writer, every user error, settings, exact resume


def test_a_run_folder_is_marked_with_kind_status_and_the_files_lorafit_wrote(make_recipe, tiny_llama, toy_data,
                                                                             tmp_path):
    """A finished run's lorafit.json says kind run, status finished, and lists exactly what lorafit wrote."""
    run = tmp_path / "run"
    (run / "notes.txt").parent.mkdir()
    (run / "notes.txt").write_text("mine")
    run_train(validate_recipe(make_recipe(tiny_llama, toy_data, run, QUICK, training={"max_steps": 2})), QUIET)
    marker = run_folder.read_marker(run)
    assert marker is not None and marker.kind == "run" and marker.status == "finished" and not marker.legacy
    assert sorted(marker.files) == sorted(["adapter", ".adapter.tmp", "recipe.yaml", "metrics.json", "README.md",
                                           "loss.png", "checkpoints"])
    assert sorted(p.name for p in run.iterdir()) == sorted(["adapter", "recipe.yaml", "metrics.json", "README.md",
                                                           "loss.png", "checkpoints", "lorafit.json", "notes.txt"])
    assert marker.lorafit_version and marker.created
    assert run_folder.read_marker(tmp_path) is None  # any other folder: not lorafit's


@pytest.mark.parametrize("flag", ["--resume", "--overwrite", None])
def test_a_user_folder_that_looks_like_a_run_is_never_touched(make_recipe, tiny_llama, toy_data, tmp_path,
                                                              no_model_load, flag):
    """A user's folder holding README.md and checkpoints/ is not lorafit's without the marker: refused,
    with or without --resume/--overwrite, and every byte stays as it was."""
    run = tmp_path / "project"
    (run / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-5" / "model.safetensors").write_bytes(b"mine")
    (run / "README.md").write_text("my notes")
    (run / "metrics.json").write_text("{}")
    before = digest_tree(run)
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, run, QUICK))
    assert_one_line_error(*cli("train", str(recipe), *([flag] if flag else [])),
                          "README.md", "checkpoints", "which lorafit did not write")
    assert digest_tree(run) == before


def test_runs_of_older_lorafit_are_recognised_by_their_run_record(make_recipe, tiny_llama, toy_data, tmp_path):
    """A run written before lorafit.json existed (recognised by checkpoints/lorafit-run.json) is still
    lorafit's: refused as a finished run, replaced by --overwrite, and then carries a real marker."""
    run = tmp_path / "run"
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, run, QUICK, training={"max_steps": 2}))
    run_train(recipe, QUIET)
    (run / "lorafit.json").unlink()  # as an older lorafit left it
    marker = run_folder.read_marker(run)
    assert marker.legacy and marker.kind == "run" and marker.status == "finished"
    assert "adapter" in marker.files and "checkpoints" in marker.files
    recipe_file = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, run, QUICK,
                                                               training={"max_steps": 2}))
    assert_one_line_error(*cli("train", str(recipe_file)), "already holds a finished run")
    run_train(recipe, QUIET, overwrite=True)
    assert not run_folder.read_marker(run).legacy


def test_a_run_stopped_before_its_first_checkpoint_does_not_block_the_rerun(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                            monkeypatch):
    """A run that failed before any checkpoint leaves a folder marked failed, and the corrected re-run
    needs no flag (nothing in it was worth keeping)."""
    run = tmp_path / "run"
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, run, QUICK, training={"max_steps": 2, "save_steps": 10}))
    fail_at_step(monkeypatch, 1, RunFailed("simulated failure"))
    with pytest.raises(RunFailed):
        run_train(recipe, QUIET)
    assert run_folder.read_marker(run).status == "failed"
    monkeypatch.undo()
    assert run_train(recipe, QUIET).metrics.global_step == 2
    assert run_folder.read_marker(run).status == "finished"


def test_interrupt_marks_the_run_interrupted(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch):
    """Ctrl-C leaves the marker's status at interrupted; resuming sets it to finished."""
    run = tmp_path / "run"
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, run, QUICK, training={"max_steps": 4}))
    signal_at_step(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run_train(recipe, QUIET)
    assert run_folder.read_marker(run).status == "interrupted"
    monkeypatch.undo()
    run_train(recipe, QUIET, resume=True)
    assert run_folder.read_marker(run).status == "finished"


def test_merge_overwrite_replaces_only_an_earlier_merge(tmp_path, tiny_llama):
    """Merge --overwrite into a folder of someone else's model files is refused (nothing deleted); into an
    earlier merge it replaces that merge's files, by its marker."""
    from lorafit.merge import AdapterSpec, run_merge

    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    other = tmp_path / "someone-elses-model"
    other.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (other / name).write_text("theirs")
    before = digest_tree(other)
    with pytest.raises(LorafitError, match="which lorafit did not write"):
        run_merge([AdapterSpec(adapter)], other, overwrite=True)
    assert digest_tree(other) == before
    out = tmp_path / "merged"
    run_merge([AdapterSpec(adapter)], out)
    (out / "mine.txt").write_text("keep")
    first = run_folder.read_marker(out)
    assert first.kind == "merge" and first.status == "finished" and "model.safetensors" in first.files
    with pytest.raises(LorafitError, match="earlier merge.*--overwrite"):
        run_merge([AdapterSpec(adapter)], out)
    run_merge([AdapterSpec(adapter)], out, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep" and not (out / run_folder.STAGING).exists()


def test_eval_never_overwrites_its_own_data_file(make_recipe, tiny_llama, tmp_path, toy_data_factory):
    """Eval --out pointing at the folder of the --data file named samples.jsonl refuses before any model
    loads, and the data file is unchanged."""
    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_file = toy_data_factory(n=8, name="data/samples.jsonl")
    before = data_file.read_bytes()
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, data_file, tmp_path / "run", QUICK))
    assert_one_line_error(*cli("eval", str(recipe), "--adapter", str(adapter), "--data", str(data_file),
                               "--out", str(data_dir)), "samples.jsonl", "which lorafit did not write")
    assert data_file.read_bytes() == before


def test_outputs_inside_what_another_output_owns_are_refused(make_recipe, tiny_llama, toy_data, tmp_path,
                                                             no_model_load):
    """A run or merge placed inside a run's adapter/ or checkpoints/ (which that run's --overwrite deletes)
    is refused up front."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    run_folder.write_marker(run, "run", files=["adapter", "checkpoints"], status="finished")
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, run / "adapter" / "inner", QUICK))
    assert_one_line_error(*cli("train", str(recipe)), "inside", "adapter", "--overwrite there would delete it")
    adapter = save_untrained_adapter(tiny_llama, tmp_path / "lora")
    code, lines = cli("merge", str(adapter), "--out", str(run / "checkpoints" / "merged"))
    assert_one_line_error(code, lines, "inside", "checkpoints")


def test_a_second_train_on_the_same_folder_exits_naming_the_holder(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                   no_model_load):
    """While one lorafit holds the run folder, a second train exits 1 naming the holder's pid; after the
    holder is gone (even killed: the lock file stays behind) the folder is free again."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, run, QUICK))
    holder = _hold_folder_lock(run)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_one_line_error(*cli("train", str(recipe)), f"pid {holder.pid}", "another lorafit process")
    finally:
        holder.kill()
        holder.wait()
    assert (run / run_folder.LOCK).exists()  # left behind by the kill, but stale: the next run is not blocked
    with run_folder.folder_lock(run, where="test"):
        assert (run / run_folder.LOCK).read_text().strip() == str(os.getpid())
    assert not (run / run_folder.LOCK).exists()


def _tiny_lora_run(make_recipe, model_dir: Path, data_file: Path, run: Path, **adapter) -> Path:
    """Train a 2-step adapter on the tiny model; returns its adapter folder."""
    raw = make_recipe(model_dir, data_file, run, QUICK, training={"max_steps": 2, "save_steps": 10})
    if adapter:
        raw["adapter"] = adapter
    run_train(validate_recipe(raw), QUIET)
    return run / "adapter"


@pytest.mark.parametrize("damage", ["config.json", "model.safetensors", "tokenizer.json"])
def test_cut_off_model_files_are_user_errors(make_recipe, tiny_llama, toy_data, tmp_path, damage):
    """A model folder with a cut-off config.json, model.safetensors or tokenizer.json (an interrupted
    download) is exit 1 with one line naming the file, before any output folder; --json prints its object."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    data = (model / damage).read_bytes()
    (model / damage).write_bytes(data[: len(data) // 2])
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(model, toy_data, tmp_path / "run", QUICK))
    message = assert_one_line_error(*cli("train", str(recipe)), str(model))
    if damage != "tokenizer.json":
        assert damage in message and "cut off or corrupt" in message
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(app, ["train", str(recipe), "--json"])
    payload = json.loads(result.stdout)
    assert result.exit_code == EXIT_USER_ERROR and payload["ok"] is False and payload["exit_code"] == EXIT_USER_ERROR


@pytest.mark.parametrize("damage", ["adapter_config.json", "adapter_model.safetensors", "not-an-object"])
def test_cut_off_adapter_files_are_user_errors_in_merge_and_eval(make_recipe, tiny_llama, toy_data, tmp_path, damage):
    """Merge and eval of an adapter whose adapter_config.json or weights are cut off (or whose config is
    not a JSON object) end with one line naming the file; nothing is written."""
    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    if damage == "not-an-object":
        (adapter / "adapter_config.json").write_text("[1, 2]")
    else:
        data = (adapter / damage).read_bytes()
        (adapter / damage).write_bytes(data[: len(data) - 7])
    name = "adapter_config.json" if damage == "not-an-object" else damage
    assert_one_line_error(*cli("merge", str(adapter), "--out", str(tmp_path / "merged")), name)
    assert not (tmp_path / "merged").exists()
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                                          data={"eval": str(toy_data)}))
    assert_one_line_error(*cli("eval", str(recipe), "--adapter", str(adapter), "--out", str(tmp_path / "ev")), name)
    assert not (tmp_path / "ev").exists()


def _uninstalled_tracker() -> str | None:
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    return next((name for name in INTEGRATION_TO_CALLBACK if name not in get_available_reporting_integrations()
                 and name != "azure_ml"), None)


@pytest.mark.parametrize(("section", "value", "where"), [
    ("training", {"scheduler": "cosine_annealing"}, "training.scheduler"),
    ("training", {"optimizer": "adamw_turbo"}, "training.optimizer"),
    ("output", {"report_to": ["not_a_tracker"]}, "output.report_to"),
    ("output", {"report_to": ["UNINSTALLED"]}, "output.report_to"),
    ("model", {"attn_implementation": "flash_attention_2"}, "model.attn_implementation"),
])
def test_names_the_libraries_reject_fail_in_validate_and_dry_run(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                 no_model_load, section, value, where):
    """Scheduler/optimizer names transformers does not have, trackers that are unknown or not installed,
    and flash_attention_2 without flash-attn are refused by validate and --dry-run, naming the key, before any
    model loads (the flash case only where flash-attn is missing)."""
    import importlib.util

    if value.get("report_to") == ["UNINSTALLED"]:
        tracker = _uninstalled_tracker()
        if tracker is None:
            pytest.skip("every tracker is installed here")
        value = {"report_to": [tracker]}
    if "attn_implementation" in value and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, **{section: value})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    assert_one_line_error(*cli("validate", str(recipe)), where)
    assert_one_line_error(*cli("train", str(recipe), "--dry-run"), where)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["file", "too-long", "file-parent", "link-loop"])
def test_output_paths_the_filesystem_cannot_hold(make_recipe, tiny_llama, toy_data, tmp_path, no_model_load, case):
    """Output.dir that is a file, lies under a file, has a name too long for the filesystem, or runs into
    a symlink loop is exit 1 with one line, before any model loads, and creates nothing."""
    out = {"file": tmp_path / "taken", "too-long": tmp_path / ("x" * 300), "file-parent": tmp_path / "taken" / "run",
           "link-loop": tmp_path / "loop" / "run"}[case]
    (tmp_path / "taken").write_text("a file")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    before = sorted(p.name for p in tmp_path.iterdir())
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, out, QUICK))
    before.append("r.yaml")
    assert_one_line_error(*cli("train", str(recipe)), "output.dir")
    assert_one_line_error(*cli("train", str(recipe), "--dry-run"), "output.dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_a_run_that_fails_before_writing_leaves_no_folder(make_recipe, tiny_llama, toy_data, tmp_path):
    """A run refused after the folder lock was taken (here: target_modules that match nothing, found when
    the model loads) leaves no half-created folder, so the corrected re-run starts like a first one."""
    run = tmp_path / "runs" / "new"
    raw = make_recipe(tiny_llama, toy_data, run, QUICK, adapter={"target_modules": ["nope_proj"]})
    assert_one_line_error(*cli("train", str(write_recipe(tmp_path / "r.yaml", raw))), "nope_proj")
    assert not run.exists() and not run.parent.exists()  # runs/ was created for it, and goes with it


def test_merge_checks_max_shard_size_before_any_work(tiny_llama, tmp_path, monkeypatch):
    """--max-shard-size is parsed up front (as save_pretrained will), so a typo costs no merge."""
    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    from lorafit import merge as merge_module

    monkeypatch.setattr(merge_module, "_load_full", lambda *a, **k: pytest.fail("the base model was loaded"))
    assert_one_line_error(*cli("merge", str(adapter), "--out", str(tmp_path / "m"), "--max-shard-size", "5 gigs"),
                          "--max-shard-size", "5GB")
    assert not (tmp_path / "m").exists()


def test_internal_errors_print_a_json_object_too(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch):
    """--json prints one {"ok": false} object even for an internal error (exit 2)."""
    import lorafit.train

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(lorafit.train, "run_train", broken)
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK))
    result = CliRunner().invoke(app, ["train", str(recipe), "--json"])
    assert result.exit_code == EXIT_RUN_FAILED
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and "simulated bug" in payload["error"] and payload["exit_code"] == EXIT_RUN_FAILED


def test_home_and_dotdot_in_paths(make_recipe, tiny_llama, toy_data, tmp_path, monkeypatch, no_model_load):
    """`~` in output.dir, model.path and data.train means the home folder (never a folder named
    `~`), and `name: ../../x` cannot place the run outside runs/."""
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (home / "data" / "toy.jsonl").write_bytes(toy_data.read_bytes())
    recipe = validate_recipe({"name": "r", "model": {"path": str(tiny_llama)}, "data": {"train": "~/data/toy.jsonl"},
                              "output": {"dir": "~/runs/r"}})
    assert recipe.run_dir == home / "runs" / "r" and recipe.data.train == str(home / "data" / "toy.jsonl")
    (tmp_path / "r.yaml").write_text("name: r\nmodel:\n  path: m\ndata:\n  train: ~/data/toy.jsonl\n")
    assert load_recipe(tmp_path / "r.yaml").data.train == str(home / "data" / "toy.jsonl")
    escaping = write_recipe(tmp_path / "esc.yaml", {**make_recipe(tiny_llama, toy_data, tmp_path / "x", QUICK),
                                                     "name": "../../x", "output": {"report_to": ["none"]}})
    assert_one_line_error(*cli("validate", str(escaping)), "name", "outside runs/")
    assert not (tmp_path / "~").exists()


def test_set_paths_are_resolved_against_the_current_folder(tiny_llama, toy_data, tmp_path, monkeypatch):
    """`--set data.train=rel.jsonl` and `--set model.path=models/x` mean those paths as
    seen from the current folder, and the resolved (absolute) paths are what the recipe records."""
    import shutil

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    shutil.copytree(tiny_llama, work / "models" / "x")
    shutil.copy(toy_data, work / "rel.jsonl")
    elsewhere = tmp_path / "recipes"
    elsewhere.mkdir()
    (elsewhere / "r.yaml").write_text("name: r\nmodel:\n  path: placeholder\ndata:\n  train: placeholder.jsonl\n")
    monkeypatch.chdir(work)
    recipe = load_recipe(elsewhere / "r.yaml", ["model.path=models/x", "data.train=rel.jsonl"])
    assert recipe.model.path == str(work / "models" / "x") and recipe.data.train == str(work / "rel.jsonl")
    monkeypatch.chdir(tmp_path)  # somewhere else: the recorded paths still name the same files
    assert Path(recipe.model.path).is_dir() and Path(recipe.data.train).is_file()


@pytest.mark.parametrize(("adapter", "expected"), [
    ({"method": "prefix", "layers_to_transform": [0]}, "layers_to_transform: not used by method: prefix"),
    ({"method": "ia3", "layers_to_transform": [0]}, "layers_to_transform: not used by method: ia3"),
    ({"method": "prefix", "r": 8}, "r: not used by method: prefix"),
    ({"method": "lora", "num_virtual_tokens": 10}, "num_virtual_tokens: not used by method: lora"),
    ({"method": "lora", "init": "orthogonal", "r": 5}, "needs an even r"),
])
def test_settings_the_method_cannot_use_are_refused(make_recipe, tiny_llama, toy_data, tmp_path, adapter, expected):
    """A setting the chosen method would ignore is a validate-time error naming the key."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK)
    raw["adapter"] = adapter
    assert_one_line_error(*cli("validate", str(write_recipe(tmp_path / "r.yaml", raw))), expected)


def test_orthogonal_under_qlora_is_refused_for_the_right_reason(make_recipe, tiny_llama, toy_data, tmp_path):
    """Init: orthogonal under quantization is refused because PEFT would build the matrices in the 4-bit
    layer's packed uint8 dtype — not because it 'decomposes full-precision weights' (it needs only the shapes)."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, adapter={"init": "orthogonal"},
                      quantization={"bits": 4})
    message = assert_one_line_error(*cli("validate", str(write_recipe(tmp_path / "r.yaml", raw))), "orthogonal")
    assert "uint8" in message and "decomposes" not in message


def test_layers_beyond_the_model_are_refused_with_the_layer_count(make_recipe, tiny_llama, toy_data, tmp_path):
    """Layers_to_transform naming a layer the model does not have is a user error naming the layer count
    (in --dry-run, before any folder)."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, adapter={"layers_to_transform": [0, 7]})
    layers = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    assert_one_line_error(*cli("train", str(write_recipe(tmp_path / "r.yaml", raw)), "--dry-run"),
                          "adapter.layers_to_transform", f"this model has {layers} layers")


def test_prefix_tuning_honours_modules_to_save(make_recipe, tiny_llama, toy_data, tmp_path):
    """Modules_to_save with method: prefix is honoured: the module is trained and saved with the adapter."""
    adapter = _tiny_lora_run(make_recipe, tiny_llama, toy_data, tmp_path / "run", method="prefix",
                             modules_to_save=["norm"])
    saved = load_file(adapter / "adapter_model.safetensors")
    norm = [name for name in saved if "norm" in name]
    base = load_file(tiny_llama / "model.safetensors")["model.norm.weight"]
    assert norm and not torch.equal(saved[norm[0]].float(), base.float())


def test_prefix_eval_generates_through_the_prefix(make_recipe, tiny_llama, toy_data, tmp_path):
    """Eval of a prefix-tuning adapter generates with the prefix: its first answer token is the argmax of
    the adapter's own forward pass, and the answers do not change with the batch size."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.evaluate import run_eval

    adapter = _tiny_lora_run(make_recipe, tiny_llama, toy_data, tmp_path / "run", method="prefix", num_virtual_tokens=4)
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, data={"eval": str(toy_data)})
    raw["adapter"] = {"method": "prefix", "num_virtual_tokens": 4}
    recipe = validate_recipe(raw)
    one = run_eval(recipe, [adapter], samples=4, batch_size=1, max_new_tokens=3, out_dir=tmp_path / "e1")
    four = run_eval(recipe, [adapter], samples=4, batch_size=4, max_new_tokens=3, out_dir=tmp_path / "e4")
    name = one.scores[1].name
    assert [s[name] for s in one.samples] == [s[name] for s in four.samples]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    for sample in one.samples:
        ids = tokenizer(sample["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            first = model(input_ids=ids).logits[0, -1].argmax().item()
        if first != tokenizer.eos_token_id:
            assert sample[name].startswith(tokenizer.decode([first], skip_special_tokens=True).strip())


def test_merge_refuses_prefix_adapters_and_mixed_methods_up_front(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                  monkeypatch):
    """Merge of a prefix-tuning adapter, and a weighted merge of a LoRA with an IA3 adapter, are refused
    before any weights load, with the reason."""
    from lorafit import merge as merge_module

    prefix = _tiny_lora_run(make_recipe, tiny_llama, toy_data, tmp_path / "p", method="prefix", num_virtual_tokens=4)
    ia3 = _tiny_lora_run(make_recipe, tiny_llama, toy_data, tmp_path / "i", method="ia3")
    lora = save_untrained_adapter(tiny_llama, tmp_path / "lora")
    monkeypatch.setattr(merge_module, "_load_full", lambda *a, **k: pytest.fail("the base model was loaded"))
    assert_one_line_error(*cli("merge", str(prefix), "--out", str(tmp_path / "m")), "prefix-tuning adapter cannot be "
                          "merged", "virtual tokens")
    assert_one_line_error(*cli("merge", str(lora), "--adapter", f"{ia3}:0.5", "--out", str(tmp_path / "m")),
                          "different methods", "IA3", "LORA")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_sigterm_during_merge_or_eval_exits_130_and_leaves_nothing(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                   monkeypatch, command):
    """SIGTERM while merge or eval writes its output exits 130 with one line, removes the
    staging folder and leaves nothing that looks complete (no output folder at all here)."""
    from lorafit import evaluate
    from lorafit import merge as merge_module

    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    out = tmp_path / "out"

    def terminate(*args, **kwargs):
        assert (out / run_folder.STAGING).is_dir()  # the output is being written
        os.kill(os.getpid(), signal.SIGTERM)
        return "never used"

    if command == "merge":
        monkeypatch.setattr(merge_module, "_model_card", terminate)
        code, lines = cli("merge", str(adapter), "--out", str(out))
    else:
        monkeypatch.setattr(run_folder, "write_atomic", terminate)
        recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK,
                                                              data={"eval": str(toy_data)}))
        code, lines = cli("eval", str(recipe), "--adapter", str(adapter), "--samples", "2", "--out", str(out))
        assert evaluate  # imported for the patch target's module
    assert_one_line_error(code, lines, "interrupted", str(out), exit_code=EXIT_INTERRUPTED)
    assert not out.exists()


def test_train_quiet_prints_the_run_summary(make_recipe, tiny_llama, toy_data, tmp_path):
    """README promise: `train --quiet` prints the run summary (and nothing else on stdout)."""
    raw = make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK, training={"max_steps": 2, "save_steps": 10})
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw)), "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert "run rel" in result.stdout and "adapter" in result.stdout and "steps" in result.stdout
    assert "precision" not in result.stdout  # the notes stay quiet


def test_init_writes_the_task_and_detects_a_label_column(tiny_llama, tmp_path):
    """README promise: `lorafit init` on text/label data writes task: sequence-classification and maps the columns;
    on chat data it writes task: causal-lm."""
    rows = [{"review": f"film number {i} was {'great' if i % 2 else 'dull'}", "sentiment": "pos" if i % 2 else "neg"}
            for i in range(20)]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "r.yaml"
    assert CliRunner().invoke(app, ["init", str(tiny_llama), str(data), "--out", str(out)]).exit_code == 0
    recipe = load_recipe(out)
    assert recipe.task == "sequence-classification"
    assert recipe.data.fields == {"text": "review", "label": "sentiment"}
    assert "task: sequence-classification" in out.read_text()


_KILL_AT = """
import os, signal, sys
point, recipe = sys.argv[1], sys.argv[2]
from lorafit import export
from lorafit.progress import ProgressCallback
if point == "export":  # after the last step and its checkpoint: while the run folder is being exported
    export.export_run = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
else:  # at the end of optimizer step N, before that step's checkpoint (if any) is saved
    step, original = int(point), ProgressCallback.on_step_end
    def on_step_end(self, args, state, control, **kwargs):
        result = original(self, args, state, control, **kwargs)
        if state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    ProgressCallback.on_step_end = on_step_end
from lorafit.cli import main
sys.argv = ["lorafit", "train", recipe, "--quiet"]
main()
"""


def _kill_and_resume(make_recipe, tiny_llama, toy_data, tmp_path, point: str) -> None:
    """Train uninterrupted; train again killed with SIGKILL at `point`, then resume: the same adapter, bit for bit,
    no step run twice or past max_steps."""
    straight = tmp_path / "straight"
    raw = make_recipe(tiny_llama, toy_data, straight, QUICK)
    run_train(validate_recipe(raw), QUIET)
    run = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "k.yaml", make_recipe(tiny_llama, toy_data, run, QUICK))
    killed = subprocess.run([sys.executable, "-c", _KILL_AT, point, str(recipe)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "metrics.json").exists()
    resumed = run_train(validate_recipe(make_recipe(tiny_llama, toy_data, run, QUICK)), QUIET, resume=True)
    assert resumed.metrics.global_step == 6 and max(checkpoint_steps(run)) == 6
    assert not (run / "checkpoints" / "checkpoint-7").exists()
    mine, theirs = adapter_weights(run), adapter_weights(straight)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert run_folder.read_marker(run).status == "finished"


def test_kill_after_the_last_step_resumes_without_training_past_max_steps(make_recipe, tiny_llama, toy_data, tmp_path):
    """SIGKILL after the last step's checkpoint (during the export), then --resume: only the export runs —
    no checkpoint-7 for a 6-step recipe — and the adapter equals an uninterrupted run's bit for bit."""
    _kill_and_resume(make_recipe, tiny_llama, toy_data, tmp_path, "export")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["1", "3", "4", "6"])
def test_kill_at_any_step_resumes_bit_exactly(make_recipe, tiny_llama, toy_data, tmp_path, point):
    """SIGKILL before the first checkpoint (step 1), between checkpoints (3), right at a checkpoint step
    before its save (4), and at the last step before the final save (6); each resumed adapter equals an
    uninterrupted run's bit for bit. (Kills mid-save: the *_during_a_save_* tests.)"""
    _kill_and_resume(make_recipe, tiny_llama, toy_data, tmp_path, point)


def test_merge_into_a_folder_another_lorafit_writes_is_refused_before_any_work(tiny_llama, tmp_path, monkeypatch):
    """While another lorafit holds an output folder, merge into it exits 1 naming the holder, before the
    base model loads."""
    from lorafit import merge as merge_module

    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    out = tmp_path / "merged"
    monkeypatch.setattr(merge_module, "_load_full", lambda *a, **k: pytest.fail("the base model was loaded"))
    holder = _hold_folder_lock(out)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_one_line_error(*cli("merge", str(adapter), "--out", str(out)), f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def _hold_folder_lock(folder: Path) -> subprocess.Popen:
    """Another process holding lorafit's lock on `folder` for up to 60 s; it prints "locked" once it holds it."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from lorafit.run_folder import folder_lock
        with folder_lock(Path({str(folder)!r}), where="test"):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
