"""What each command shows: the tables and lines a person reads, and the one object `--json` prints.

cli.py runs a command and hands its result here: `<command>_payload(result)` is the JSON object,
`show_<command>(result, ...)` renders it with rich. Results arrive as values; nothing here imports torch or
transformers, so `lorafit --help` stays instant.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lorafit.errors import EXIT_RUN_FAILED

if TYPE_CHECKING:
    from lorafit.benchmark import BenchmarkRow
    from lorafit.evaluate import EvalResult, Scores
    from lorafit.inspect_modules import InspectResult
    from lorafit.merge import MergeResult
    from lorafit.push import PushResult
    from lorafit.recipe import Recipe
    from lorafit.runs import RunInfo
    from lorafit.starter import StarterResult
    from lorafit.sweep import SweepResult
    from lorafit.train import TrainResult


# ----------------------------------------------------------------------------------------------------
# --json: one object per command on stdout

def train_payload(result: TrainResult) -> dict[str, Any]:
    """`train --json` (also --dry-run): the run folder, parameter counts, the data report, notes, metrics."""
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


def sweep_payload(result: SweepResult) -> dict[str, Any]:
    """`train --sweep --json`: one entry per grid point; ok is false (exit 2) when a run failed."""
    failure = sweep_failure(result)
    payload = {"command": "train", "ok": failure is None, "sweep": True, "dry_run": result.dry_run,
               "sweep_dir": str(result.sweep_dir), "axes": result.axes, "best": result.best,
               "summary": str(result.summary_path) if result.summary_path else None,
               "runs": [{"name": run.name, "run_dir": str(run.run_dir), "values": run.values,
                         "found": run.before, "plan": run.plan, "status": run.status, "error": run.error,
                         "steps": run.steps, "train_loss": run.train_loss, "eval_loss": run.eval_loss,
                         "tokens_per_second": run.tokens_per_second, "train_seconds": run.train_seconds}
                        for run in result.runs]}
    if failure:
        payload.update(error=failure, exit_code=EXIT_RUN_FAILED)
    return payload


def sweep_failure(result: SweepResult) -> str | None:
    """The one-line error of a sweep in which runs failed; None when none did."""
    failed = result.failed
    return (f"{len(failed)} of {len(result.runs)} sweep runs failed: "
            + "; ".join(f"{run.name}: {run.error}" for run in failed)) if failed else None


def runs_payload(rows: list[RunInfo], warning: str | None, *, plot: Path | None) -> dict[str, Any]:
    """`runs --json`: one object per run folder, the chart drawn (or None) and the chart's warning as a note."""
    from lorafit.runs import as_json

    return {"command": "runs", "ok": True, "runs": [as_json(row) for row in rows],
            "plot": str(plot) if plot and not warning else None, "notes": [warning] if warning else []}


def init_payload(result: StarterResult) -> dict[str, Any]:
    """`init --json`: the recipe written, the data format and target modules found."""
    return {"command": "init", "ok": True, **asdict(result), "path": str(result.path)}


def validate_payload(recipe: Recipe) -> dict[str, Any]:
    """`validate --json`: the resolved recipe."""
    return {"command": "validate", "ok": True, "recipe": recipe.model_dump(mode="json")}


def inspect_payload(result: InspectResult) -> dict[str, Any]:
    """`inspect-modules --json`: the module groups, presets, parameter counts and memory estimate."""
    return {"command": "inspect-modules", "ok": True, **asdict(result), "trainable_percent": result.trainable_percent}


def merge_payload(result: MergeResult) -> dict[str, Any]:
    """`merge --json`: what was merged, how it was verified, the files written."""
    return {"command": "merge", "ok": True, **asdict(result)}


def push_payload(result: PushResult) -> dict[str, Any]:
    """`push --json`: the repo, the files (path -> bytes), the commit URL (None with --dry-run)."""
    return {"command": "push", "ok": True, **asdict(result)}


def eval_payload(result: EvalResult) -> dict[str, Any]:
    """`eval --json`: report.json's content (the generations stay in samples.jsonl)."""
    payload = {key: value for key, value in asdict(result).items() if key != "samples"}
    return {"command": "eval", "ok": True, **payload}


# ----------------------------------------------------------------------------------------------------
# What a person reads


def show_train(result: TrainResult, console: Console, *, quiet: bool = False) -> None:
    """A dry run: the resolved recipe, the checks and samples (on `console`, the run's own); a run: its summary."""
    if result.dry_run:
        from lorafit.recipe import dump_recipe

        _dry_run(console, result, dump_recipe(result.recipe))
    else:  # --quiet still prints the run summary: it is the result
        _train_summary(Console(highlight=False) if quiet else console, result, quiet=quiet)


def show_sweep(result: SweepResult, *, quiet: bool = False) -> None:
    """The grid, one row per run (its name holds its values); a dry run says what each run would do. Failed runs:
    the error line on stderr after the table."""
    from lorafit.sweep import cell  # the same cells as sweep.md

    console = Console(highlight=False)
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
    failure = sweep_failure(result)
    if failure:
        Console(stderr=True, highlight=False).print(Text(f"error: {failure}", style="bold red"), soft_wrap=True)


def show_runs(rows: list[RunInfo], warning: str | None, *, plot: Path | None, quiet: bool = False) -> None:
    """One row per run folder; then the chart's path, or on stderr why it was not drawn."""
    console = Console(highlight=False)
    _runs_table(console, rows, quiet=quiet)
    if warning:
        Console(stderr=True, highlight=False).print(Text(warning, style="yellow"))
    elif plot and not quiet:
        console.print(f"[dim]chart: {plot}[/dim]")


def show_init(result: StarterResult, *, quiet: bool = False) -> None:
    """The data format and targets written into the starter recipe, and the next command to run."""
    console = Console(highlight=False)
    for note in [] if quiet else result.notes:
        console.print(Text(note, style="yellow"))
    console.print(f"[green]wrote[/green] {result.path}: data format {result.data_format}, target_modules "
                  f"{result.target_modules}" + (f" ({', '.join(result.resolved_targets)})"
                                                if result.resolved_targets else ""))
    if not quiet:
        console.print(f"next: lorafit train {result.path} --dry-run")


def show_validate(recipe: Recipe, recipe_path: Path, *, quiet: bool = False) -> None:
    """One ok line; --quiet: nothing (the exit code is the result)."""
    if not quiet:
        Console(highlight=False).print(f"[green]ok[/green] {recipe_path}: recipe '{recipe.name}' is valid")


def show_inspect(result: InspectResult, *, quiet: bool = False) -> None:
    """The module table, presets, the adapter's trainable count and the memory estimate; --quiet: the count only."""
    console = Console(highlight=False)
    if quiet:
        _trainable(console, result)
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
    _trainable(console, result)
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


def show_merge(result: MergeResult, *, quiet: bool = False) -> None:
    """Notes, then what was merged, how it was verified (and the GGUF check), the files, memory and time."""
    console = Console(highlight=False)
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


def show_push(result: PushResult, *, quiet: bool = False) -> None:
    """The files (checked: nothing names this machine), then where they went, or that --dry-run sent nothing."""
    console = Console(highlight=False)
    if not quiet:
        table = Table(title=f"{result.what} for {result.repo} (base model {result.base_model})", title_justify="left")
        table.add_column("file")
        table.add_column("size", justify="right")
        for name, size in result.files.items():
            table.add_row(name, _bytes(size))
        console.print(table)
    if result.dry_run:
        console.print(f"dry run: {len(result.files)} files checked (no local paths, user name or token); "
                      "nothing uploaded")
    else:
        console.print(f"pushed {len(result.files)} files in one commit: {result.url}")


def show_eval(result: EvalResult, *, quiet: bool = False) -> None:
    """Notes, the scores table and three samples; --quiet: the scores table only."""
    console = Console(highlight=False)
    for note in [] if quiet else result.notes:
        console.print(Text(note, style="yellow" if note.startswith("warning") else "dim"))
    if result.labels is not None:
        _classification_eval(console, result, quiet=quiet)
        _benchmarks(console, result.benchmarks)
        return
    table = Table(title=f"{result.recipe}: {result.examples} eval rows from {result.data}", title_justify="left")
    for column in ("model", "loss", "perplexity", "exact match", "norm. exact match", "ROUGE-L", "time"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for s in result.scores:
        table.add_row(s.name, _fmt(s.loss), f"{s.perplexity:.2f}" if s.perplexity else "-", _pct(s.exact_match),
                      _pct(s.normalized_exact_match), _pct(s.rouge_l), f"{s.seconds:.1f} s")
    console.print(table)
    if any(s.preference for s in result.scores):  # preference tasks: the held-out pairs
        _preferences(console, result.scores)
    if any(s.rewards for s in result.scores):  # grpo / rloo: the recipe's rewards on the greedy answers
        _rewards(console, result.scores)
    _benchmarks(console, result.benchmarks)
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


# ----------------------------------------------------------------------------------------------------
# Pieces


def _benchmarks(console: Console, rows: list[BenchmarkRow]) -> None:
    """--benchmark: each task's metric per model; an adapter's cell adds its difference from the base and that
    difference's standard error, in red when the drop is larger than the noise."""
    if not rows:
        return
    table = Table(title="benchmarks (lm-evaluation-harness): value (difference from the base ± its standard error)",
                  title_justify="left")
    for column in ("task", "metric", "docs", *(m.name for m in rows[0].models)):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for row in rows:
        cells = []
        for m in row.models:
            cell = _fmt(m.value)
            if m.difference is not None:
                spread = f" ± {m.difference_stderr:.4f}" if m.difference_stderr is not None else ""
                cell += f" ({m.difference:+.4f}{spread})"
            cells.append(Text(cell + (" worse" if m.regression else ""), style="red" if m.regression else ""))
        table.add_row(row.task, row.metric, str(row.documents), *cells)
    console.print(table)


def _rewards(console: Console, scores) -> None:
    """Each reward's mean on every model's greedy answers, and their weighted sum (`reward`)."""
    names = list(next(s.rewards for s in scores if s.rewards))
    table = Table(title="rewards on the greedy answers (mean)", title_justify="left")
    for column in ("model", *names):
        table.add_column(column, justify="left" if column == "model" else "right")
    for s in scores:
        table.add_row(s.name, *(_fmt(s.rewards.get(n)) if s.rewards else "-" for n in names))
    console.print(table)


def _notes(console: Console, result: TrainResult) -> None:
    for note in result.notes:
        style = "yellow" if note.startswith(("warning", "data:")) else "dim"
        console.print(Text(note, style=style))


def _dry_run(console: Console, result: TrainResult, recipe_yaml: str) -> None:
    report = result.report
    console.rule("resolved recipe")
    console.print(Text(recipe_yaml))
    console.rule("check")
    _notes(console, result)
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


def _train_summary(console: Console, result: TrainResult, *, quiet: bool = False) -> None:
    m = result.metrics
    if not quiet:
        _notes(console, result)
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
    if m.rl is not None:  # grpo / rloo: the last logged rollouts' rewards and completions
        rewards = {k.removeprefix("rewards/").removesuffix("/mean"): v for k, v in m.rl.items()
                   if k.startswith("rewards/")}
        table.add_row("reward (weighted) / std", f"{_fmt(m.rl.get('reward'))} / {_fmt(m.rl.get('reward_std'))}")
        table.add_row("each reward (mean)", ", ".join(f"{k} {_fmt(v)}" for k, v in rewards.items()))
        table.add_row("completion length / clipped", f"{_fmt(m.rl.get('completions/mean_length'))} / "
                      f"{_pct(m.rl.get('completions/clipped_ratio'))}")
    table.add_row("tokens/s", f"{m.tokens_per_second:,.0f}" if m.tokens_per_second else "-")
    table.add_row("train time", f"{m.train_seconds:.1f} s (wall {m.wall_seconds:.1f} s)")
    table.add_row("peak memory", f"{m.peak_memory_mb:,.0f} MiB")
    table.add_row("trainable params", f"{m.trainable_params:,}")
    console.print(table)


def _trainable(console: Console, result: InspectResult) -> None:
    console.print(f"trainable parameters (counted by PEFT): [bold]{result.trainable_params:,}[/bold] of "
                  f"{result.total_params:,} ({result.trainable_percent:.4f}%); "
                  f"adapter file ~{_bytes(result.adapter_file_bytes)}")


def _preferences(console: Console, scores: list[Scores]) -> None:
    table = Table(title=f"preferences on {scores[0].preference.pairs} held-out pairs (reward: "
                  f"{scores[0].preference.reward})", title_justify="left")
    for column in ("model", "prefers chosen", "log-prob margin", "reward accuracy", "reward margin"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for s in scores:
        p = s.preference
        table.add_row(s.name, _pct(p.pair_accuracy), _fmt(p.logp_margin), _pct(p.reward_accuracy),
                      _fmt(p.reward_margin))
    console.print(table)


def _classification_eval(console: Console, result: EvalResult, *, quiet: bool = False) -> None:
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


def _runs_table(console: Console, rows: list[RunInfo], *, quiet: bool) -> None:
    from lorafit.sweep import cell  # the same cells as the sweep table

    if not rows:
        console.print("no run folders found")
        return
    if not console.is_terminal:  # piped or redirected: whole values beat a table cut to 80 columns
        console.width = max(console.width, 160)
    table = Table(title=None if quiet else f"{len(rows)} run{'s' if len(rows) != 1 else ''}", title_justify="left")
    benchmarks = any(row.benchmarks for row in rows)
    for column in ("run", "base", "method", "r", "alpha", "lr", "steps", "train loss", "eval loss", "eval",
                   *(["benchmarks"] if benchmarks else []), "tok/s", "time", "status"):
        table.add_column(column, justify="left" if column in ("run", "base", "method", "status") else "right")
    short_metric = {"exact_match": "EM", "accuracy": "acc"}
    for row in rows:
        score = "-" if row.eval_score is None else f"{_pct(row.eval_score)} {short_metric.get(row.eval_metric, '')}"
        steps = cell(row.steps) + (f"/{row.max_steps}" if row.status != "finished" and row.max_steps else "")
        style = {"failed": "red", "interrupted": "yellow", "running": "cyan"}.get(row.status, "")
        table.add_row(row.name, _short_base(row.base), cell(row.method), cell(row.r), cell(row.alpha),
                      cell(row.lr), steps, _fmt(row.train_loss) if row.train_reward is None else
                      f"reward {_fmt(row.train_reward)}", _fmt(row.eval_loss), score,
                      *([_benchmark_cell(row)] if benchmarks else []),
                      f"{row.tokens_per_second:,.0f}" if row.tokens_per_second else "-",
                      f"{row.train_seconds:.0f} s" if row.train_seconds else "-", row.status, style=style)
    console.print(table)


def _benchmark_cell(row: RunInfo) -> str:
    """How many benchmark metrics the run's adapter was scored on, and how many dropped beyond the noise."""
    if not row.benchmarks:
        return "-"
    return f"{row.benchmark_regressions} worse / {len(row.benchmarks)}"


def _short_base(base: str | None) -> str:
    """A local model folder by its name; hub ids and aliases as they are."""
    if not base:
        return "-"
    return Path(base).name if base.startswith(("/", "./", "../", "~")) else base


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:.0f} B"
