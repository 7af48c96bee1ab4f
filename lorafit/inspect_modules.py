"""`lorafit inspect-modules`: what can I target, and what will it cost? — from the config alone.

The model is instantiated on PyTorch's meta device: modules and shapes exist, no weight is allocated or
read, so a folder holding only the config.json of a 70B model is inspected in seconds. Parameter counts
come from PEFT itself (`get_nb_trainable_parameters`) on the same PEFT config training builds
(`adapters.build_peft_config`), so they are the figures training will report.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit import adapters, tasks
from lorafit.errors import LorafitError
from lorafit.recipe import AdapterSection, Recipe, apply_overrides, load_recipe, validate_recipe

if TYPE_CHECKING:
    from torch import nn

_RECIPE_SUFFIXES = (".yaml", ".yml")
# Bytes per parameter of 4-bit weights: 0.5 for the codes plus the block constants (one absmax per 64
# weights: fp32, or with double quantization 8-bit plus one fp32 per 256 blocks).
_NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LOAD_PEAK_NOTE = (
    "the memory estimate is the steady state during training; loading on a CPU peaks higher: the weight file's "
    "pages stay mapped while tensors are copied out of it, and under QLoRA each weight is read in 16/32 bits "
    "before it is quantized")


@dataclass
class ModuleGroup:
    """Modules that share a path pattern (layer indices as *), a type and a shape."""

    pattern: str
    leaf: str
    kind: str
    shape: str
    count: int
    params_each: int
    eligible: bool
    presets: list[str] = field(default_factory=list)
    targeted: bool = False
    saved: bool = False  # trained in full and saved with the adapter (modules_to_save, e.g. a classifier head)


@dataclass
class MemoryEstimate:
    """Rough training memory of one setup (LoRA or QLoRA at one precision), in bytes."""

    setup: str
    precision: str
    weights: int
    adapter_states: int  # LoRA weights + gradients + optimizer states
    activations_per_token: int
    tokens: int  # batch_size * max_length of one forward pass
    gradient_checkpointing: bool
    total: int
    this_machine: bool = False  # the setup this recipe runs on this machine


@dataclass
class InspectResult:
    """Everything inspect-modules found: module tree, presets, adapter counts and a memory estimate."""

    model: str
    source: str
    architecture: str
    config_summary: dict[str, Any]
    groups: list[ModuleGroup]
    presets: dict[str, list[str]]
    adapter: dict[str, Any]
    adapter_source: str  # recipe | defaults | defaults + --set
    target_modules: list[str]
    modules_to_save: list[str]  # as PEFT resolved them (sequence classification adds the classifier head)
    trainable_params: int
    total_params: int
    base_params: int
    adapter_file_bytes: int
    memory: list[MemoryEstimate]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        """Trainable parameters as a percentage of all parameters (PEFT's own figure)."""
        return 100 * self.trainable_params / self.total_params if self.total_params else 0.0


def run_inspect(target: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> InspectResult:
    """Inspect a model (folder, hub id, alias) or a recipe's model + adapter without reading any weights."""
    from lorafit import models

    started = time.perf_counter()
    recipe, from_recipe = _recipe_for(target, overrides)
    source = models.resolve_model_source(recipe.model)
    from peft import get_peft_model  # after the checks above, so a typo in a path fails instantly
    config = models.load_config(recipe.model, source)
    notes = []
    labels = _class_names(recipe, notes) if tasks.task_of(recipe).classifier else None
    model, task_type = models.build_meta_model(config, trust_remote_code=recipe.model.trust_remote_code, labels=labels)
    architecture = type(model).__name__

    eligible = adapters.eligible_modules(model)
    presets, preset_members = _presets(model, eligible)
    base_params = sum(p.numel() for p in model.parameters())
    quantizable = _quantizable_params(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # Width of the logits the loss is computed on: the vocabulary for LMs, the labels for classifiers.
    head_width = getattr(head, "out_features", None) or getattr(config, "num_labels", 0)
    groups = _module_groups(model, eligible, preset_members)

    # PEFT counts on the very config training would build; low_cpu_mem_usage keeps the adapter on meta too.
    # eva and corda shape the adapter from training batches, which a meta-device count has not got: counted as the
    # default start (corda trains the same shapes; eva moves rank between layers, so its count is close, not equal).
    section = recipe.adapter
    if section.init in ("eva", "corda"):
        section = section.model_copy(update={"init": "default"})
        if recipe.adapter.init == "eva":
            notes.append("adapter.init eva moves rank between layers at the start of training: the trainable "
                         "parameters it reports can differ a little from these")
    peft_config = adapters.build_peft_config(section, model, task_type=task_type)
    peft_model = get_peft_model(model, peft_config, low_cpu_mem_usage=True)
    adapters.freeze_adalora_ranknum(peft_model)  # as training holds it
    trainable, total = peft_model.get_nb_trainable_parameters()
    targeted = _targeted_modules(peft_model)
    saved = _saved_modules(peft_model)
    for group in groups:
        group.targeted = any(_pattern(name) == group.pattern for name in targeted)
        group.saved = any(_pattern(name) == group.pattern for name in saved)
    adapted_inputs = _adapted_input_features(peft_model)

    adapter_source = "recipe" if from_recipe else "defaults"
    if not from_recipe and any(o.strip().startswith("adapter.") for o in overrides):
        adapter_source = "defaults + --set"
    elif not from_recipe:
        notes.append("adapter figures use the default adapter section (lora, r=16, all-linear); "
                     "pass a recipe or --set adapter.r=... to change it")
    if recipe.adapter.method == "adalora":
        notes.append(f"adalora: counted at init_r {recipe.adapter.init_r}, the size trained; the saved adapter keeps "
                     f"about target_r / init_r ({recipe.adapter.target_r}/{recipe.adapter.init_r}) of the rank "
                     "triplets once they are pruned")
    memory = _memory_estimates(recipe, config, base_params, quantizable, trainable, adapted_inputs, head_width)
    notes.append(LOAD_PEAK_NOTE)
    return InspectResult(
        model=str(target),
        source=source,
        architecture=architecture,
        config_summary=_config_summary(config),
        groups=groups,
        presets=presets,
        adapter=_adapter_summary(recipe.adapter),
        adapter_source=adapter_source,
        target_modules=sorted(getattr(peft_config, "target_modules", None) or []),
        modules_to_save=saved,
        trainable_params=trainable,
        total_params=total,
        base_params=base_params,
        # PEFT saves adapter weights in float32 (it up-casts 16-bit adapters), plus a header of some KB.
        adapter_file_bytes=trainable * 4,
        memory=memory,
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def check_adapter(recipe: Recipe, source: str, labels: list[str] | None = None) -> None:
    """The recipe's adapter against the model's config on the meta device, no weight read: target modules,
    modules_to_save and layers_to_transform resolve as training would resolve them (a LorafitError naming the key
    otherwise). `labels`: a classifier's classes (its head is part of the model)."""
    from lorafit import models

    config = models.load_config(recipe.model, source)
    classes = (labels or recipe.data.labels) if tasks.task_of(recipe).classifier else None
    model, task_type = models.build_meta_model(config, trust_remote_code=recipe.model.trust_remote_code,
                                               labels=list(classes) if classes else None)
    section = recipe.adapter
    if section.init in ("eva", "corda"):  # shaped from training batches; the targets are resolved the same way
        section = section.model_copy(update={"init": "default"})
    adapters.build_peft_config(section, model, task_type=task_type or "CAUSAL_LM")


def _recipe_for(target: str | Path, overrides: list[str] | tuple[str, ...]) -> tuple[Recipe, bool]:
    """The recipe to inspect: the file given, or a minimal one around a bare model name."""
    text = str(target)
    if text.lower().endswith(_RECIPE_SUFFIXES) or Path(text).is_file():
        return load_recipe(Path(text), overrides), True
    # Only model and adapter matter here; data.train is required by the schema but never read.
    raw: dict[str, Any] = {"name": "inspect", "model": {"path": text}, "data": {"train": "unused"}}
    apply_overrides(raw, overrides)
    return validate_recipe(raw, source="inspect-modules"), False


def _class_names(recipe: Recipe, notes: list[str]) -> list[str]:
    """The recipe's classes (they size the classifier head); two placeholders when its data cannot tell them."""
    from lorafit.data import class_labels

    try:
        return class_labels(recipe)
    except LorafitError as exc:
        notes.append(f"classifier head counted with 2 classes: the classes are unknown ({exc}); list them in "
                     "data.labels")
        return ["LABEL_0", "LABEL_1"]


def _config_summary(config) -> dict[str, Any]:
    text = config.get_text_config()
    return {"model_type": config.model_type, "layers": getattr(text, "num_hidden_layers", None),
            "hidden_size": getattr(text, "hidden_size", None), "vocab_size": getattr(text, "vocab_size", None),
            "checkpoint_dtype": str(getattr(config, "dtype", None) or "").replace("torch.", "") or None}


def _adapter_summary(section: AdapterSection) -> dict[str, Any]:
    summary = {"method": section.method, "r": section.r, "alpha": section.alpha, "dropout": section.dropout,
               "target_modules": section.target_modules, "use_dora": section.use_dora,
               "use_rslora": section.use_rslora, "modules_to_save": list(section.modules_to_save),
               "layers_to_transform": section.layers_to_transform}
    if section.method == "adalora":  # r is not used: each module starts at init_r and is pruned toward target_r
        summary.update(r=None, init_r=section.init_r, target_r=section.target_r)
    return summary


# ----------------------------------------------------------------------------------------------------
# Module tree


def _pattern(name: str) -> str:
    """The module path with layer / expert indices replaced by '*', so 32 layers collapse into one row."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _shape(module: nn.Module) -> str:
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return f"{module.in_features}->{module.out_features}"
    if isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
        return f"{module.weight.shape[0]}->{module.nf}"
    if isinstance(module, torch.nn.Embedding):
        return f"{module.num_embeddings}x{module.embedding_dim}"
    own = [tuple(p.shape) for p in module.parameters(recurse=False)]
    return "x".join(str(d) for d in own[0]) if own else "-"


def _presets(model: nn.Module, eligible: dict[str, str]) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """Each preset's PEFT target names for this model, and the module names they match."""
    resolved: dict[str, list[str]] = {}
    members: dict[str, set[str]] = {}
    for preset in adapters.PRESETS:
        try:
            names = adapters.resolve_target_modules(model, preset)
        except LorafitError:
            names = []  # a preset that matches nothing here (e.g. attention on an unusual naming scheme)
        resolved[preset] = names
        members[preset] = {m for m in eligible if any(m == t or m.endswith("." + t) for t in names)}
    return resolved, members


def _module_groups(model: nn.Module, eligible: dict[str, str],
                   preset_members: dict[str, set[str]]) -> list[ModuleGroup]:
    groups: dict[tuple[str, str, str], ModuleGroup] = {}
    for name, module in model.named_modules():
        is_leaf = next(module.children(), None) is None
        has_weights = next(module.parameters(recurse=False), None) is not None
        # Dropout, activations and rotary tables hold no weights and cannot be targeted: not worth a row.
        if not name or not ((is_leaf and has_weights) or name in eligible):
            continue
        kind, shape = type(module).__name__, _shape(module)
        key = (_pattern(name), kind, shape)
        group = groups.get(key)
        if group is None:
            group = groups[key] = ModuleGroup(
                pattern=key[0], leaf=name.rsplit(".", 1)[-1], kind=kind, shape=shape, count=0,
                params_each=sum(p.numel() for p in module.parameters(recurse=False)), eligible=name in eligible,
                presets=[p for p, names in preset_members.items() if name in names],
            )
        group.count += 1
    return list(groups.values())


def _targeted_modules(peft_model) -> list[str]:
    """Base-model names of the modules PEFT actually adapted (after layers_to_transform etc.)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "base_model.model."
    return [name.removeprefix(prefix) for name, module in peft_model.named_modules()
            if isinstance(module, BaseTunerLayer)]


def _saved_modules(peft_model) -> list[str]:
    """Base-model names of the modules trained in full and saved with the adapter (PEFT's modules_to_save)."""
    from peft.utils import ModulesToSaveWrapper

    prefix = "base_model.model."
    return [name.removeprefix(prefix) for name, module in peft_model.named_modules()
            if isinstance(module, ModulesToSaveWrapper)]


def _adapted_input_features(peft_model) -> int:
    """Sum of input widths of the adapted modules: LoRA dropout keeps one dropped copy of each input."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(getattr(m, "in_features", 0) or 0 for m in peft_model.modules() if isinstance(m, BaseTunerLayer))


def _quantizable_params(model: nn.Module) -> int:
    """Parameters bitsandbytes would store in 4/8 bits: every Linear / Conv1D except the output head."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head)


# ----------------------------------------------------------------------------------------------------
# Memory estimate


def _memory_estimates(recipe: Recipe, config, base_params: int, quantizable: int, trainable: int,
                      adapted_inputs: int, head_width: int) -> list[MemoryEstimate]:
    """LoRA vs QLoRA at the precision this machine would pick, and at bf16 (a GPU) when that differs.

    An estimate: weights + adapter weights/grads/optimizer states + activations of one micro-batch
    (SDPA/flash attention assumed, so no seq x seq score matrices); framework overhead is not included.
    """
    from lorafit import models

    try:
        chosen, _ = models.choose_precision(recipe.training.precision)
        here, gpu_here = chosen.name, chosen.device == "cuda"
    except LorafitError:  # e.g. fp16 asked for on a CPU: estimate for the GPU the recipe is meant for
        here, gpu_here = "bf16", True
    if recipe.model.dtype != "auto":
        here = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[recipe.model.dtype]
    optimizer_bytes = 2 if "8bit" in recipe.training.optimizer else 8  # AdamW: two fp32 moments
    state = trainable * (4 + 4 + optimizer_bytes)  # fp32 adapter weights + fp32 grads + optimizer
    tokens = recipe.training.batch_size * recipe.data.max_length
    quant = recipe.quantization
    estimates = []
    for precision in dict.fromkeys([here, "bf16"]):
        dtype_bytes = _DTYPE_BYTES[precision]
        for quantized in (False, True):
            if quantized:
                bits = quant.bits if quant else 4
                per_param = _NF4_BYTES[quant.double_quant if quant else True] if bits == 4 else 1.0
                # PEFT's prepare_model_for_kbit_training upcasts every weight it does not quantize (embeddings,
                # LM head, norms) to fp32: 4 bytes each, whatever the compute precision (~2 GB on an 8B model).
                weights = int(quantizable * per_param + (base_params - quantizable) * 4)
                setup = f"QLoRA {bits}-bit"
            else:
                weights = base_params * dtype_bytes
                setup = "LoRA"
            # The extra bf16 rows stand for a GPU; the others for this machine.
            checkpointing = adapters.gradient_checkpointing_on(recipe, on_gpu=gpu_here or precision != here,
                                                                quantized=quantized)
            per_token = _activation_bytes_per_token(config, dtype_bytes, checkpointing, adapted_inputs,
                                                    recipe.adapter.dropout > 0, head_width)
            estimates.append(MemoryEstimate(
                setup=setup, precision=precision, weights=weights, adapter_states=state,
                activations_per_token=per_token, tokens=tokens, gradient_checkpointing=checkpointing,
                total=weights + state + per_token * tokens,
                this_machine=precision == here and quantized == (quant is not None),
            ))
    return estimates


def _activation_bytes_per_token(config, dtype_bytes: int, checkpointing: bool, adapted_inputs: int,
                                dropout: bool, head_width: int) -> int:
    """Activations kept for backward, per token.

    Per decoder layer (SwiGLU/GeLU MLP, SDPA attention) about 6h + 2kv + 4f values: norm inputs, q/k/v
    after rotary, attention output, MLP input, gate/up/act outputs and the down-projection input; LoRA
    dropout adds a dropped copy of each adapted module's input. With gradient checkpointing only each
    layer's input is kept, plus one layer being recomputed. Logits are kept in the compute dtype, then
    up-cast to fp32 for the loss, whose gradient is fp32 too.
    """
    text = config.get_text_config()
    hidden = getattr(text, "hidden_size", 0) or 0
    layers = getattr(text, "num_hidden_layers", 1) or 1
    heads = getattr(text, "num_attention_heads", 1) or 1
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    ffn = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    dropout_copies = adapted_inputs if dropout else 0
    per_layer = 6 * hidden + 2 * kv + 4 * ffn
    if checkpointing:
        values = layers * hidden + per_layer + dropout_copies // layers
    else:
        values = layers * per_layer + dropout_copies
    return int(values * dtype_bytes + head_width * (dtype_bytes + 4 + 4))
