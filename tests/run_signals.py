"""Signals delivered to a training run at a chosen optimizer step, as a user pressing Ctrl-C (or a scheduler sending
SIGTERM) would. A plain module, like tiny_models.py, so every test file uses the same one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lorafit.progress import ProgressCallback


def signal_at_step(monkeypatch, step: int, *, times: int = 1, sig: int = signal.SIGINT,
                   run_name: str | None = None) -> None:
    """Deliver `sig` (`times` times) to this process at the end of optimizer step `step`; with `run_name`, only in the
    run whose folder has that name (a sweep runs several). `monkeypatch` undoes it (or a MonkeyPatch.context())."""
    original = ProgressCallback.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        result = original(self, args, state, control, **kwargs)
        if state.global_step == step and (run_name is None or Path(args.output_dir).parent.parent.name == run_name):
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return result

    monkeypatch.setattr(ProgressCallback, "on_step_end", on_step_end)
