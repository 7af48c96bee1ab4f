"""Live training progress: a rich progress bar on a terminal, plain log lines elsewhere (CI, pipes).

A `TrainerCallback` is the documented hook for this; HF's own tqdm bar is switched off.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback


class ProgressCallback(TrainerCallback):
    """Shows step, loss, learning rate, tokens/s and ETA; only the main process prints."""

    def __init__(self, console: Console, *, quiet: bool = False):
        self.console = console
        self.quiet = quiet or console.quiet
        self.live = console.is_terminal and not self.quiet
        self.progress: Progress | None = None
        self.task = None
        self.started = 0.0
        self.first_tokens = 0
        self.last: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.quiet:
            return
        self.started = time.perf_counter()
        self.first_tokens = state.num_input_tokens_seen or 0
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                               stats="warming up")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=self._stats(state))

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not state.is_world_process_zero or self.quiet or not logs:
            return
        for key in ("loss", "learning_rate", "eval_loss", "eval_accuracy", "grad_norm", "rewards/accuracies",
                    "rewards/margins", "eval_rewards/accuracies", "eval_rewards/margins"):
            if key in logs:
                self.last[key] = logs[key]
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=self._stats(state))
            if "eval_loss" in logs:
                accuracy = f", eval accuracy {logs['eval_accuracy']:.1%}" if "eval_accuracy" in logs else ""
                if "eval_rewards/margins" in logs:  # preference tasks
                    accuracy += f", eval reward margin {logs['eval_rewards/margins']:.3f}"
                self.progress.console.print(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}{accuracy}")
        elif "loss" in logs or "eval_loss" in logs:
            eta = self._eta(state)
            self.console.print(f"step {state.global_step}/{state.max_steps}  {self._stats(state)}  eta {eta}",
                               markup=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, stats=self._stats(state))
            self.progress.stop()
            self.progress = None

    def _tokens_per_second(self, state) -> float:
        elapsed = time.perf_counter() - self.started
        tokens = (state.num_input_tokens_seen or 0) - self.first_tokens
        return tokens / elapsed if elapsed > 0 else 0.0

    def _stats(self, state) -> str:
        parts = []
        if "loss" in self.last:
            parts.append(f"loss {self.last['loss']:.4f}")
        if "eval_loss" in self.last:
            parts.append(f"eval {self.last['eval_loss']:.4f}")
        if "eval_accuracy" in self.last:  # sequence classification
            parts.append(f"acc {self.last['eval_accuracy']:.1%}")
        if "rewards/accuracies" in self.last:  # dpo / orpo: how often the chosen answer out-scores the rejected one
            parts.append(f"reward acc {self.last['rewards/accuracies']:.0%}")
        if "rewards/margins" in self.last:  # preference tasks: chosen minus rejected reward
            parts.append(f"margin {self.last['rewards/margins']:.3f}")
        if "learning_rate" in self.last:
            parts.append(f"lr {self.last['learning_rate']:.2e}")
        parts.append(f"{self._tokens_per_second(state):,.0f} tok/s")
        return "  ".join(parts)

    def _eta(self, state) -> str:
        done = state.global_step
        if not done:
            return "?"
        elapsed = time.perf_counter() - self.started
        remaining = elapsed / done * max(state.max_steps - done, 0)
        return time.strftime("%M:%S", time.gmtime(remaining)) if remaining < 3600 else f"{remaining / 3600:.1f}h"
