"""recipe.adapter -> a PEFT config and the wrapped model.

Target presets (`all-linear`, `attention`, `attention+mlp`) are resolved from the module names the model
actually has, so one recipe works across Llama/Qwen/Mistral/Gemma (q_proj...), GPT-2 (Conv1D c_attn),
Falcon/BLOOM (query_key_value), Phi and BERT (query/key/value/dense).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit import adapter_init, run_folder, tasks
from lorafit.errors import LorafitError
from lorafit.recipe import AdapterSection, ModelSection, Recipe, load_recipe

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from torch import nn
    from transformers import PreTrainedTokenizerBase

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
    # Subclasses count as embeddings too (Gemma's GemmaTextScaledWordEmbedding is an nn.Embedding).
    linear = [n for n, kind in modules.items() if not kind.endswith("Embedding") and not _is_head(n)]
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


def build_peft_config(section: AdapterSection, model: nn.Module, task_type: str = "CAUSAL_LM",
                      total_step: int | None = None) -> PeftConfig:
    """The PEFT config (LoRA, AdaLoRA, IA3 or prefix tuning) for this model.

    `total_step` is the run's optimizer step count, which AdaLoRA's budget schedule spans; without one (counting
    parameters, which it does not change) the shortest schedule the config accepts is used.
    """
    from peft import AdaLoraConfig, EvaConfig, IA3Config, LoraConfig, PrefixTuningConfig
    from peft.tuners.lora.config import CordaConfig

    modules = eligible_modules(model)
    for name in section.modules_to_save:
        if not any(n == name or n.endswith("." + name) for n in dict(model.named_modules())):
            raise LorafitError(f"'{name}' is not a module of this model", where="adapter.modules_to_save",
                               hint=f"this model has: {_describe_leaf_names(modules)}")
    modules_to_save = list(section.modules_to_save) or None
    if section.method == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=section.num_virtual_tokens,
                                  modules_to_save=modules_to_save)
    targets = resolve_target_modules(model, section.target_modules)
    layers = _layer_count(model)
    beyond = [i for i in section.layers_to_transform or [] if layers is not None and i >= layers]
    if beyond:
        raise LorafitError(f"layer {beyond[0]} does not exist: this model has {layers} layers (0-{layers - 1})",
                           where="adapter.layers_to_transform", hint=f"use indices from 0 to {layers - 1}")
    if section.method == "ia3":
        mlp = [t for t in targets if any(_has_part(n, _MLP_PARTS) and not _has_part(n, _ATTENTION_PARTS)
                                         for n in modules if n == t or n.endswith("." + t))]
        return IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=mlp,
                         modules_to_save=modules_to_save)
    if section.method == "adalora":
        embeddings = sorted({n.split(".")[-1] for n, kind in modules.items() if kind.endswith("Embedding")
                             and any(n == t or n.endswith("." + t) for t in targets)})
        if embeddings:
            raise LorafitError(f"{', '.join(embeddings)}: method adalora adapts linear layers only, not embeddings",
                               where="adapter.target_modules", hint="remove them, or use method: lora")
        return AdaLoraConfig(
            task_type=task_type, init_r=section.init_r, target_r=section.target_r, tinit=section.tinit,
            tfinal=section.tfinal, deltaT=section.deltaT, beta1=section.beta1, beta2=section.beta2,
            orth_reg_weight=section.orth_reg_weight, total_step=total_step or section.tinit + section.tfinal + 1,
            lora_alpha=section.alpha, lora_dropout=section.dropout, target_modules=targets, bias=section.bias,
            modules_to_save=modules_to_save, layers_to_transform=section.layers_to_transform,
        )
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
        # loftq starts from PEFT's default and replaces A and B afterwards (lorafit.adapter_init), so the saved
        # adapter is a plain LoRA that loads on the 4-bit base as it is.
        init_lora_weights=True if section.init in ("default", "loftq") else section.init,
        eva_config=EvaConfig() if section.init == "eva" else None,
        corda_config=CordaConfig() if section.init == "corda" else None,
    )


def _layer_count(model: nn.Module) -> int | None:
    """How many transformer layers the model has (None when its config does not say)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    return None


def gradient_checkpointing_on(recipe: Recipe, *, on_gpu: bool, quantized: bool) -> bool:
    """training.gradient_checkpointing as train applies it; "auto" is on for GPUs and for 4/8-bit bases.

    On a CPU, memory is rarely the limit and recomputation costs ~30% speed; on GPUs and under quantization
    memory is what decides the batch size.
    """
    setting = recipe.training.gradient_checkpointing
    return on_gpu or quantized if setting == "auto" else bool(setting)


def wrap_model(recipe: Recipe, model: nn.Module, *, gradient_checkpointing: bool, precision: str = "fp32",
               zero3: bool = False, total_steps: int | None = None,
               init_batches: list | None = None) -> PeftModel:
    """The base model frozen and wrapped with the recipe's adapter (prepared for k-bit training under QLoRA).

    adapter.init loftq, eva and corda are initialised here through lorafit.adapter_init; eva and corda read
    `init_batches` (adapter_init.init_batches: the first training batches). What they did is recorded on the
    returned model as `lorafit_start` (an adapter_init.AdapterStart: a line for the run's notes and, for corda, the
    adapter as it started, which export needs to save it as a plain LoRA).

    For sequence classification PEFT's SEQ_CLS task adds the classifier head (`classifier`, or `score` on decoders)
    to modules_to_save: it is trained fully and saved with the adapter; presets never target it with LoRA.

    `precision` is the compute precision (lorafit.models.Precision.name) and `zero3` says DeepSpeed ZeRO-3 partitions
    the weights; both change how the trainable parameters are held:
    - ZeRO-3 (not 4-bit): the adapter keeps the base model's dtype, and gradient checkpointing is reentrant. These
      are TRL's SFTTrainer rules for PEFT under ZeRO-3 (trl/trainer/sft_trainer.py): ZeRO-3 gathers a layer's
      parameters into one buffer of the first parameter's dtype, so fp32 adapters on a bf16 base fail at the first
      step, and PEFT + ZeRO-3 needs reentrant checkpointing to train correctly.
    - fp16 (not ZeRO-3, which keeps its own fp32 master weights): every trainable parameter is fp32. PEFT upcasts
      the LoRA matrices only; a classifier head, modules_to_save copies and trained biases would stay fp16, and the
      fp16 gradient scaler refuses them ("Attempting to unscale FP16 gradients").

    `total_steps` is the run's optimizer step count: the span of AdaLoRA's rank budget schedule.
    """
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    config = build_peft_config(recipe.adapter, model, task_type=tasks.task_of(recipe).peft_task_type, total_step=total_steps)
    start = read_trained_adapter(recipe.adapter.init_from) if recipe.adapter.init_from else None
    if start is not None:
        _check_same_adapter(start, config)
        check_adapter_fits(start, model, model.config, source=model.config.name_or_path or recipe.model.path,
                           base_setting="model.path")
    quantized = recipe.quantization is not None
    checkpointing = {"use_reentrant": zero3}
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    autocast = not (zero3 and not quantized)
    init = recipe.adapter.init
    if zero3 and init in ("loftq", "eva", "corda"):
        # They read or resize whole weight matrices, which ZeRO-3 has already split across the processes.
        raise LorafitError(f"init {init} needs each process to hold whole weights, which DeepSpeed ZeRO-3 partitions",
                           where="adapter.init", hint="use ZeRO-2 or FSDP for this run, or init: default")
    if init in adapter_init.DATA_DRIVEN and not init_batches:
        raise LorafitError(f"init {init} reads the first training batches, and there are none", where="adapter.init",
                           hint="check data.train, or use init: default")
    if init == "corda":
        adapter_init.prepare_corda(model, config, init_batches)
    if start is not None:
        from peft import PeftModel

        wrapped = PeftModel.from_pretrained(model, str(start.path), is_trainable=True,
                                            autocast_adapter_dtype=autocast)
    else:
        wrapped = get_peft_model(model, config, autocast_adapter_dtype=autocast)
    freeze_adalora_ranknum(wrapped)
    if init == "corda":
        wrapped.lorafit_start = adapter_init.AdapterStart(
            f"adapter.init corda: started from the base's main directions on {len(init_batches)} training batches; "
            f"saved as a plain LoRA of rank {2 * recipe.adapter.r} on the original base",
            corda_start=adapter_init.initial_corda_state(wrapped))
    elif init == "eva":
        adapter_init.initialize_eva(wrapped, init_batches)
        ranks = wrapped.peft_config[wrapped.active_adapter].rank_pattern
        wrapped.lorafit_start = adapter_init.AdapterStart(
            f"adapter.init eva: A from the inputs of {len(init_batches)} training batches; {len(ranks)} layers got a "
            f"rank other than {recipe.adapter.r}")
    elif init == "loftq":
        wrapped.lorafit_start = adapter_init.AdapterStart(
            adapter_init.initialize_loftq(wrapped, model.config.name_or_path).summary())
    if precision == "fp16" and not zero3:
        for parameter in wrapped.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
    return wrapped


@contextmanager
def trainable_dtypes_kept(model: nn.Module) -> Iterator[None]:
    """Whatever runs inside leaves every trainable parameter in the dtype `wrap_model` gave it.

    One rule for LoRA and QLoRA: the trainable parameters are fp32 master copies (PEFT's autocast_adapter_dtype,
    "typically required for stable training", peft/mapping_func.py), except under ZeRO-3 on a 16-bit base, where
    DeepSpeed keeps the fp32 copies itself (`wrap_model`). TRL's trainers (SFT, DPO, KTO, GRPO, RLOO 1.16) cast every
    trainable parameter of a quantized model to bf16 when they are built, following the QLoRA paper's bf16 adapters
    (trl/trainer/sft_trainer.py, "the PEFT adapter weights are converted to bf16"): on fp16 GPUs (T4, V100) that
    would leave bf16 weights under fp16 autocast and a bf16 classifier head; on bf16 GPUs it drops the fp32 master
    copy that plain LoRA keeps; on a CPU the adapter runs in emulated bf16. The adapter is 0.1-1% of the model, so
    its fp32 copy and optimizer state cost little. The cast happens in the constructor, before any optimizer
    exists, so restoring the dtype right after is safe (the same `.data` swap TRL does).
    """
    before = {name: parameter.dtype for name, parameter in model.named_parameters() if parameter.requires_grad}
    yield
    for name, parameter in model.named_parameters():
        if name in before and parameter.dtype != before[name]:
            parameter.data = parameter.data.to(before[name])


def freeze_adalora_ranknum(model: PeftModel) -> None:
    """Keep AdaLoRA's ranknum (the fixed rank each delta is divided by) out of training; no-op for other methods.

    PEFT's upcast of an adapter on a 16-bit base (autocast_adapter_dtype) re-creates it as a trainable Parameter: it
    would drift with training, yet it is never saved (PEFT resets it to init_r on load), so the saved adapter and a
    resumed run would not be the model that was trained.
    """
    for name, parameter in model.named_parameters():
        if ".ranknum." in name:
            parameter.requires_grad_(False)


def _check_same_adapter(start: TrainedAdapter, config: PeftConfig) -> None:
    """Refuse adapter.init_from when the recipe's adapter settings differ from the saved adapter's (they would be
    silently replaced by the saved ones)."""
    saved = start.config
    wanted = config.to_dict()
    where = f"adapter.init_from: {start.path}"
    if saved.get("peft_type") != wanted.get("peft_type"):
        raise LorafitError(f"is a {saved.get('peft_type')} adapter, the recipe asks for {wanted.get('peft_type')}",
                           where=where, hint="set adapter.method to the saved adapter's method")
    for key, field in (("r", "r"), ("lora_alpha", "alpha"), ("use_dora", "use_dora"), ("use_rslora", "use_rslora")):
        if key in saved and key in wanted and saved[key] != wanted[key]:
            raise LorafitError(f"was trained with {key} {saved[key]}, the recipe says adapter.{field}: {wanted[key]}",
                               where=where, hint="extend the recipe that trained it, or set the same value")
    saved_targets = set(saved.get("target_modules") or [])
    wanted_targets = set(wanted.get("target_modules") or [])
    if saved_targets and wanted_targets and saved_targets != wanted_targets:
        raise LorafitError(f"adapts {', '.join(sorted(saved_targets))}, the recipe's adapter.target_modules resolve "
                           f"to {', '.join(sorted(wanted_targets))}", where=where,
                           hint="extend the recipe that trained it, or list the same target_modules")
    if saved.get("task_type") not in (None, wanted.get("task_type")):
        raise LorafitError(f"is a {saved.get('task_type')} adapter, this recipe trains {wanted.get('task_type')}",
                           where=where, hint="start from an adapter of the same task")


# ----------------------------------------------------------------------------------------------------
# Trained adapters read back (merge, eval): the run folder is the record, so users never re-type the base


@dataclass(frozen=True)
class TrainedAdapter:
    """A saved PEFT adapter folder, and the resolved recipe of the run folder it sits in (if any)."""

    path: Path
    config: dict[str, Any]  # adapter_config.json
    recipe: Recipe | None  # <run>/recipe.yaml, one level above <run>/adapter

    @property
    def base(self) -> str:
        """The base model recorded by PEFT at training time."""
        return str(self.config.get("base_model_name_or_path") or "")

    @property
    def quantized(self) -> bool:
        """Whether it was trained on a quantized (QLoRA) base."""
        return self.recipe is not None and self.recipe.quantization is not None


def read_trained_adapter(path: str | Path) -> TrainedAdapter:
    """Open an adapter folder written by `lorafit train` (or any PEFT save_pretrained); clear errors otherwise."""
    path = Path(path).expanduser()
    where = f"adapter: {path}"
    if not path.exists():
        raise LorafitError("adapter folder not found", where=where,
                           hint="pass the adapter/ folder of a run, e.g. runs/<name>/adapter")
    if not path.is_dir():
        raise LorafitError("expected an adapter folder, got a file", where=where)
    if not (path / "adapter_config.json").is_file():
        hint = "pass its adapter/ subfolder" if (path / "adapter" / "adapter_config.json").is_file() else (
            "point at a folder saved by lorafit train or PEFT save_pretrained")
        raise LorafitError("no adapter_config.json in this folder", where=where, hint=hint)
    from lorafit.models import check_weight_files, read_json_file

    config = read_json_file(path / "adapter_config.json", where=where)
    if not isinstance(config.get("peft_type"), str):
        raise LorafitError("adapter_config.json does not name its peft_type", where=where,
                           hint="point at a folder saved by lorafit train or PEFT save_pretrained")
    if not (path / "adapter_model.safetensors").is_file():
        raise LorafitError("no adapter_model.safetensors in the adapter folder", where=where,
                           hint="lorafit reads safetensors adapters only (pickled .bin files can run code when loaded)")
    check_weight_files(path, where=where)
    run_recipe = path.parent / run_folder.RECIPE
    recipe = load_recipe(run_recipe) if run_recipe.is_file() else None
    return TrainedAdapter(path=path, config=config, recipe=recipe)


def base_model_section(adapter: TrainedAdapter, override: str | None = None) -> ModelSection:
    """The base model to put under an adapter: `override` (--base), else the one recorded at training time.

    Loading flags (revision, trust_remote_code, pickle weights) come from the run's recipe when there is one.
    """
    section = adapter.recipe.model if adapter.recipe is not None else None
    path = override or adapter.base
    if not override and adapter.base and section is not None and not Path(adapter.base).exists() and (
            adapter.base.startswith(("/", ".", "~"))):
        path = section.path  # the recorded folder moved (e.g. a cleared cache); the recipe's alias/id still works
    if not path:
        raise LorafitError("the adapter does not record its base model", where=f"adapter: {adapter.path}",
                           hint="pass --base MODEL")
    return section.model_copy(update={"path": path}) if section is not None else ModelSection(path=path)


def load_adapter_tokenizer(adapter: TrainedAdapter, *,
                           trust_remote_code: bool = False) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with the adapter (it carries the training chat template), or None if it has none."""
    from transformers import AutoTokenizer

    if not (adapter.path / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(str(adapter.path), trust_remote_code=trust_remote_code)


def check_adapter_fits(adapter: TrainedAdapter, model: nn.Module, config: Any, *, source: str,
                       base_setting: str, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Refuse an adapter whose base (architecture, vocabulary, module shapes) differs from this model.

    `base_setting` is where the caller's user chose the base (merge: --base, eval and train: model.path), for the
    hint.

    Checked on the adapter file's header and a (meta-device) model, before any weights are read, so a
    mismatch is one clear line instead of a size-mismatch traceback from deep inside PEFT.
    """
    where = f"adapter: {adapter.path}"
    recorded = Path(adapter.base).expanduser() if adapter.base else None
    if recorded is not None and (recorded / "config.json").is_file() and recorded.resolve() != Path(source).resolve():
        trained = json.loads((recorded / "config.json").read_text(encoding="utf-8"))
        for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
            if key in trained and trained[key] != getattr(config, key, None):
                raise LorafitError(
                    f"was trained on {adapter.base} ({key} {trained[key]}), but the base given has {key} "
                    f"{getattr(config, key, None)}", where=where,
                    hint=f"use the base model it was trained on ({base_setting})")
    mismatch = _shape_mismatch(adapter, model)
    if mismatch:
        raise LorafitError(f"does not fit base {source}: {mismatch}", where=where,
                           hint=f"use the base model it was trained on ({base_setting})")
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if tokenizer is not None and vocab and len(tokenizer) > vocab:
        raise LorafitError(f"its tokenizer has {len(tokenizer)} tokens but base {source} has a vocabulary of "
                           f"{vocab}", where=where, hint=f"use the base model it was trained on ({base_setting})")


def _shape_mismatch(adapter: TrainedAdapter, model: nn.Module) -> str | None:
    """The first adapter tensor that has no place in the model (missing module or wrong width), if any."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    with safe_open(str(adapter.path / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            shape = list(handle.get_slice(key).get_shape())
            name = key.removeprefix("base_model.model.")
            for marker, check in _ADAPTER_TENSORS.items():
                if marker in name:
                    module_name = name.split(marker)[0]
                    module = modules.get(module_name)
                    if module is None:
                        return f"it adapts {module_name}, which this model does not have"
                    expected = check(module)
                    got = shape[1] if marker.startswith((".lora_A", ".lora_embedding_A")) else shape[0]
                    if expected is not None and got != expected:
                        return f"{module_name} is {expected} wide here, {got} in the adapter"
                    break
            else:  # a full tensor (modules_to_save, trained embeddings): must match the base parameter
                param = params.get(name.replace(".base_layer.", ".").replace(".modules_to_save.", "."))
                if param is not None and list(param.shape) != shape:
                    return f"{name} has shape {list(param.shape)} here, {shape} in the adapter"
    return None


def _in_features(module: nn.Module) -> int | None:
    if hasattr(module, "in_features"):
        return module.in_features
    if hasattr(module, "nf"):  # transformers Conv1D: weight is (in, out)
        return module.weight.shape[0]
    return getattr(module, "num_embeddings", None)


def _out_features(module: nn.Module) -> int | None:
    for attribute in ("out_features", "nf", "embedding_dim"):  # Linear, transformers Conv1D, Embedding
        if getattr(module, attribute, None):
            return getattr(module, attribute)
    return None


# Adapter tensor name marker -> the module width it must equal (LoRA A is (r, in), LoRA B is (out, r)).
_ADAPTER_TENSORS = {
    ".lora_A.": _in_features,
    ".lora_B.": _out_features,
    ".lora_embedding_A": _in_features,
    ".lora_embedding_B": _out_features,
    ".lora_magnitude_vector": lambda module: None,
    # AdaLoRA's triplets (PEFT saves them without the adapter name): A is (r, in), B is (out, r), E is (r, 1).
    ".lora_A": _in_features,
    ".lora_B": _out_features,
    ".lora_E": lambda module: None,
    ".ia3_l": lambda module: None,
}
