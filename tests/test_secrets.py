"""Secrets in the environment (hub tokens, tracker keys) never reach any file lorafit writes.
"""

from __future__ import annotations

import pytest
import torch
from cli_helpers import QUICK, QUIET

from lorafit.recipe import validate_recipe
from lorafit.train import run_train

pytestmark = pytest.mark.usefixtures("cli_in_this_process")


def test_secrets_from_the_environment_never_reach_the_run_folder(make_recipe, tiny_llama, toy_data, tmp_path,
                                                                 monkeypatch):
    """Hub tokens and tracker keys in the environment never appear in any file of the run folder."""
    secrets = {"HF_TOKEN": "hf_PLANTEDsecret0123456789", "HUGGING_FACE_HUB_TOKEN": "hf_PLANTEDsecret9876543210",
               "WANDB_API_KEY": "wandb-PLANTED-key-4242", "MLFLOW_TRACKING_TOKEN": "mlflow-PLANTED-token-77",
               "COMET_API_KEY": "comet-PLANTED-key-11"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, run, QUICK, training={"max_steps": 2, "save_steps": 1},
                         output={"report_to": ["tensorboard"]}))
    run_train(recipe, QUIET)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"training_args.bin", "recipe.yaml", "README.md", "metrics.json"} <= {p.name for p in files}
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    for path in files:
        content = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in content, f"{name} leaked into {path}"
    args = torch.load(next(p for p in files if p.name == "training_args.bin"), weights_only=False)
    assert args.hub_token is None and not args.push_to_hub
