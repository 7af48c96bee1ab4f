"""The `lorafit` command line. Thin: parse options, load the recipe, call one run_* function, render.

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
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

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


def _execute(work: Callable[[], Any], *, debug: bool, as_json: bool = False) -> Any:
    """Run a command body; user errors become one line on stderr and an exit code, bugs keep a traceback.

    With --json, a failure also prints one {"ok": false, ...} object on stdout, so CI always gets a result.
    """
    err = Console(stderr=True, highlight=False)
    _quiet_libraries(debug)
    try:
        return work()
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
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train an adapter: recipe -> model -> LoRA/QLoRA -> SFT (or a classifier) -> runs/<name>/adapter."""
    if sweeps:
        _train_sweep(recipe_path, overrides or [], sweeps, dry_run=dry_run, resume=resume, overwrite=overwrite,
                     as_json=as_json, quiet=quiet, debug=debug)
        return

    def work() -> None:
        from lorafit.models import is_main_process
        from lorafit.recipe import dump_recipe, load_recipe
        from lorafit.train import run_train

        console = Console(quiet=quiet or as_json, highlight=False)
        recipe = load_recipe(recipe_path, overrides or [])
        resume_command = shlex.join(["lorafit", "train", str(recipe_path),
                                     *[arg for item in overrides or [] for arg in ("--set", item)], "--resume"])
        result = run_train(recipe, console, dry_run=dry_run, resume=resume, overwrite=overwrite,
                           quiet=quiet or as_json, resume_command=resume_command)
        if not is_main_process():
            return  # under torchrun / accelerate launch, rank 0 alone reports
        if as_json:
            _print_json(_train_payload(result, recipe))
            return
        if dry_run:
            _render_dry_run(console, result, dump_recipe(result.recipe or recipe))
        else:  # --quiet still prints the run summary: it is the result
            _render_train(Console(highlight=False) if quiet else console, result, quiet=quiet)

    _execute(work, debug=debug, as_json=as_json)


def _train_sweep(recipe_path: Path, overrides: list[str], sweeps: list[str], *, dry_run: bool, resume: bool,
                 overwrite: bool, as_json: bool, quiet: bool, debug: bool) -> None:
    """`train --sweep`: the grid's runs one after another, then the summary table (exit 2 if a run failed)."""

    def work():
        from lorafit.sweep import run_sweep

        console = Console(quiet=quiet or as_json, highlight=False)
        resume_command = shlex.join(["lorafit", "train", str(recipe_path),
                                     *[arg for item in overrides for arg in ("--set", item)],
                                     *[arg for item in sweeps for arg in ("--sweep", item)], "--resume"])
        return run_sweep(recipe_path, overrides, sweeps, console, dry_run=dry_run, resume=resume,
                         overwrite=overwrite, quiet=quiet or as_json, resume_command=resume_command)

    result = _execute(work, debug=debug, as_json=as_json)
    from lorafit.models import is_main_process

    if not is_main_process():
        return  # under torchrun / accelerate launch, rank 0 alone reports
    failed = result.failed
    failure = (f"{len(failed)} of {len(result.runs)} sweep runs failed: "
               + "; ".join(f"{run.name}: {run.error}" for run in failed)) if failed else None
    if as_json:
        _print_json(_sweep_payload(result, failure))
    else:
        _render_sweep(Console(highlight=False), result, quiet=quiet)
    if failure:
        if not as_json:
            Console(stderr=True, highlight=False).print(Text(f"error: {failure}", style="bold red"), soft_wrap=True)
        raise typer.Exit(EXIT_RUN_FAILED)


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

    def work() -> None:
        from lorafit.runs import as_json as run_json
        from lorafit.runs import run_runs

        rows, warning = run_runs(folders or [Path("runs")], sort=sort, plot=plot)
        if as_json:
            _print_json({"command": "runs", "ok": True, "runs": [run_json(row) for row in rows],
                         "plot": str(plot) if plot and not warning else None,
                         "notes": [warning] if warning else []})
            return
        console = Console(highlight=False)
        _render_runs(console, rows, quiet=quiet)
        if warning:
            Console(stderr=True, highlight=False).print(Text(warning, style="yellow"))
        elif plot and not quiet:
            console.print(f"[dim]chart: {plot}[/dim]")

    _execute(work, debug=debug, as_json=as_json)


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

    def work() -> None:
        from lorafit.starter import run_init

        result = run_init(model, data, out, name=name, qlora=qlora, overwrite=overwrite)
        if as_json:
            _print_json({"command": "init", "ok": True, **asdict(result), "path": str(result.path)})
            return
        console = Console(highlight=False)
        for note in [] if quiet else result.notes:
            console.print(Text(note, style="yellow"))
        console.print(f"[green]wrote[/green] {result.path}: data format {result.data_format}, target_modules "
                      f"{result.target_modules}" + (f" ({', '.join(result.resolved_targets)})"
                                                    if result.resolved_targets else ""))
        if not quiet:
            console.print(f"next: lorafit train {result.path} --dry-run")

    _execute(work, debug=debug, as_json=as_json)


@app.command()
def validate(recipe_path: RecipeArg, overrides: SetOpt = None, as_json: JsonOpt = False, quiet: QuietOpt = False,
             debug: DebugOpt = False) -> None:
    """Check a recipe (schema, values, cross-field rules) without loading any model."""

    def work() -> None:
        from lorafit.recipe import load_recipe
        from lorafit.train import check_settings

        recipe = load_recipe(recipe_path, overrides or [])
        check_settings(recipe)
        if as_json:
            _print_json({"command": "validate", "ok": True, "recipe": recipe.model_dump(mode="json")})
        elif not quiet:  # the exit code is the result
            Console(highlight=False).print(f"[green]ok[/green] {recipe_path}: recipe '{recipe.name}' is valid")

    _execute(work, debug=debug, as_json=as_json)


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

    def work() -> None:
        from lorafit.inspect_modules import run_inspect

        result = run_inspect(target, overrides or [])
        if as_json:
            _print_json({"command": "inspect-modules", "ok": True, **asdict(result),
                         "trainable_percent": result.trainable_percent})
        else:
            _render_inspect(Console(highlight=False), result, quiet=quiet)

    _execute(work, debug=debug, as_json=as_json)


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

    def work() -> None:
        from lorafit.merge import parse_adapter_spec, run_merge
        from lorafit.run_folder import sigterm_as_interrupt

        specs = ([parse_adapter_spec(str(adapter))] if adapter else []) + [parse_adapter_spec(s) for s in more or []]
        with sigterm_as_interrupt():  # `kill` stops it like Ctrl-C: exit 130, staging removed, --out as it was
            result = run_merge(specs, out, base=base, method=method, density=density, as_adapter=as_adapter,
                               base_weights=base_weights, dtype=dtype, overwrite=overwrite,
                               max_shard_size=max_shard_size, fmt=fmt, quant=quant)
        if as_json:
            _print_json({"command": "merge", "ok": True, **asdict(result)})
        else:
            _render_merge(Console(highlight=False), result, quiet=quiet)

    _execute(work, debug=debug, as_json=as_json)


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
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Base vs adapter(s), side by side: loss, perplexity, exact match, ROUGE-L (classifiers: accuracy, F1)."""

    def work() -> None:
        from lorafit.evaluate import run_eval
        from lorafit.recipe import load_recipe
        from lorafit.run_folder import sigterm_as_interrupt

        recipe = load_recipe(recipe_path, overrides or [])
        with sigterm_as_interrupt():  # `kill` stops it like Ctrl-C: exit 130, staging removed, --out as it was
            result = run_eval(recipe, list(adapters), data_file=data, samples=samples,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, out_dir=out)
        if as_json:
            payload = {key: value for key, value in asdict(result).items() if key != "samples"}
            _print_json({"command": "eval", "ok": True, **payload})
        else:
            _render_eval(Console(highlight=False), result, quiet=quiet)

    _execute(work, debug=debug, as_json=as_json)


# ----------------------------------------------------------------------------------------------------
# Rendering


def _train_payload(result, recipe) -> dict[str, Any]:
    return {
        "command": "train",
        "ok": True,
        "dry_run": result.dry_run,
        "run_dir": str(result.run_dir),
        "adapter": None if result.dry_run else str(result.run_dir / "adapter"),
        "precision": result.precision.name,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "target_modules": result.target_modules,
        "data": {"format": result.report.format, "template": result.report.template,
                 "train_examples": result.report.train_examples, "eval_examples": result.report.eval_examples,
                 "dropped": dict(result.report.dropped), "supervised_token_share": result.report.supervised_share,
                 "eos_trained": result.report.eos_trained, "cache": getattr(result.report, "cache", None),
                 "cache_path": getattr(result.report, "cache_path", None),
                 "prepare_seconds": getattr(result.report, "prepare_seconds", None),
                 **({"sources": result.report.sources} if getattr(result.report, "sources", None) else {}),
                 **({"label_counts": result.report.label_counts} if result.report.label_counts else {}),
                 **({"token_lengths": result.report.token_lengths, "truncated": result.report.truncated}
                    if hasattr(result.report, "token_lengths") else {})},
        "notes": result.notes,
        "metrics": result.metrics.as_json() if result.metrics else {},
    }


def _sweep_payload(result, failure: str | None) -> dict[str, Any]:
    payload = {"command": "train", "ok": failure is None, "sweep": True, "dry_run": result.dry_run,
               "sweep_dir": str(result.sweep_dir), "axes": result.axes, "best": result.best,
               "summary": str(result.summary_path) if result.summary_path else None,
               "runs": [{"name": run.name, "run_dir": str(run.run_dir), "values": run.values,
                         "found": run.before, "plan": run.plan, "status": run.status, "error": run.error, "steps": run.steps,
                         "train_loss": run.train_loss, "eval_loss": run.eval_loss,
                         "tokens_per_second": run.tokens_per_second, "train_seconds": run.train_seconds}
                        for run in result.runs]}
    if failure:
        payload.update(error=failure, exit_code=EXIT_RUN_FAILED)
    return payload


def _render_sweep(console: Console, result, *, quiet: bool = False) -> None:
    """The grid, one row per run (its name holds its values); a dry run says what each run would do."""
    from lorafit.sweep import cell  # the same cells as sweep.md
    title = f"sweep {result.sweep_dir}: {len(result.runs)} runs over {', '.join(result.axes)}"
    table = Table(title=title, title_justify="left")
    if result.dry_run:
        for column in ("run", "will", "values"):
            table.add_column(column)
        for run in result.runs:
            table.add_row(run.name, run.plan, ", ".join(f"{k}={cell(v)}" for k, v in run.values.items()))
        console.print(table)
        console.print("[dim]dry run: nothing was trained or written[/dim]")
        return
    for column in ("run", "status", "steps", "train loss", "eval loss", "tok/s", "time"):
        table.add_column(column, justify="left" if column in ("run", "status") else "right")
    for run in result.runs:
        style = {"failed": "red", "interrupted": "yellow", "pending": "dim"}.get(run.status, "")
        table.add_row(run.name + (" *" if run.name == result.best else ""), run.status, cell(run.steps),
                      _fmt(run.train_loss), _fmt(run.eval_loss),
                      f"{run.tokens_per_second:,.0f}" if run.tokens_per_second else "-",
                      f"{run.train_seconds:.1f} s" if run.train_seconds else "-",
                      style=style or ("bold" if run.name == result.best else ""))
    console.print(table)
    if not quiet and result.best:
        console.print(f"[dim]* best (lowest eval loss, else train loss): {result.best}[/dim]")
    if not quiet and result.summary_path:
        console.print(f"[dim]summary: {result.summary_path}, {result.table_path}; compare: lorafit runs "
                      f"{result.sweep_dir} --plot {result.sweep_dir / 'sweep.png'}[/dim]")


def _render_runs(console: Console, rows, *, quiet: bool = False) -> None:
    from lorafit.sweep import cell  # the same cells as the sweep table

    if not rows:
        console.print("no run folders found")
        return
    if not console.is_terminal:  # piped or redirected: whole values beat a table cut to 80 columns
        console.width = max(console.width, 160)
    table = Table(title=None if quiet else f"{len(rows)} run{'s' if len(rows) != 1 else ''}", title_justify="left")
    for column in ("run", "base", "method", "r", "alpha", "lr", "steps", "train loss", "eval loss", "eval",
                   "tok/s", "time", "status"):
        table.add_column(column, justify="left" if column in ("run", "base", "method", "status") else "right")
    short_metric = {"exact_match": "EM", "accuracy": "acc"}
    for row in rows:
        score = "-" if row.eval_score is None else f"{_pct(row.eval_score)} {short_metric.get(row.eval_metric, '')}"
        steps = cell(row.steps) + (f"/{row.max_steps}" if row.status != "finished" and row.max_steps else "")
        style = {"failed": "red", "interrupted": "yellow", "running": "cyan"}.get(row.status, "")
        table.add_row(row.name, _short_base(row.base), cell(row.method), cell(row.r), cell(row.alpha),
                      cell(row.lr), steps, _fmt(row.train_loss), _fmt(row.eval_loss), score,
                      f"{row.tokens_per_second:,.0f}" if row.tokens_per_second else "-",
                      f"{row.train_seconds:.0f} s" if row.train_seconds else "-", row.status, style=style)
    console.print(table)


def _short_base(base: str | None) -> str:
    """A local model folder by its name; hub ids and aliases as they are."""
    if not base:
        return "-"
    return Path(base).name if base.startswith(("/", "./", "../", "~")) else base


def _render_notes(console: Console, result) -> None:
    for note in result.notes:
        style = "yellow" if note.startswith(("warning", "data:")) else "dim"
        console.print(Text(note, style=style))


def _render_dry_run(console: Console, result, recipe_yaml: str) -> None:
    report = result.report
    console.rule("resolved recipe")
    console.print(Text(recipe_yaml))
    console.rule("check")
    _render_notes(console, result)
    table = Table(show_header=False, box=None)
    table.add_row("trainable parameters", f"{result.trainable_params:,} of {result.total_params:,} "
                  f"({100 * result.trainable_params / max(result.total_params, 1):.3f}%)")
    table.add_row("target modules", ", ".join(result.target_modules) or "-")
    table.add_row("data", f"{report.train_examples} train / {report.eval_examples} eval examples, format "
                  f"{report.format}, template {report.template}")
    table.add_row("dropped rows", ", ".join(f"{n} {why}" for why, n in report.dropped.items()) or "none")
    if report.label_counts:  # sequence classification: one label per row, no supervised tokens or end-of-turn
        table.add_row("classes", ", ".join(f"{name} ({n} rows)" for name, n in report.label_counts.items()))
        table.add_row("tokens", f"{report.total_tokens:,} in the training rows")
    elif getattr(report, "token_lengths", None):  # preference tasks: both answers are scored
        table.add_row("answer tokens scored", f"{report.trained_tokens:,} of {report.total_tokens:,}")
        table.add_row("token lengths", ", ".join(f"{side} mean {v['mean']:g} / max {v['max']}"
                                                 for side, v in report.token_lengths.items()))
        table.add_row("end-of-turn scored", f"{'yes' if report.eos_trained else 'NO'} ({report.eos_token!r})")
    else:
        table.add_row("supervised tokens", f"{report.trained_tokens:,} of {report.total_tokens:,} "
                      f"({100 * report.supervised_share:.1f}%)")
        table.add_row("end-of-turn trained", f"{'yes' if report.eos_trained else 'NO'} ({report.eos_token!r})")
    console.print(table)
    what = "[reverse] label [/reverse] it learns" if report.label_counts else "[reverse] trained tokens [/reverse]"
    for i, sample in enumerate(report.samples, start=1):
        console.rule(f"sample {i}: {what} highlighted")
        console.print(_highlight_trained(sample))
    console.print("[dim]dry run: nothing was trained or written[/dim]")


def _highlight_trained(pieces: list[tuple[str, bool]]) -> Text:
    text = Text()
    for piece, trained in pieces:
        text.append(piece, style="reverse" if trained else "")
    return text


def _render_train(console: Console, result, *, quiet: bool = False) -> None:
    m = result.metrics
    if not quiet:
        _render_notes(console, result)
    table = Table(title=f"run {m.name}", show_header=False)
    table.add_row("adapter", str(result.run_dir / "adapter"))
    table.add_row("steps", str(m.global_step))
    table.add_row("train loss (last log)", _fmt(m.train_loss_final))
    table.add_row("eval loss", _fmt(m.eval_loss))
    if m.labels is not None:  # sequence classification
        table.add_row("eval accuracy / macro-F1", f"{_pct(m.eval_accuracy)} / {_pct(m.eval_f1)}")
    if m.preference is not None:  # preference tasks: the rewards TRL logs, train (last log) and eval
        p = m.preference
        for side in ("", "eval_"):
            table.add_row(f"{'eval' if side else 'train'} rewards chosen / rejected / margin",
                          f"{_fmt(p.get(side + 'rewards/chosen'))} / {_fmt(p.get(side + 'rewards/rejected'))} / "
                          f"{_fmt(p.get(side + 'rewards/margins'))}")
        if p.get("eval_rewards/accuracies") is not None:
            table.add_row("eval reward accuracy", _pct(p["eval_rewards/accuracies"]))
        if p.get("eval_nll_loss") is not None:  # orpo: its loss is the chosen answers' NLL + beta x odds-ratio term
            table.add_row("eval NLL (chosen) / log odds ratio",
                          f"{_fmt(p['eval_nll_loss'])} / {_fmt(p.get('eval_log_odds_chosen'))}")
    table.add_row("tokens/s", f"{m.tokens_per_second:,.0f}" if m.tokens_per_second else "-")
    table.add_row("train time", f"{m.train_seconds:.1f} s (wall {m.wall_seconds:.1f} s)")
    table.add_row("peak memory", f"{m.peak_memory_mb:,.0f} MiB")
    table.add_row("trainable params", f"{m.trainable_params:,}")
    console.print(table)


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:.0f} B"


def _render_inspect(console: Console, result, *, quiet: bool = False) -> None:
    """The module table, presets, the adapter's trainable count and the memory estimate; --quiet: the count only."""
    if quiet:
        _render_trainable(console, result)
        return
    summary = result.config_summary
    console.print(f"[bold]{result.architecture}[/bold] from {result.source}: {summary['layers']} layers, hidden "
                  f"{summary['hidden_size']}, vocab {summary['vocab_size']} [dim](config only, no weights read: "
                  f"{result.seconds:.1f} s)[/dim]")
    table = Table(title="modules, layer indices as * (LoRA: eligible / [green]targeted[/green] by the adapter / "
                  "[cyan]trained fully[/cyan]: modules_to_save)",
                  title_justify="left")
    table.add_column("module", overflow="fold")
    table.add_column("type", overflow="fold")
    table.add_column("shape")
    table.add_column("count", justify="right")
    table.add_column("params", justify="right")
    table.add_column("LoRA")
    table.add_column("in presets")
    for g in result.groups:
        lora = "[bold green]targeted[/bold green]" if g.targeted else "eligible" if g.eligible else ""
        lora = "[bold cyan]trained fully[/bold cyan]" if g.saved else lora  # modules_to_save
        table.add_row(g.pattern, g.kind, g.shape, str(g.count), f"{g.params_each * g.count:,}", lora,
                      ", ".join(g.presets))
    console.print(table)
    for preset, names in result.presets.items():
        matched = ", ".join(names) or "[yellow](matches nothing here)[/yellow]"
        console.print(f"  preset [bold]{preset}[/bold] -> {matched}")
    a = result.adapter
    rank = f"init_r={a['init_r']} target_r={a['target_r']}" if a["method"] == "adalora" else f"r={a['r']}"
    console.print(f"adapter ({result.adapter_source}): {a['method']} {rank} alpha={a['alpha']:g} "
                  f"target_modules={a['target_modules']} -> {', '.join(result.target_modules) or '-'}")
    if result.modules_to_save:
        console.print(f"modules_to_save (trained fully, saved with the adapter): {', '.join(result.modules_to_save)}")
    _render_trainable(console, result)
    tokens = result.memory[0].tokens if result.memory else 0
    table = Table(title=f"training memory, ESTIMATE: micro-batch of {tokens:,} tokens; excludes framework overhead",
                  title_justify="left")
    for column in ("setup", "weights", "adapter+grads+optim", "activations", "total"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for m in result.memory:
        label = f"{m.setup} {m.precision}{' +ckpt' if m.gradient_checkpointing else ''}"
        label += " [bold](this machine)[/bold]" if m.this_machine else ""
        table.add_row(label, _bytes(m.weights), _bytes(m.adapter_states),
                      f"{_bytes(m.activations_per_token * m.tokens)} ({_bytes(m.activations_per_token)}/tok)",
                      f"[bold]{_bytes(m.total)}[/bold]")
    console.print(table)
    for note in result.notes:
        console.print(Text(note, style="dim"))


def _render_trainable(console: Console, result) -> None:
    console.print(f"trainable parameters (counted by PEFT): [bold]{result.trainable_params:,}[/bold] of "
                  f"{result.total_params:,} ({result.trainable_percent:.4f}%); "
                  f"adapter file ~{_bytes(result.adapter_file_bytes)}")


def _render_merge(console: Console, result, *, quiet: bool = False) -> None:
    for note in [] if quiet else result.notes + (result.gguf.notes if result.gguf else []):
        console.print(Text(note, style="yellow"))
    what = "GGUF adapter" if result.format == "gguf-adapter" else "combined adapter" if result.as_adapter else (
        "merged model")
    table = Table(title=f"{what} -> {result.out_dir}",
                  show_header=False, title_justify="left")
    table.add_row("base", result.base)
    table.add_row("adapters", ", ".join(f"{a['path']} x{a['weight']:g}" for a in result.adapters)
                  + (f" ({result.method})" if result.method else ""))
    if not result.as_adapter:
        table.add_row("base weights", f"{result.base_weights} - {result.base_weights_reason}")
    for name, diff in result.qlora_fidelity.items():
        table.add_row(f"vs trained QLoRA ({name})", f"max logit diff {diff:.4g}")
    table.add_row("dtype", result.dtype)
    table.add_row("verification", f"max logit diff {result.max_logit_diff:.3g} vs base+adapter (tolerance "
                  f"{result.tolerance:.3g}; the adapter moves logits by up to {result.adapter_effect:.3g}) on "
                  f"{result.prompts} prompts, top-1 agreement {100 * result.top1_agreement:.1f}%  [green]ok[/green]")
    if result.format == "gguf-adapter":
        report = result.gguf
        table.add_row("GGUF adapter", f"{report.file}: {report.quant}, {report.size_bytes / 2**20:,.2f} MiB, "
                      f"{report.tensors} LoRA pairs, alpha {report.alpha:g}; needs the base {report.base}")
        checked = ("; llama.cpp with the base: max logit diff " + f"{report.llama_cpp_max_logit_diff:.3g}"
                   if report.llama_cpp_max_logit_diff is not None else "")
        table.add_row("GGUF check", f"applied to the base: max logit diff {report.max_logit_diff:.3g} vs base+adapter "
                      f"(tolerance {report.tolerance:.3g}), top-1 agreement {100 * report.top1_agreement:.1f}%"
                      f"{checked}  [green]ok[/green]")
    elif result.gguf is not None:
        report = result.gguf
        table.add_row("GGUF", f"{report.file}: {report.quant}, {report.size_bytes / 2**20:,.1f} MiB, "
                      f"{report.architecture}, tokenizer {report.tokenizer_model}/{report.tokenizer_pre}, stops on "
                      f"{', '.join(report.stop)}")
        table.add_row("GGUF check", f"read back with {' and '.join(report.verified_with)}: {report.texts_checked} "
                      f"texts tokenized identically; max logit diff {report.max_logit_diff:.3g} (tolerance "
                      f"{report.tolerance:.3g}), top-1 agreement {100 * report.top1_agreement:.1f}%  [green]ok[/green]")
        for row in (report.llama_cpp or {}).get("greedy", [])[:3]:
            table.add_row("llama.cpp greedy", f"...{row['prompt'][-30:]!r} -> {row['llama_cpp']!r} (merged model: "
                          f"{row['merged_model']!r})")
    table.add_row("files", ", ".join(result.files))
    table.add_row("peak memory", f"{result.peak_memory_mb:,.0f} MiB")
    table.add_row("time", f"{result.seconds:.1f} s")
    console.print(table)


def _render_eval(console: Console, result, *, quiet: bool = False) -> None:
    """Notes, the scores table and three samples; --quiet: the scores table only."""
    for note in [] if quiet else result.notes:
        console.print(Text(note, style="yellow" if note.startswith("warning") else "dim"))
    if result.labels is not None:
        _render_classification_eval(console, result, quiet=quiet)
        return
    table = Table(title=f"{result.recipe}: {result.examples} eval rows from {result.data}", title_justify="left")
    for column in ("model", "loss", "perplexity", "exact match", "norm. exact match", "ROUGE-L", "time"):
        table.add_column(column, justify="left" if column == "model" else "right")
    pct = lambda v: f"{100 * v:.1f}%" if isinstance(v, float) else "-"  # noqa: E731
    for s in result.scores:
        table.add_row(s.name, _fmt(s.loss), f"{s.perplexity:.2f}" if s.perplexity else "-", pct(s.exact_match),
                      pct(s.normalized_exact_match), pct(s.rouge_l), f"{s.seconds:.1f} s")
    console.print(table)
    if any(s.preference for s in result.scores):  # preference tasks: the held-out pairs
        _render_preferences(console, result.scores)
    if quiet:
        return
    for row in result.samples[:3]:
        console.rule(style="dim")
        console.print(Text(f"prompt: {row['prompt']!r}\nreference: {row['reference']!r}", style="dim"))
        for s in result.scores:
            if s.name in row:
                console.print(Text(f"{s.name}: {row[s.name]!r}"))
    console.print(f"[dim]report: {result.report_path}; all generations: {result.samples_path}"
                  + (f"; chart: {result.chart_path}" if result.chart_path else "") + "[/dim]")


def _render_preferences(console: Console, scores) -> None:
    table = Table(title=f"preferences on {scores[0].preference.pairs} held-out pairs (reward: "
                  f"{scores[0].preference.reward})", title_justify="left")
    for column in ("model", "prefers chosen", "log-prob margin", "reward accuracy", "reward margin"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for s in scores:
        p = s.preference
        table.add_row(s.name, _pct(p.pair_accuracy), _fmt(p.logp_margin), _pct(p.reward_accuracy),
                      _fmt(p.reward_margin))
    console.print(table)


def _render_classification_eval(console: Console, result, *, quiet: bool = False) -> None:
    table = Table(title=f"{result.recipe}: {result.examples} eval rows from {result.data}, classes "
                  f"{', '.join(result.labels)}", title_justify="left")
    for column in ("model", "loss", "accuracy", "macro-F1", "correct per class", "time"):
        table.add_column(column, justify="left" if column in ("model", "correct per class") else "right")
    for s in result.scores:
        per_class = ", ".join(f"{name} {c['correct']}/{c['rows']}" for name, c in (s.per_class or {}).items())
        table.add_row(s.name, _fmt(s.loss), _pct(s.accuracy), _pct(s.f1), per_class, f"{s.seconds:.1f} s")
    console.print(table)
    if quiet:
        return
    for row in result.samples[:3]:
        console.rule(style="dim")
        console.print(Text(f"text: {row['text']!r}\nreference: {row['reference']}", style="dim"))
        console.print(Text("  ".join(f"{s.name}: {row[s.name]}" for s in result.scores if s.name in row)))
    console.print(f"[dim]report: {result.report_path}; every row's predictions: {result.samples_path}"
                  + (f"; chart: {result.chart_path}" if result.chart_path else "") + "[/dim]")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
