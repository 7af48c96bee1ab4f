"""vLLM's LoRA rules (lorafit/vllm_rules.py): which adapters the model card may show a vLLM snippet for, and what
merge says about serving in vLLM."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import tiny_lora_run
from lorafit import vllm_rules

LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "modules_to_save": None, "use_dora": False, "use_rslora": False, "init_lora_weights": True}


def test_plain_lora_and_rslora_load_with_the_smallest_max_lora_rank():
    """A plain LoRA (or rsLoRA) loads; max_lora_rank is the smallest value vLLM allows that admits its rank."""
    assert vllm_rules.check_adapter(LORA).max_lora_rank == 8
    check = vllm_rules.check_adapter({**LORA, "r": 48, "use_rslora": True})
    assert check.loads and check.max_lora_rank == 64
    snippet = "\n".join(vllm_rules.lora_snippet("org/base", "run", "runs/run/adapter", check))
    assert 'LLM(model="org/base", enable_lora=True, max_lora_rank=64)' in snippet
    assert "max_lora_rank" not in "\n".join(vllm_rules.lora_snippet("b", "n", "a", vllm_rules.check_adapter(LORA)))


@pytest.mark.parametrize(("change", "reason"), [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']"),
    ({"bias": "all"}, "adapter bias 'all'"),
    ({"lora_bias": True}, "lora_bias"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"r": 1024}, "rank 1024 is above vLLM's largest max_lora_rank 512"),
    ({"rank_pattern": {"q_proj": 640}}, "rank 640"),
    ({"peft_type": "PREFIX_TUNING"}, "LoRA adapters only"),
])
def test_what_vllm_refuses_is_said_with_the_way_out(change, reason):
    """Each feature vLLM's PEFTHelper refuses makes the adapter not load, with the reason, the source and the fix."""
    check = vllm_rules.check_adapter({**LORA, **change})
    assert not check.loads and check.max_lora_rank is None
    assert reason in check.refusal() and "vllm/lora/peft_helper.py" in check.refusal()
    assert "lorafit merge" in check.fix
    (line, _) = vllm_rules.lora_snippet("b", "n", "a", check)
    assert "will not load in vLLM" in line and "LLM(" not in line


def test_classifier_heads_and_plain_inits_are_allowed():
    """modules_to_save of a classifier head and inits that save as plain LoRAs are what vLLM accepts."""
    assert vllm_rules.check_adapter({**LORA, "modules_to_save": ["score"], "init_lora_weights": "eva"}).loads


def test_embedding_targets_are_a_warning():
    """A LoRA on lm_head / embed_tokens loads by the config rules but recent vLLM refuses the module: a warning."""
    check = vllm_rules.check_adapter({**LORA, "target_modules": ["q_proj", "lm_head"]})
    assert check.loads and "lm_head" in check.warnings[0]
    assert any("serve the merged model" in line for line in vllm_rules.lora_snippet("b", "n", "a", check))


def test_dora_run_card_and_merge_say_it_will_not_serve_as_a_lora(make_recipe, tiny_llama, toy_data, tmp_path):
    """A DoRA run's model card has no vLLM snippet but the reason and the fix; merging it notes that vLLM refuses the
    adapter and that the merged model serves without it."""
    from lorafit.merge import AdapterSpec, MergeOptions, run_merge

    adapter = tiny_lora_run(make_recipe, tiny_llama, toy_data, tmp_path / "run", r=4, use_dora=True)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "enable_lora=True" not in card
    assert "will not load in vLLM as a LoRA: DoRA (use_dora) is not supported" in card
    assert "adapter.use_dora: false" in card

    result = run_merge(MergeOptions([AdapterSpec(Path(adapter))], tmp_path / "merged"))
    (note,) = [n for n in result.notes if n.startswith("vLLM:")]
    assert "DoRA" in note and f"vllm serve {tmp_path / 'merged'}" in note
    assert "DoRA" in (tmp_path / "merged" / "README.md").read_text()


def test_lora_run_card_shows_the_vllm_snippet(make_recipe, tiny_llama, toy_data, tmp_path):
    """A plain LoRA run's model card keeps the vLLM snippet."""
    tiny_lora_run(make_recipe, tiny_llama, toy_data, tmp_path / "run", r=4)
    assert "enable_lora=True)" in (tmp_path / "run" / "README.md").read_text()
