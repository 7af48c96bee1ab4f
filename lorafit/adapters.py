"""Stage 2: recipe.adapter -> a PEFT config and the wrapped model.

Target presets (`all-linear`, `attention`, `attention+mlp`) are resolved from the module names the model
actually has, so one recipe works across Llama/Qwen/Mistral/Gemma (q_proj...), GPT-2 (Conv1D c_attn),
Falcon/BLOOM (query_key_value), Phi and BERT (query/key/value/dense).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from lorafit.errors import LorafitError
from lorafit.recipe import AdapterSection, Recipe

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from torch import nn

PRESETS = ("all-linear", "attention", "attention+mlp")
# Output heads are never LoRA targets in presets: they are tied to embeddings or trained via modules_to_save.
_HEAD_NAMES = {"lm_head", "embed_out", "output", "score", "classifier", "qa_outputs", "cls", "pooler"}
_ATTENTION_PARTS = ("attn", "attention")
_MLP_PARTS = ("mlp", "ffn", "feed_forward", "intermediate", "output", "experts")


def eligible_modules(model: nn.Module) -> dict[str, str]:
    """Qualified name -> class name of every module LoRA can adapt (Linear, Conv1D, Embedding, 4/8-bit Linear)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D, torch.nn.Embedding)):
            found[name] = type(module).__name__
    return found


def _is_head(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] in _HEAD_NAMES or (len(parts) >= 2 and parts[-2] in ("cls", "pooler"))


def _has_part(name: str, parts: tuple[str, ...]) -> bool:
    ancestors = name.split(".")[:-1]
    return any(any(p in ancestor for p in parts) for ancestor in ancestors)


def _preset_members(modules: dict[str, str], preset: str) -> list[str]:
    linear = [n for n, kind in modules.items() if kind != "Embedding" and not _is_head(n)]
    attention = [n for n in linear if _has_part(n, _ATTENTION_PARTS)]
    if preset == "attention":
        return attention
    if preset == "attention+mlp":
        return [n for n in linear if n in set(attention) or _has_part(n, _MLP_PARTS)]
    return linear


def _shortest_suffixes(selected: list[str], all_names: list[str]) -> list[str]:
    """Short PEFT target names (q_proj, attn.c_proj) that match exactly the selected modules."""
    chosen = set(selected)
    suffixes = []
    for name in selected:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            suffix = ".".join(parts[-depth:])
            # strip layer indices so one suffix covers every layer
            if suffix.split(".")[0].isdigit():
                continue
            matches = [n for n in all_names if n == suffix or n.endswith("." + suffix)]
            if all(m in chosen for m in matches):
                suffixes.append(suffix)
                break
        else:
            suffixes.append(name)
    return sorted(dict.fromkeys(suffixes))


def resolve_target_modules(model: nn.Module, spec: str | list[str]) -> list[str]:
    """PEFT target names for a preset or an explicit list; an error lists what the model has when nothing matches."""
    modules = eligible_modules(model)
    names = list(modules)
    if isinstance(spec, str) and spec in PRESETS:
        selected = _preset_members(modules, spec)
        if not selected:
            raise LorafitError(
                f"preset '{spec}' matches no module of this model", where="adapter.target_modules",
                hint=f"list names explicitly; this model has: {_describe_leaf_names(modules)}",
            )
        return _shortest_suffixes(selected, names)
    wanted = [spec] if isinstance(spec, str) else list(spec)
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise LorafitError(
            f"{', '.join(missing)} match no module of this model", where="adapter.target_modules",
            hint=f"this model has: {_describe_leaf_names(modules)}; or use a preset: {', '.join(PRESETS)}",
        )
    return wanted


def _describe_leaf_names(modules: dict[str, str]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for name in modules:
        counts[name.split(".")[-1]] += 1
    return ", ".join(f"{leaf} x{n}" for leaf, n in counts.items())


def build_peft_config(section: AdapterSection, model: nn.Module, task_type: str = "CAUSAL_LM") -> PeftConfig:
    """The PEFT config (LoRA, IA3 or prefix tuning) for this model."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig

    modules = eligible_modules(model)
    for name in section.modules_to_save:
        if not any(n == name or n.endswith("." + name) for n in dict(model.named_modules())):
            raise LorafitError(f"'{name}' is not a module of this model", where="adapter.modules_to_save",
                               hint=f"this model has: {_describe_leaf_names(modules)}")
    modules_to_save = list(section.modules_to_save) or None
    if section.method == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=section.num_virtual_tokens)
    targets = resolve_target_modules(model, section.target_modules)
    if section.method == "ia3":
        mlp = [t for t in targets if any(_has_part(n, _MLP_PARTS) and not _has_part(n, _ATTENTION_PARTS)
                                         for n in modules if n == t or n.endswith("." + t))]
        return IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=mlp,
                         modules_to_save=modules_to_save)
    return LoraConfig(
        task_type=task_type,
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        bias=section.bias,
        modules_to_save=modules_to_save,
        layers_to_transform=section.layers_to_transform,
        use_rslora=section.use_rslora,
        use_dora=section.use_dora,
        init_lora_weights=True if section.init == "default" else section.init,
    )


def wrap_model(recipe: Recipe, model: nn.Module, *, gradient_checkpointing: bool) -> PeftModel:
    """The base model frozen and wrapped with the recipe's adapter (prepared for k-bit training under QLoRA)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    config = build_peft_config(recipe.adapter, model)
    if recipe.quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, config)
