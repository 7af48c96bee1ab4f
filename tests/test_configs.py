"""The recipe library: every shipped recipe validates, and its targets exist in that architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf

from lorafit.adapters import resolve_target_modules
from lorafit.recipe import load_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=256)
LLAMA_LIKE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

# recipe family -> (config-only model of that architecture, the projections attention+mlp must resolve to)
FAMILIES = {
    "llama3": (lambda: tf.LlamaConfig(**_SMALL), LLAMA_LIKE),
    "qwen2.5": (lambda: tf.Qwen2Config(**_SMALL), LLAMA_LIKE),
    "qwen3": (lambda: tf.Qwen3Config(**_SMALL, head_dim=16), LLAMA_LIKE),
    "mistral": (lambda: tf.MistralConfig(**_SMALL), LLAMA_LIKE),
    "gemma": (lambda: tf.Gemma2Config(**_SMALL, head_dim=16), LLAMA_LIKE),
    "phi": (lambda: tf.Phi3Config(**_SMALL, pad_token_id=0), ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    "gpt2": (lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256), ["c_attn", "c_fc", "c_proj"]),
}


def family_recipes():
    return sorted(p for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("quickstart"))


def test_every_family_has_a_lora_and_a_qlora_recipe():
    names = {p.stem for p in family_recipes()}
    assert names == {f"{family}-{kind}" for family in FAMILIES for kind in ("lora", "qlora")}


@pytest.mark.parametrize("path", family_recipes(), ids=lambda p: p.stem)
def test_recipe_targets_exist_in_its_architecture(path):
    recipe = load_recipe(path)
    family = path.stem.rsplit("-", 1)[0]
    make_config, expected = FAMILIES[family]
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(make_config())
    assert resolve_target_modules(model, recipe.adapter.target_modules) == expected
    # best-practice defaults the library promises
    assert recipe.adapter.r == 16 and recipe.adapter.alpha == 32
    assert recipe.training.learning_rate == 2e-4 and recipe.training.gradient_checkpointing is True
    if path.stem.endswith("-qlora"):
        assert recipe.quantization is not None and recipe.quantization.bits == 4
        assert recipe.training.optimizer == "paged_adamw_8bit"
    else:
        assert recipe.quantization is None
    assert Path(recipe.data.train).is_file()  # runs out of the box once the model is reachable
