"""The `lorafit` command line. Thin: parse options, load the recipe, call one run_* function, render.

Heavy libraries (torch, transformers, peft, trl) are imported inside the run_* functions, so `--help`
and recipe errors are instant.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lorafit.errors import EXIT_INTERRUPTED, EXIT_RUN_FAILED, LorafitError
from lorafit.recipe import dump_recipe, load_recipe

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


def _execute(work: Callable[[], Any], *, debug: bool) -> Any:
    """Run a command body; user errors become one line on stderr and an exit code, bugs keep a traceback."""
    err = Console(stderr=True, highlight=False)
    _quiet_libraries(debug)
    try:
        return work()
    except LorafitError as exc:
        if debug:
            raise
        err.print(Text(f"error: {exc}", style="bold red"), soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print(Text("interrupted", style="bold red"))
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if debug:
            raise
        err.print(Text(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                       style="bold red"))
        err.print("This is a lorafit bug or an unhandled case; re-run with --debug for the traceback and report it.")
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
    warnings.filterwarnings("ignore")
    for name in ("transformers", "peft", "trl", "datasets", "accelerate", "torch"):
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
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train an adapter: recipe -> model -> LoRA/QLoRA -> SFT -> runs/<name>/adapter."""

    def work() -> None:
        from lorafit.train import run_train

        console = Console(quiet=quiet or as_json, highlight=False)
        recipe = load_recipe(recipe_path, overrides or [])
        result = run_train(recipe, console, dry_run=dry_run, resume=resume, overwrite=overwrite,
                           quiet=quiet or as_json)
        if as_json:
            _print_json(_train_payload(result, recipe))
            return
        if dry_run:
            _render_dry_run(console, result, dump_recipe(recipe))
        else:
            _render_train(console, result)

    _execute(work, debug=debug)


@app.command()
def validate(recipe_path: RecipeArg, overrides: SetOpt = None, debug: DebugOpt = False) -> None:
    """Check a recipe (schema, values, files named) without loading any model."""

    def work() -> None:
        recipe = load_recipe(recipe_path, overrides or [])
        Console(highlight=False).print(f"[green]ok[/green] {recipe_path}: recipe '{recipe.name}' is valid")

    _execute(work, debug=debug)


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
                 "eos_trained": result.report.eos_trained},
        "notes": result.notes,
        "metrics": result.metrics,
    }


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
    table.add_row("supervised tokens", f"{report.trained_tokens:,} of {report.total_tokens:,} "
                  f"({100 * report.supervised_share:.1f}%)")
    table.add_row("end-of-turn trained", f"{'yes' if report.eos_trained else 'NO'} ({report.eos_token!r})")
    console.print(table)
    for i, sample in enumerate(report.samples, start=1):
        console.rule(f"sample {i}: [reverse] trained tokens [/reverse] highlighted")
        console.print(_highlight_trained(sample))
    console.print("[dim]dry run: nothing was trained or written[/dim]")


def _highlight_trained(pieces: list[tuple[str, bool]]) -> Text:
    text = Text()
    for piece, trained in pieces:
        text.append(piece, style="reverse" if trained else "")
    return text


def _render_train(console: Console, result) -> None:
    m = result.metrics
    _render_notes(console, result)
    table = Table(title=f"run {m['name']}", show_header=False)
    table.add_row("adapter", str(result.run_dir / "adapter"))
    table.add_row("steps", str(m["global_step"]))
    table.add_row("train loss (last log)", _fmt(m.get("train_loss_final")))
    table.add_row("eval loss", _fmt(m.get("eval_loss")))
    table.add_row("tokens/s", f"{m['tokens_per_second']:,.0f}" if m.get("tokens_per_second") else "-")
    table.add_row("train time", f"{m['train_seconds']:.1f} s (wall {m['wall_seconds']:.1f} s)")
    table.add_row("peak memory", f"{m['peak_memory_mb']:,.0f} MiB")
    table.add_row("trainable params", f"{m['trainable_params']:,}")
    console.print(table)


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
