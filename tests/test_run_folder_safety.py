"""Output folders: which ones are refused, the lorafit.json marker that says what lorafit wrote, what
--overwrite and checkpoint rotation may delete, the one-writer lock, paths the filesystem cannot hold, and the
same safety for merge and eval outputs. Each test's name and docstring say the case it covers.

The rule checked throughout: a non-zero exit code, one message naming the field, file or value and what to
do, no traceback (unless --debug), and nothing the user had is lost or changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import (QUICK, QUIET, assert_one_line_error, checkpoint_steps, cli, digest_tree, fail_at_step,
                         hold_folder_lock, save_untrained_adapter, write_recipe)

from lorafit import checkpoints, run_folder
from lorafit.errors import LorafitError, RunFailed
from lorafit.recipe import validate_recipe
from lorafit.train import run_train

pytestmark = pytest.mark.usefixtures("cli_in_this_process")


@pytest.mark.parametrize("where", ["root", "home", "cwd", "model", "data"])
def test_dangerous_output_folders_are_refused(make_recipe, tiny_llama, toy_data, tmp_path, no_model_load, where):
    """output.dir pointing at the home folder, the current folder, the model or the data folder is refused."""
    out = {"root": Path("/"), "home": Path.home(), "cwd": Path.cwd(), "model": tiny_llama,
           "data": toy_data.parent}[where]
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, out, QUICK))
    for flag in ("--overwrite", "--dry-run"):
        assert_one_line_error(*cli("train", str(recipe), flag), "refusing to write a run into", "output.dir")


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


def test_files_lorafit_did_not_write_are_never_replaced(make_recipe, tiny_llama, toy_data, tmp_path, no_model_load):
    """Files in output.dir that lorafit did not write are never replaced: the run is refused."""
    run = tmp_path / "project"
    run.mkdir()
    (run / "README.md").write_text("my notes")
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, run, QUICK))
    assert_one_line_error(*cli("train", str(recipe), "--overwrite"),
                          "already holds README.md, which lorafit did not write")
    assert (run / "README.md").read_text() == "my notes"


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


def test_a_run_that_fails_before_writing_leaves_no_folder(make_recipe, tiny_llama, toy_data, tmp_path):
    """A run refused after the folder lock was taken (here: target_modules that match nothing, found when
    the model loads) leaves no half-created folder, so the corrected re-run starts like a first one."""
    run = tmp_path / "runs" / "new"
    raw = make_recipe(tiny_llama, toy_data, run, QUICK, adapter={"target_modules": ["nope_proj"]})
    assert_one_line_error(*cli("train", str(write_recipe(tmp_path / "r.yaml", raw))), "nope_proj")
    assert not run.exists() and not run.parent.exists()  # runs/ was created for it, and goes with it


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
    holder = hold_folder_lock(run)
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


def test_merge_into_a_folder_another_lorafit_writes_is_refused_before_any_work(tiny_llama, tmp_path, monkeypatch):
    """While another lorafit holds an output folder, merge into it exits 1 naming the holder, before the
    base model loads."""
    from lorafit import merge as merge_module

    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    out = tmp_path / "merged"
    monkeypatch.setattr(merge_module, "_load_full", lambda *a, **k: pytest.fail("the base model was loaded"))
    holder = hold_folder_lock(out)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_one_line_error(*cli("merge", str(adapter), "--out", str(out)), f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def test_merge_overwrite_replaces_only_an_earlier_merge(tmp_path, tiny_llama):
    """Merge --overwrite into a folder of someone else's model files is refused (nothing deleted); into an
    earlier merge it replaces that merge's files, by its marker."""
    from lorafit.merge import AdapterSpec, MergeOptions, run_merge

    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    other = tmp_path / "someone-elses-model"
    other.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (other / name).write_text("theirs")
    before = digest_tree(other)
    with pytest.raises(LorafitError, match="which lorafit did not write"):
        run_merge(MergeOptions([AdapterSpec(adapter)], other, overwrite=True))
    assert digest_tree(other) == before
    out = tmp_path / "merged"
    run_merge(MergeOptions([AdapterSpec(adapter)], out))
    (out / "mine.txt").write_text("keep")
    first = run_folder.read_marker(out)
    assert first.kind == "merge" and first.status == "finished" and "model.safetensors" in first.files
    with pytest.raises(LorafitError, match="earlier merge.*--overwrite"):
        run_merge(MergeOptions([AdapterSpec(adapter)], out))
    run_merge(MergeOptions([AdapterSpec(adapter)], out, overwrite=True))
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


def test_a_merge_finished_by_another_command_meanwhile_is_not_replaced(tmp_path, tiny_llama, monkeypatch):
    """Two merges aimed at one --out: the second checked the folder (empty) before its model load, the first
    finished meanwhile; the folder is checked again under the lock, so the finished merge stays, byte for byte, and
    the second exits naming --overwrite."""
    from lorafit import merge as merge_module
    from lorafit.merge import AdapterSpec, MergeOptions, run_merge

    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    out = tmp_path / "merged"
    attach = merge_module._attach_to_base
    raced = []

    def other_merge_finishes_first(*args, **kwargs):
        if not raced:  # the minutes-long load of the second merge: the first one completes in the meantime
            raced.append(True)
            run_merge(MergeOptions([AdapterSpec(adapter)], out))
        return attach(*args, **kwargs)

    monkeypatch.setattr(merge_module, "_attach_to_base", other_merge_finishes_first)
    with pytest.raises(LorafitError, match="earlier merge.*--overwrite"):
        run_merge(MergeOptions([AdapterSpec(adapter)], out))
    finished = digest_tree(out)
    assert run_folder.read_marker(out).status == "finished" and not (out / run_folder.STAGING).exists()
    raced.clear()
    with pytest.raises(LorafitError, match="earlier merge"):
        run_merge(MergeOptions([AdapterSpec(adapter)], out))
    assert digest_tree(out) == finished


def test_an_eval_never_claims_an_output_written_there_while_it_scored(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                      monkeypatch):
    """Eval checked --out (empty) before loading the models; a merge was published there while it scored. Under the
    lock the folder is checked again: the eval exits 1 naming the merge, and the merge's files and marker stay."""
    from lorafit import evaluate
    from lorafit.evaluate import run_eval

    adapter = save_untrained_adapter(tiny_llama, tmp_path / "adapter")
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", QUICK))
    out = tmp_path / "report"
    write = evaluate._write

    def a_merge_lands_first(result):
        out.mkdir()
        (out / "model.safetensors").write_text("the merge's weights")
        run_folder.write_marker(out, "merge", files=["model.safetensors"], status="finished")
        return write(result)

    monkeypatch.setattr(evaluate, "_write", a_merge_lands_first)
    with pytest.raises(LorafitError, match="lorafit merge output, not an eval"):
        run_eval(recipe, [adapter], data_file=toy_data, out_dir=out, samples=2)
    assert run_folder.read_marker(out).kind == "merge"
    assert sorted(p.name for p in out.iterdir()) == ["lorafit.json", "model.safetensors"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    """write_atomic that fails half-way (a full disk at fsync) raises, keeps the previous content and removes its
    temporary file, so nothing half-written is left beside the output."""
    import errno

    target = tmp_path / "metrics.json"
    target.write_text("old")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    users = tmp_path / ".metrics.json.tmp"  # a user's file under the name the temporary file used to have
    users.write_text("mine")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        run_folder.write_json_atomic(target, {"new": 1})
    assert target.read_text() == "old" and users.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".metrics.json.tmp", "metrics.json"]
    monkeypatch.undo()
    run_folder.write_json_atomic(target, {"new": 1})  # written, with a plain file's mode, the user's file untouched
    assert json.loads(target.read_text()) == {"new": 1} and users.read_text() == "mine"
    assert target.stat().st_mode & 0o777 == 0o666 & ~run_folder._UMASK
