"""`lorafit merge --format gguf-adapter`: the LoRA adapter alone as a GGUF LoRA file, for `llama-cli --lora` and
Ollama's `ADAPTER`, verified before it is called done.

The file is what llama.cpp's convert_lora_to_gguf.py writes: general.type=adapter, adapter.type=lora,
adapter.lora.alpha, and per adapted weight `<llama.cpp name>.lora_a` (rank x in) and `.lora_b` (out x rank), with
Llama's Q/K row permutation applied to B. llama.cpp scales each pair by alpha / rank; PEFT's own scaling (alpha / r,
rsLoRA's alpha / sqrt(r), per-module ranks) is written as that alpha, or folded into B when one alpha cannot express
it (then alpha is 0, which llama.cpp reads as "no scaling").

Verification, against the logits of base+adapter in PEFT: the file is read back, each B @ A * scale is added to the
base weights (undoing the permutation), and the logits must agree within the quant type's tolerance; where
llama-cpp-python is installed, llama.cpp runs the base (written as f32 GGUF to a temporary file) with the adapter
file and its logits must agree too.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit import gguf_export
from lorafit.errors import LorafitError, RunFailed
from lorafit.merge import compare_logits, prompt_logits

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

ADAPTER_FILE = "adapter.gguf"
QUANTS = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GgufAdapterReport:
    """What was written and how it was verified."""

    file: str
    quant: str
    size_bytes: int
    architecture: str
    base: str  # the base model the adapter needs
    alpha: float  # adapter.lora.alpha as written (0: the scaling is folded into lora_b)
    tensors: int  # lora_a/lora_b pairs
    max_logit_diff: float
    tolerance: float
    top1_agreement: float
    min_top1: float
    verified_with: list[str]
    llama_cpp_max_logit_diff: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def check_adapter_exportable(config: PretrainedConfig, adapter_config: dict[str, Any], quant: str) -> str:
    """Refuse adapters a GGUF LoRA file cannot hold, before weights are loaded; returns llama.cpp's arch name."""
    if quant not in QUANTS:
        raise LorafitError(f"{quant!r} is not a type for LoRA adapters", where="--quant",
                           hint=f"one of: {', '.join(QUANTS)}")
    architecture = gguf_export.llama_cpp_architecture(config, "gguf-adapter")
    if adapter_config.get("peft_type", "LORA") not in ("LORA", "ADALORA"):
        raise LorafitError(f"a {adapter_config.get('peft_type')} adapter is not a LoRA adapter", where="--format "
                           "gguf-adapter", hint="use --format gguf to merge it into the model instead")
    if adapter_config.get("use_dora"):
        raise LorafitError("llama.cpp's LoRA files cannot hold DoRA's magnitude vectors", where="--format gguf-adapter",
                           hint="use --format gguf to merge it into the model instead")
    if adapter_config.get("modules_to_save"):
        raise LorafitError(f"the adapter carries fully trained modules ({', '.join(adapter_config['modules_to_save'])}) "
                           "that a LoRA file cannot hold", where="--format gguf-adapter",
                           hint="use --format gguf to merge it into the model instead")
    return architecture


def export_gguf_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, folder: Path, *, quant: str, name: str,
                        base: str, prompts: list[list[int]], reference: list[torch.Tensor]) -> GgufAdapterReport:
    """Write the attached adapter as folder/adapter.gguf and verify it against `reference` (base+adapter logits).

    The model is consumed: its adapter is unloaded and the base weights are changed to check the file.
    """
    import gguf

    started = time.perf_counter()
    notes: list[str] = []
    config = model.base_model.model.config
    architecture = gguf_export.llama_cpp_architecture(config, "gguf-adapter")
    pairs = _lora_pairs(model, config, architecture)
    scales = {round(scale * a.shape[0], 6) for _, _, a, _, scale in pairs}
    alpha = scales.pop() if len(scales) == 1 else 0.0  # one alpha fits every pair, or the scale goes into B
    path = folder / ADAPTER_FILE
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kind = gguf.GGMLQuantizationType[quant.upper()]
    for gguf_name, _, lora_a, lora_b, scale in pairs:
        for suffix, tensor in ((".lora_a", lora_a), (".lora_b", lora_b if alpha else lora_b * scale)):
            array = tensor.detach().float().cpu().numpy()
            try:
                packed, used = gguf.quants.quantize(array, kind), kind
            except gguf.QuantError:  # rows shorter than a block (lora_b's rows are `rank` long): f16
                used = gguf.GGMLQuantizationType.F16
                packed = gguf.quants.quantize(array, used)
            writer.add_tensor(gguf_name + suffix, packed, raw_dtype=used)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    modules = {gguf_name: module_name for gguf_name, module_name, *_ in pairs}

    bare = model.unload()  # the base model, without LoRA layers: what llama.cpp's base GGUF holds
    bare.eval()
    verified_with = ["gguf reader"]
    llama_cpp_diff = _check_llama_cpp(bare, tokenizer, path, prompts, reference, notes)
    if llama_cpp_diff is not None:
        verified_with.append("llama.cpp")
    _apply_file(bare, path, modules, config)
    max_diff, scale, top1 = compare_logits(prompt_logits(bare, prompts), reference)
    tolerance = gguf_export.TOLERANCE[quant] * max(1.0, scale)
    failed = llama_cpp_diff is not None and not llama_cpp_diff <= tolerance
    if failed or not (max_diff <= tolerance and top1 >= gguf_export.MIN_TOP1[quant]):
        raise RunFailed(
            f"GGUF adapter verification failed: base + {ADAPTER_FILE} differs from base+adapter by up to "
            f"{max(max_diff, llama_cpp_diff or 0.0):.4g} (tolerance {tolerance:.3g} for {quant}), top-1 agreement "
            f"{100 * top1:.1f}%; nothing was written", where=str(folder), hint="report this with --debug output")
    return GgufAdapterReport(
        file=ADAPTER_FILE, quant=quant, size_bytes=path.stat().st_size, architecture=architecture, base=base,
        alpha=alpha, tensors=len(pairs), max_logit_diff=max_diff, tolerance=tolerance, top1_agreement=top1,
        min_top1=gguf_export.MIN_TOP1[quant], verified_with=verified_with, llama_cpp_max_logit_diff=llama_cpp_diff,
        seconds=time.perf_counter() - started, notes=notes)


def _lora_pairs(model: PeftModel, config: PretrainedConfig, architecture: str) -> list[tuple]:
    """(llama.cpp tensor name, module name, A, B with Llama's Q/K permutation, PEFT scale) per adapted weight.

    An AdaLoRA module's delta B (A * E) * alpha / ranknum is a LoRA pair with the singular values E folded into A;
    a module pruned to rank 0 adds nothing and has no pair.
    """
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    names = gguf_export.tensor_names(config, architecture)
    inner = model.base_model.model
    pairs = []
    for module_name, module in inner.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        gguf_name = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise LorafitError(f"the adapter adapts {module_name}, which llama.cpp's {architecture} graph does not "
                               "take a LoRA for", where="--format gguf-adapter",
                               hint="use --format gguf to merge it into the model instead")
        if isinstance(module, AdaLoraLayer):
            if module.r["default"] == 0:
                continue
            lora_a = module.lora_A["default"] * module.lora_E["default"]
            lora_b = module.lora_B["default"]
            scale = float(module.scaling["default"]) / (float(module.ranknum["default"]) + 1e-5)
        else:
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            scale = float(module.scaling["default"])
        pairs.append((gguf_name, module_name, lora_a,
                      gguf_export.to_llama_cpp_rows(lora_b.float(), module_name, config), scale))
    if not pairs:
        raise LorafitError("the adapter has no LoRA weights", where="--format gguf-adapter")
    return pairs


def _apply_file(model, path: Path, modules: dict[str, str], config: PretrainedConfig) -> None:
    """Add each B @ A * scale read back from the file to the base weight it belongs to, as llama.cpp would."""
    import gguf
    import torch

    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
               for t in reader.tensors}
    with torch.no_grad():
        for gguf_name, module_name in modules.items():
            lora_a, lora_b = tensors[gguf_name + ".lora_a"], tensors[gguf_name + ".lora_b"]
            delta = lora_b @ lora_a * (alpha / lora_a.shape[0] if alpha else 1.0)
            delta = gguf_export.to_llama_cpp_rows(delta, module_name, config, inverse=True)
            weight = model.get_submodule(module_name).weight
            weight += delta.to(weight.dtype)


def _check_llama_cpp(model, tokenizer, path: Path, prompts: list[list[int]], reference: list[torch.Tensor],
                     notes: list[str]) -> float | None:
    """Max |logit diff| of llama.cpp running the base (as f32 GGUF) with the adapter file; None without llama.cpp
    or when it crashed (said in `notes`)."""
    import numpy as np
    import torch

    from lorafit.llama_cpp_run import NOT_INSTALLED, LlamaCppCrashed, crash_note, llama_cpp_installed, run_llama_cpp

    if not llama_cpp_installed():
        notes.append(NOT_INSTALLED)
        return None
    try:
        gguf_export.check_exportable(model.config, tokenizer, "f32")
    except LorafitError as exc:
        notes.append(f"llama.cpp check skipped: the base cannot be written as GGUF here ({exc.message})")
        return None
    with tempfile.TemporaryDirectory(prefix=".lorafit-base-", dir=path.parent) as scratch:
        base = Path(scratch) / "base.gguf"
        gguf_export.write_model_gguf(model, tokenizer, base, quant="f32", name="base", notes=[])
        try:
            answer = run_llama_cpp(base, lora_path=path, n_ctx=max(map(len, prompts)) + 8, logits_for=prompts,
                                   logits_dir=Path(scratch))
        except LlamaCppCrashed as crash:
            notes.append(crash_note(crash, f"applying {path.name} to the base"))
            return None
        return max((torch.from_numpy(np.load(file)) - want).abs().max().item()
                   for file, want in zip(answer["logits"], reference, strict=True))
