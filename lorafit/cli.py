"""The `lorafit` command line. Each command parses its options, loads the recipe, calls one run_* function and
hands the result to lorafit/render.py, which renders it or builds the --json object (`_execute`).

Heavy libraries (torch, transformers, peft, trl) are imported inside the run_* functions, so `--help`
and recipe errors are instant. Even the recipe schema is imported inside each command: building its pydantic
models is half of `import lorafit.cli` (~0.15 s), and `lorafit --help` needs none of it (budget: --help and
validate under 0.5 s, scripts/bench.py).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from lorafit import render
from lorafit.errors import EXIT_INTERRUPTED, EXIT_RUN_FAILED, LorafitError


app = typer.Typer(
    name="lorafit",
    help="LoRA / QLoRA fine-tuning from one YAML recipe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: section.key=value (repeatable).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks and library logs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON result object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the result and errors.")]
AllowCodeOpt = Annotated[bool, typer.Option(
    "--allow-code", help="Run Python files the recipe names (custom rewards: function: path.py:name). A recipe "
                         "alone never runs code.")]

Result = TypeVar("Result")


def _execute(work: Callable[[], Result | None], *, payload: Callable[[Result], dict[str, Any]],
             show: Callable[[Result], None], as_json: bool, debug: bool) -> Result | None:
    """Every command's one shape: `work` loads the recipe (where there is one) and calls the run_* function, then
    its result is printed as one JSON object (`payload`, with --json) or rendered (`show`). `work` returns None when
    there is nothing to report (a rank other than 0 under torchrun). Returns the result.

    User errors become one line on stderr and an exit code, bugs keep a traceback (--debug). With --json, a failure
    also prints one {"ok": false, ...} object on stdout, so CI always gets a result.
    """
    err = Console(stderr=True, highlight=False)
    _quiet_libraries(debug)
    try:
        result = work()
        if result is not None:
            if as_json:
                _print_json(payload(result))
            else:
                show(result)
        return result
    except LorafitError as exc:
        if debug:
            raise
        err.print(Text(f"error: {exc}", style="bold red"), soft_wrap=True)
        if as_json:
            _print_json({"ok": False, "error": str(exc), "where": exc.where, "hint": exc.hint,
                         "exit_code": exc.exit_code})
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print(Text("interrupted", style="bold red"))
        if as_json:
            _print_json({"ok": False, "error": "interrupted", "exit_code": EXIT_INTERRUPTED})
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if debug:
            raise
        message = f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        err.print(Text(message, style="bold red"))
        err.print("This is a lorafit bug or an unhandled case; re-run with --debug for the traceback and report it.")
        if as_json:
            _print_json({"ok": False, "error": message, "where": None,
                         "hint": "re-run with --debug for the traceback and report it", "exit_code": EXIT_RUN_FAILED})
        raise typer.Exit(EXIT_RUN_FAILED) from None


def _quiet_libraries(debug: bool) -> None:
    """Library chatter (deprecation notes, tqdm bars) hides what matters; --debug brings it back."""
    import logging
    import os
    import warnings

    if debug:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also silences transformers' "Loading weights" bar
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # bars no setting reaches, e.g. transformers' GGUF de-quantizing one
    warnings.filterwarnings("ignore")
    for name in ("transformers", "peft", "trl", "datasets", "accelerate", "torch", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _print_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


@app.command()
def train(
    recipe_path: RecipeArg,
    overrides: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check data and model, show samples, do not train.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run folder's last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished run in the output folder.")] = False,
    sweeps: Annotated[list[str] | None, typer.Option(
        "--sweep", help="Train a grid: KEY=V1,V2,... (repeatable; one run per combination, in "
                        "<output.dir>/<key=value,...>/).")] = None,
    allow_code: AllowCodeOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train the recipe's adapter: recipe -> base model -> LoRA/QLoRA -> the task's trainer -> runs/<name>/adapter."""
    console = Console(quiet=quiet or as_json, highlight=False)  # the live progress; --json keeps stdout for the result
    resume_command = _resume_command(recipe_path, overrides or [], sweeps or [], allow_code=allow_code)
    if sweeps:  # the grid's runs one after another, then the summary table (exit 2 if a run failed)

        def sweep():
            from lorafit.distributed import is_main_process
            from lorafit.sweep import run_sweep

            result = run_sweep(recipe_path, overrides or [], sweeps, console, dry_run=dry_run, resume=resume,
                               overwrite=overwrite, quiet=quiet or as_json, allow_code=allow_code,
                               resume_command=resume_command)
            return result if is_main_process() else None  # under torchrun / accelerate launch, rank 0 alone reports

        result = _execute(sweep, payload=render.sweep_payload, show=partial(render.show_sweep, quiet=quiet),
                          as_json=as_json, debug=debug)
        if result is not None and result.failed:
            raise typer.Exit(EXIT_RUN_FAILED)
        return

    def work():
        from lorafit.distributed import is_main_process
        from lorafit.recipe import load_recipe
        from lorafit.train import run_train

        result = run_train(load_recipe(recipe_path, overrides or []), console, dry_run=dry_run, resume=resume,
                           overwrite=overwrite, quiet=quiet or as_json, allow_code=allow_code,
                           resume_command=resume_command)
        return result if is_main_process() else None  # under torchrun / accelerate launch, rank 0 alone reports

    _execute(work, payload=render.train_payload, show=partial(render.show_train, console=console, quiet=quiet),
             as_json=as_json, debug=debug)


def _resume_command(recipe_path: Path, overrides: list[str], sweeps: list[str], *, allow_code: bool) -> str:
    """The command line shown when a run (or sweep) is interrupted: the same recipe, --set, --sweep, --allow-code,
    plus --resume."""
    return shlex.join(["lorafit", "train", str(recipe_path), *[arg for item in overrides for arg in ("--set", item)],
                       *[arg for item in sweeps for arg in ("--sweep", item)],
                       *(["--allow-code"] if allow_code else []), "--resume"])


@app.command()
def runs(
    folders: Annotated[list[Path] | None, typer.Argument(help="Folders holding run folders (searched below); "
                                                               "default: runs/.", show_default=False)] = None,
    sort: Annotated[str | None, typer.Option("--sort", help="Order by a column, best first: name, base, method, r, "
                                             "alpha, lr, steps, train_loss, eval_loss, eval_score, "
                                             "tokens_per_second, train_seconds, status.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw every listed run's train and eval loss "
                                                             "into this PNG file.")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """One row per run folder: base, method, r, lr, steps, losses, eval scores, tokens/s, time, status."""

    def work():
        from lorafit.runs import run_runs

        return run_runs(folders or [Path("runs")], sort=sort, plot=plot)  # (rows, the chart's warning)

    _execute(work, payload=lambda found: render.runs_payload(*found, plot=plot),
             show=lambda found: render.show_runs(*found, plot=plot, quiet=quiet), as_json=as_json, debug=debug)


@app.command()
def init(
    model: Annotated[str, typer.Argument(help="Base model: built-in alias, local folder or hub id.", show_default=False)],
    data: Annotated[str, typer.Argument(help="Training data file (or hub dataset id).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Recipe file to write.")] = Path("recipe.yaml"),
    name: Annotated[str | None, typer.Option("--name", help="Run name (default: the file name).")] = None,
    qlora: Annotated[bool, typer.Option("--qlora", help="Start from 4-bit QLoRA settings.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a commented starter recipe, detecting the data format and the model's target modules."""

    def work():
        from lorafit.starter import run_init

        return run_init(model, data, out, name=name, qlora=qlora, overwrite=overwrite)

    _execute(work, payload=render.init_payload, show=partial(render.show_init, quiet=quiet), as_json=as_json,
             debug=debug)


@app.command()
def validate(recipe_path: RecipeArg, overrides: SetOpt = None, as_json: JsonOpt = False, quiet: QuietOpt = False,
             debug: DebugOpt = False) -> None:
    """Check a recipe (schema, values, cross-field rules) without loading any model."""

    def work():
        from lorafit.recipe import load_recipe
        from lorafit.train import check_settings

        recipe = load_recipe(recipe_path, overrides or [])
        check_settings(recipe)
        return recipe

    _execute(work, payload=render.validate_payload, show=partial(render.show_validate, recipe_path=recipe_path,
                                                                 quiet=quiet), as_json=as_json, debug=debug)


@app.command("inspect-modules")
def inspect_modules(
    target: Annotated[str, typer.Argument(help="Model folder, hub id, built-in alias, or a recipe .yaml.",
                                          show_default=False)],
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """What can I target, and what will it cost? Module tree, presets, parameter counts, memory (config only)."""

    def work():
        from lorafit.inspect_modules import run_inspect

        return run_inspect(target, overrides or [])

    _execute(work, payload=render.inspect_payload, show=partial(render.show_inspect, quiet=quiet), as_json=as_json,
             debug=debug)


@app.command()
def merge(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the merged model (or adapter) into.",
                                      show_default=False)],
    adapter: Annotated[Path | None, typer.Argument(help="Adapter folder, e.g. runs/<name>/adapter.",
                                                   show_default=False)] = None,
    more: Annotated[list[str] | None, typer.Option(
        "--adapter", help="An adapter to combine, as PATH or PATH:WEIGHT (repeatable).")] = None,
    method: Annotated[str, typer.Option(help="How several adapters are combined: linear, cat, svd, ties, ties_svd, "
                                             "dare_linear, dare_ties, dare_*_svd, magnitude_prune(_svd).")] = "linear",
    density: Annotated[float, typer.Option(help="Share of weights kept by ties / dare_* / magnitude_prune.")] = 0.5,
    base: Annotated[str | None, typer.Option(help="Base model; default: the one recorded with the adapter.")] = None,
    base_weights: Annotated[str, typer.Option(
        "--base-weights", help="QLoRA adapters: merge into the original weights, the 4-bit round-tripped "
        "(dequantized) weights training saw, or auto: whichever matches the trained model better.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Dtype of the merged weights: auto (as the base is stored), "
                                            "float32, bfloat16, float16.")] = "auto",
    as_adapter: Annotated[bool, typer.Option("--as-adapter", help="Write the combined adapter instead of a "
                                                                  "merged model.")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Safetensors shard size.")] = "5GB",
    fmt: Annotated[str, typer.Option("--format", help="safetensors (a transformers model folder), gguf (one "
                                                      "model.gguf for llama.cpp / Ollama, plus a Modelfile) or "
                                                      "gguf-adapter (the LoRA alone, for --lora / ADAPTER).")
                   ] = "safetensors",
    quant: Annotated[str | None, typer.Option(help="GGUF weight type: f32, f16 (default), bf16, q8_0, q5_1, q5_0, "
                                                   "q4_1, q4_0 (adapters: f32, f16, bf16, q8_0).",
                                              show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous merge in --out.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Merge adapter(s) into a full model that plain transformers loads; verified against base+adapter."""

    def work():
        from lorafit.merge import MergeOptions, parse_adapter_spec, run_merge
        from lorafit.run_folder import sigterm_as_interrupt

        specs = ([parse_adapter_spec(str(adapter))] if adapter else []) + [parse_adapter_spec(s) for s in more or []]
        with sigterm_as_interrupt():  # `kill` stops it like Ctrl-C: exit 130, staging removed, --out as it was
            return run_merge(MergeOptions(specs, out, base=base, method=method, density=density,
                                          as_adapter=as_adapter, base_weights=base_weights, dtype=dtype,
                                          overwrite=overwrite, max_shard_size=max_shard_size, fmt=fmt, quant=quant))

    _execute(work, payload=render.merge_payload, show=partial(render.show_merge, quiet=quiet), as_json=as_json,
             debug=debug)


@app.command("eval")
def eval_command(
    recipe_path: RecipeArg,
    adapters: Annotated[list[Path], typer.Option("--adapter", help="Adapter folder to compare with the base "
                                                                   "(repeatable).", show_default=False)],
    data: Annotated[Path | None, typer.Option("--data", help="Eval file; default: the recipe's data.eval.")] = None,
    samples: Annotated[int | None, typer.Option("--samples", help="Use only the first N eval rows.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", help="Generation length; default: the longest reference + 16 tokens.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per forward pass.")] = 8,
    out: Annotated[Path | None, typer.Option("--out", help="Where report.json and samples.jsonl go; "
                                                           "default: <run dir>/eval.")] = None,
    benchmarks: Annotated[list[str] | None, typer.Option(
        "--benchmark", help="Also run lm-evaluation-harness tasks on the base and each adapter: names and/or task "
                            "YAML files, comma-separated (repeatable); needs lorafit[bench].")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="--benchmark: score the first N documents of each "
                                                              "task.")] = None,
    overrides: SetOpt = None,
    allow_code: AllowCodeOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Base vs adapter(s), side by side: loss, perplexity, exact match, ROUGE-L (classifiers: accuracy, F1)."""

    def work():
        from lorafit.evaluate import run_eval
        from lorafit.recipe import load_recipe
        from lorafit.run_folder import sigterm_as_interrupt

        recipe = load_recipe(recipe_path, overrides or [])
        with sigterm_as_interrupt():  # `kill` stops it like Ctrl-C: exit 130, staging removed, --out as it was
            return run_eval(recipe, list(adapters), data_file=data, samples=samples, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, out_dir=out, allow_code=allow_code, benchmarks=benchmarks,
                            limit=limit)

    _execute(work, payload=render.eval_payload, show=partial(render.show_eval, quiet=quiet), as_json=as_json,
             debug=debug)


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(help="A run folder (runs/<name>) or a `lorafit merge` output folder.",
                                           show_default=False)],
    repo: Annotated[str, typer.Option("--repo", help="Hub repo to upload to: user/name or org/name.",
                                      show_default=False)],
    what: Annotated[str, typer.Option("--what", help="adapter (a run folder), merged or gguf (a merge output "
                                                     "folder).")] = "adapter",
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    base_model: Annotated[str | None, typer.Option(
        "--base-model", help="The base model's hub id, when the run trained on a local folder.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List and check the files; upload nothing.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Share an adapter (or merged model, or GGUF) on the Hugging Face Hub with its model card, in one commit."""

    def work():
        from lorafit.push import run_push

        return run_push(folder, repo, what=what, private=private, dry_run=dry_run, base_model=base_model)

    _execute(work, payload=render.push_payload, show=partial(render.show_push, quiet=quiet), as_json=as_json,
             debug=debug)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
