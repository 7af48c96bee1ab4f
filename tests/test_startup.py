"""Start-up stays instant: `lorafit --help`, `validate` and recipe errors never import the ML stack.

Importing torch + transformers + trl takes seconds; the budget for `--help` and `validate` is 0.5 s
(measured by scripts/bench.py; timings are not asserted here because test machines are shared and noisy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "numpy", "matplotlib")
ROOT = Path(__file__).resolve().parents[1]

# Runs the console-script entry point in-process, then reports which heavy packages got imported.
_PROBE = """
import json, sys
sys.argv = ["lorafit", *json.loads(sys.argv[1])]
from lorafit.cli import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(%r))), file=sys.stderr)
""" % (HEAVY,)


def _heavy_modules_after(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(args))], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_importing_the_cli_imports_no_ml_library():
    code = f"import sys, lorafit.cli; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("args", [
    ("--help",),
    ("train", "--help"),
    # (`train --sweep ... --dry-run` is not here: it checks every grid point's tokenizer, data and targets on the
    # meta device, as deeply as `train --dry-run` does, so it imports transformers by design.)
    ("runs", "--help"),
    ("validate", "configs/quickstart.yaml"),
    ("validate", "configs/no-such-recipe.yaml"),
])
def test_help_validate_and_recipe_errors_import_no_ml_library(args):
    """--help, validate and recipe errors stay instant: no torch / transformers / peft / trl is imported."""
    assert _heavy_modules_after(*args) == []


def test_recipe_errors_in_train_import_no_ml_library(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel:\n  path: m\ndata:\n  train: t.jsonl\nadapter:\n  lora_r: 8\n")
    assert _heavy_modules_after("train", str(bad)) == []
