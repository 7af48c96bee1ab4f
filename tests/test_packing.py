"""Packing and padding-free batches are numerically the same training as unpacked rows, on CPU attention kernels.

A packed row carries several examples one after another, with `position_ids` restarting at 0 for each and no
attention mask; transformers turns that into a block-diagonal causal mask (eager, SDPA) so no example sees
another. These tests hold lorafit to it: the loss of a packed batch is the token-weighted mean of the loss of
each row on its own, through the loss lorafit trains with (lorafit/loss.py) and TRL's fused one.
"""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from lorafit.errors import LorafitError
from lorafit.loss import supports_trained_positions_loss, trained_positions_loss
from lorafit.recipe import validate_recipe

# Lengths differ, one row is very short, and some labels are masked like a prompt would be.
ROW_LENGTHS = (7, 19, 4, 12)


def _rows(seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in ROW_LENGTHS:
        ids = torch.randint(3, 500, (n,), generator=generator).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]  # the first third is "prompt"
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _packed(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)


def _unpacked_mean_loss(model, rows) -> float:
    """Token-weighted mean of each row's own loss: what training on the rows one by one would average."""
    total, count = 0.0, 0
    for row in rows:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        total += model(input_ids=ids, labels=labels, use_cache=False).loss.item() * n
        count += n
    return total / count


def _load(path, attn: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()
    assert model.config.use_cache  # as loaded: the loss must turn the cache off itself (a cache hides the packing)
    return model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("packing")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("llama", "qwen2", "gpt2")}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_batch_loss_equals_mean_of_unpacked_rows(tiny_models, arch, attn):
    """The loss of a packed batch equals the mean loss of its rows run one by one (eager and SDPA attention)."""
    model = _load(tiny_models[arch], attn)
    rows = _rows()
    batch = _packed(rows)
    assert batch["input_ids"].shape == (1, sum(ROW_LENGTHS)) and "attention_mask" not in batch
    assert supports_trained_positions_loss(model)
    with torch.no_grad():
        expected = _unpacked_mean_loss(model, rows)
        packed = trained_positions_loss(model, batch).item()
        padded_rows = trained_positions_loss(model, _padded(rows)).item()
    assert packed == pytest.approx(expected, abs=1e-4)
    assert padded_rows == pytest.approx(expected, abs=1e-4)


def _padded(rows) -> dict[str, torch.Tensor]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0)(rows)


def test_trained_positions_loss_equals_trls_fused_loss_and_gradients(tiny_models):
    """lorafit's CPU loss is TRL's loss (same value, same gradients), with and without num_items_in_batch."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    model = _load(tiny_models["llama"], "sdpa")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # exactly what SFTTrainer does
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = _packed(_rows())
    grads = {}
    for name, compute in {
        "trl": lambda: model(**batch, fused_lm_head=True, use_cache=False).loss,
        "lorafit": lambda: trained_positions_loss(model, batch),
        "trl/items": lambda: model(**batch, fused_lm_head=True, use_cache=False, num_items_in_batch=50).loss,
        "lorafit/items": lambda: trained_positions_loss(model, batch, num_items_in_batch=torch.tensor(50)),
    }.items():
        model.zero_grad()
        loss = compute()
        loss.backward()
        grads[name] = (loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    for suffix in ("", "/items"):
        (trl_loss, trl_grads), (our_loss, our_grads) = grads["trl" + suffix], grads["lorafit" + suffix]
        assert our_loss == pytest.approx(trl_loss, abs=1e-5)
        for ours, theirs in zip(our_grads, trl_grads, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_a_kv_cache_hides_packing_so_prefix_tuning_is_refused(make_recipe, tiny_models, toy_data, tmp_path):
    """Prefix tuning feeds its prefix as a KV cache; transformers then cannot see the packed boundaries.

    If the first assertion ever fails, transformers splits packed rows under a cache too and the refusal in
    recipe.py (`data.packing` with `adapter.method: prefix`) can go.
    """
    from peft import PrefixTuningConfig, get_peft_model

    model = _load(tiny_models["llama"], "sdpa")
    model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    rows = _rows()
    with torch.no_grad():
        contaminated = model(**_packed(rows), use_cache=False).loss.item()
        assert abs(contaminated - _unpacked_mean_loss(model, rows)) > 1e-3
    raw = make_recipe(tiny_models["llama"], toy_data, data={"packing": True}, adapter={"method": "prefix"})
    with pytest.raises(LorafitError, match="data.packing: prefix tuning cannot be packed"):
        validate_recipe(raw)
    validate_recipe({**raw, "data": {"train": str(toy_data), "group_by_length": True}})  # the fast alternative


@pytest.mark.parametrize("data", [{"packing": True}, {"group_by_length": True}])
def test_packed_and_length_grouped_training_runs_and_reports_throughput(make_recipe, tiny_llama, toy_data_factory,
                                                                         tmp_path, data):
    """Packed and length-grouped training run and record first-step time and tokens/s; packing on SDPA notes one row
    per forward."""
    from lorafit.train import run_train

    toy = toy_data_factory(n=24)
    recipe = validate_recipe(make_recipe(tiny_llama, toy, tmp_path / "run", data=data,
                                         training={"max_steps": 3, "logging_steps": 5, "save_steps": 20}))
    result = run_train(recipe, Console(quiet=True))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    assert metrics["first_step_seconds"] > 0 and metrics["tokens_per_second_after_first_step"] > 0
    packed_note = [n for n in result.notes if n.startswith("packing: one packed row per forward pass")]
    assert bool(packed_note) == bool(data.get("packing"))  # sdpa on CPU: one packed row per forward pass
    if data.get("packing"):
        # Every real token counted (the pad id is the eos id here, which a "non-padding" count would skip).
        assert metrics["tokens_seen"] > 0
