"""CI-facing behaviour of the CLI: one JSON object per command (also on failure), documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lorafit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorafit", *args], capture_output=True, text=True, timeout=120)


def test_validate_json_prints_the_resolved_recipe():
    proc = lorafit("validate", str(REPO / "configs" / "quickstart.yaml"), "--json", "--set", "adapter.r=4")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["ok"] is True and payload["recipe"]["adapter"]["r"] == 4


def test_validate_quiet_answers_with_the_exit_code_alone(tmp_path):
    proc = lorafit("validate", str(REPO / "configs" / "quickstart.yaml"), "--quiet")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    proc = lorafit("validate", str(REPO / "configs" / "quickstart.yaml"), "--quiet", "--set", "adapter.r=0")
    assert proc.returncode == 1 and proc.stdout == "" and "adapter.r" in proc.stderr


def test_a_failing_command_with_json_still_prints_one_object_and_exits_1(tmp_path):
    proc = lorafit("train", str(tmp_path / "missing.yaml"), "--json")
    assert proc.returncode == 1
    payload = json.loads(proc.stdout)
    assert payload == {"ok": False, "error": f"{tmp_path / 'missing.yaml'}: file not found (check the path)",
                       "where": str(tmp_path / "missing.yaml"), "hint": "check the path", "exit_code": 1}
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_every_command_is_listed_with_shell_completion():
    proc = lorafit("--help")
    assert proc.returncode == 0
    for command in ("train", "eval", "merge", "inspect-modules", "validate", "init", "--install-completion"):
        assert command in proc.stdout


def test_debug_shows_the_traceback(tmp_path):
    proc = lorafit("validate", str(tmp_path / "missing.yaml"), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "LorafitError" in proc.stderr
