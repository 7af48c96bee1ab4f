"""`lorafit merge`: adapter(s) -> one full model that plain transformers loads (or one combined adapter).

Read `run_merge` top to bottom: the options (`MergeOptions`, one field per command-line option) -> read the adapters
and their run folders -> check they fit the base (on the meta device, no weights read) -> load one base copy ->
attach and, for several, combine the adapters with PEFT's `add_weighted_adapter` -> the writer of the output format
(`_WRITERS`: safetensors, gguf, gguf-adapter; or the combined adapter) merges, verifies logits against base+adapter
and writes into a staging folder -> published atomically.

A sequence-classification adapter (PEFT task SEQ_CLS) is merged into a `*ForSequenceClassification` model over the
classes its run folder recorded; its trained classifier head (modules_to_save) replaces the base's, and the config
carries id2label / label2id and the pad token id, so plain `AutoModelForSequenceClassification` loads it.

QLoRA adapters are never merged into 4-bit weights. They are merged into a 16/32-bit base: either the
original weights, or the weights after the same 4-bit quantize -> de-quantize round trip training saw.
`auto` measures both against the trained QLoRA model (4-bit base + adapter) and keeps the closer one. An adapter
started with adapter.init loftq corrects the quantization error itself, so it always goes on the de-quantized weights.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit import adapters, models, run_folder, tasks, vllm_rules
from lorafit.errors import LorafitError, RunFailed, first_line

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from lorafit.adapters import TrainedAdapter
    from lorafit.gguf_adapter import GgufAdapterReport
    from lorafit.gguf_export import GgufReport
    from lorafit.recipe import ModelSection

METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
BASE_WEIGHTS = ("auto", "original", "dequantized")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Files a merge usually writes, refused up front when a file of the user's already has the name.
_LIKELY_OUTPUTS = ("config.json", "generation_config.json", "adapter_config.json", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
                   "merges.txt", run_folder.MODEL_CARD, run_folder.MERGE_RECORD, "model.gguf", "Modelfile",
                   "adapter.gguf")
# Max |logit difference| allowed between merged and base+adapter, relative to the largest logit: fp32
# merges are exact up to summation order; 16-bit ones round every merged weight once, which moves the
# extreme logits of a 30-layer model by a few percent (SmolLM2-135M, bf16: 3.7%).
_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}
# Share of positions whose most likely next token must stay the same (16-bit near-ties may flip).
_MIN_TOP1_AGREEMENT = 0.9
_FALLBACK_PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.",
                     "List three colours.", "Translate 'good morning' into German.")
_MAX_PROMPT_TOKENS = 128


@dataclass
class AdapterSpec:
    """One adapter to merge and its weight in a weighted combination."""

    path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class MergeOptions:
    """What `lorafit merge` is asked to do: one field per command-line option, each documented here."""

    adapters: Sequence[AdapterSpec]  # ADAPTER and --adapter PATH[:WEIGHT]: the adapter(s) to merge (kept as a tuple)
    out_dir: Path  # --out: the folder the merged model (or adapter) is written into (~ expanded)
    base: str | None = None  # --base: the base model; None: the one recorded with the adapter
    method: str = "linear"  # --method: how several adapters are combined (METHODS, PEFT's add_weighted_adapter)
    density: float = 0.5  # --density: share of weights kept by ties / dare_* / magnitude_prune, in (0, 1]
    as_adapter: bool = False  # --as-adapter: write the combined adapter (a PEFT folder) instead of a merged model
    base_weights: str = "auto"  # --base-weights: a QLoRA adapter's base: original, dequantized or auto (BASE_WEIGHTS)
    dtype: str = "auto"  # --dtype: of the merged weights; auto: as the base is stored (DTYPES)
    overwrite: bool = False  # --overwrite: replace an earlier merge's own files in out_dir
    max_shard_size: str = "5GB"  # --max-shard-size: largest safetensors shard, as save_pretrained parses it
    fmt: str = "safetensors"  # --format: safetensors, gguf or gguf-adapter (the keys of _WRITERS)
    quant: str | None = None  # --quant: the GGUF weight type; None: f16 (GGUF formats only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "out_dir", Path(self.out_dir).expanduser())


@dataclass
class MergeResult:
    """What was merged, how it was verified, and what it cost."""

    out_dir: Path
    base: str
    adapters: list[dict[str, Any]]
    method: str | None
    as_adapter: bool
    dtype: str
    base_weights: str  # original | dequantized | original (not QLoRA)
    base_weights_reason: str
    qlora_fidelity: dict[str, float]  # candidate base -> max |logit diff| vs the trained QLoRA model
    max_logit_diff: float
    tolerance: float
    top1_agreement: float
    adapter_effect: float  # max |logit change| the adapter causes: the scale the difference is judged against
    prompts: int
    files: list[str]
    peak_memory_mb: float
    seconds: float
    notes: list[str] = field(default_factory=list)
    task: str = tasks.DEFAULT
    labels: list[str] | None = None  # sequence classification: the class names, in id order
    format: str = "safetensors"  # safetensors | gguf | gguf-adapter
    gguf: GgufReport | GgufAdapterReport | None = None  # GGUF formats: the file, its type and how it was verified
    device: str = "cpu"  # where the base was loaded and merged: cpu, or cuda:N when the model fits the GPU


@dataclass
class _Adapters:
    """The adapters to merge and the base they go on: enough to build base + adapter(s) more than once (QLoRA)."""

    trained: list[TrainedAdapter]
    specs: Sequence[AdapterSpec]
    section: ModelSection
    source: str
    model_class: type  # the transformers class of the base, from its config
    dtype: torch.dtype
    method: str
    density: float
    classifier: dict | None  # models.classifier_config for a sequence-classification adapter
    device: str = "cpu"  # where the full base is loaded (merge_device)

    @property
    def combine(self) -> bool:
        """Several adapters, or one re-weighted: combined into one with PEFT's add_weighted_adapter."""
        return len(self.specs) > 1 or self.specs[0].weight != 1.0

    def on_full_base(self) -> PeftModel:
        """The 16/32-bit base as stored on disk, with the adapter(s) attached."""
        return self.attached_to(_load_full(self.model_class, self.section, self.source, self.dtype,
                                           self.classifier, self.device))

    def attached_to(self, base) -> PeftModel:
        """`base` with the adapter(s) attached (combined into one named 'default' when several)."""
        return _attach(base, self.trained, self.specs, self.method, self.density, self.combine)


@dataclass
class _BaseWeights:
    """Which base weights the adapter(s) are merged into, and why (MergeResult.base_weights*, qlora_fidelity)."""

    name: str  # original | dequantized
    reason: str
    fidelity: dict[str, float] = field(default_factory=dict)  # QLoRA: candidate -> max |logit diff| vs trained


@dataclass
class _Inputs:
    """The adapters, read and checked against the base on the meta device, and what building and verifying need."""

    sources: _Adapters
    tokenizer: PreTrainedTokenizerBase  # the first adapter's own (with its chat template), else the base's
    labels: list[str] | None  # sequence classification: the class names, in id order
    prompts: list[list[int]]  # token ids the output's logits are compared on

    @property
    def dtype_name(self) -> str:
        return str(self.sources.dtype).removeprefix("torch.")


@dataclass
class _Attached:
    """One base copy with the adapter(s) attached, unmerged: what every writer starts from and is verified against."""

    model: PeftModel
    reference: list[torch.Tensor]  # base+adapter(s) logits on the prompts
    effect: float  # max |logit change| the adapter(s) cause: the scale a difference is judged against
    base_weights: _BaseWeights


@dataclass(frozen=True)
class _Verification:
    """The written output's logits against base+adapter(s) on the prompts (MergeResult's fields of these names)."""

    max_logit_diff: float
    tolerance: float
    top1_agreement: float


@dataclass(frozen=True)
class _Written:
    """What a writer left in the staging folder, and how it was verified."""

    files: list[str]
    verification: _Verification
    gguf: GgufReport | GgufAdapterReport | None = None  # GGUF formats: the exporter's report


def parse_adapter_spec(text: str) -> AdapterSpec:
    """`path` or `path:weight` (the weight is a float after the last colon)."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return AdapterSpec(Path(path), float(weight))
        except ValueError:
            pass  # a colon that is part of the path
    return AdapterSpec(Path(text))


def run_merge(options: MergeOptions) -> MergeResult:
    """Merge one adapter, or a weighted combination of several, into a full model (or one adapter) in options.out_dir.

    `options.fmt` picks the writer (_WRITERS): "safetensors" a transformers folder, "gguf" the merged model as one
    GGUF file with an Ollama Modelfile, "gguf-adapter" the adapter alone as a GGUF LoRA file; each is verified
    before it is published (lorafit.gguf_export, lorafit.gguf_adapter for the GGUF ones).
    """
    started = time.perf_counter()
    notes: list[str] = []
    _check_options(options)
    # 1. Read the adapters and check them against the base on the meta device, before any weights are read.
    trained = _read_adapters(options)
    inputs = _check_against_base(trained, options, notes)
    # 2. One base copy with the adapter(s) attached, unmerged; for QLoRA the base weights are chosen here.
    attached = _attach_to_base(inputs, options, notes)
    # 3. The format's writer merges (or not), verifies against base+adapter and writes; published when complete.
    write = _write_peft_adapter if options.as_adapter else _WRITERS[options.fmt]
    with run_folder.staged_output(options.out_dir, "merge", where=f"--out {options.out_dir}",
                                  overwrite=options.overwrite) as staging:
        written = write(attached, inputs, options, staging)
        notes.extend(_vllm_notes(trained, options, staging))
        result = _result(options, inputs, attached, written, notes)
        result.seconds = time.perf_counter() - started
        run_folder.write_atomic(staging / run_folder.MODEL_CARD, _model_card(result))
        run_folder.write_json_atomic(staging / run_folder.MERGE_RECORD, asdict(result))
    result.peak_memory_mb = _peak_memory_mb(inputs.sources.device)
    result.seconds = time.perf_counter() - started
    return result


def _vllm_notes(trained: list[TrainedAdapter], options: MergeOptions, staging: Path) -> list[str]:
    """Whether what was written serves in vLLM (lorafit/vllm_rules.py): a combined adapter by vLLM's LoRA rules; a
    merged model loads as a plain model, which is also the way out for an adapter vLLM refuses as a LoRA."""
    import json

    if options.as_adapter:
        check = vllm_rules.check_adapter(json.loads((staging / "adapter_config.json").read_text(encoding="utf-8")))
        if check.loads:
            return [f"vLLM: the combined adapter loads as a LoRA (max_lora_rank={check.max_lora_rank})"]
        return [f"vLLM: the combined adapter {check.refusal()}; merge without --as-adapter to serve it as a model"]
    if options.fmt != "safetensors":
        return []
    checks = [(adapter, vllm_rules.check_adapter(adapter.config)) for adapter in trained]
    return [f"vLLM: {adapter.path} {check.refusal()}; this merged model serves without it: "
            f"`vllm serve {options.out_dir}`" for adapter, check in checks if not check.loads]


def _result(options: MergeOptions, inputs: _Inputs, attached: _Attached, written: _Written,
            notes: list[str]) -> MergeResult:
    """What merge.json records and the model card says."""
    sources, chosen, verification = inputs.sources, attached.base_weights, written.verification
    return MergeResult(
        out_dir=options.out_dir, base=sources.source,
        adapters=[{"path": str(s.path), "weight": s.weight, "quantized": t.quantized}
                  for s, t in zip(options.adapters, sources.trained, strict=True)],
        method=options.method if sources.combine else None, as_adapter=options.as_adapter, dtype=inputs.dtype_name,
        base_weights=chosen.name, base_weights_reason=chosen.reason, qlora_fidelity=chosen.fidelity,
        max_logit_diff=verification.max_logit_diff, tolerance=verification.tolerance,
        top1_agreement=verification.top1_agreement, adapter_effect=attached.effect, prompts=len(inputs.prompts),
        files=sorted({*written.files, run_folder.MODEL_CARD, run_folder.MERGE_RECORD}),
        peak_memory_mb=_peak_memory_mb(sources.device), seconds=0.0, notes=notes,
        task=tasks.model_kind(sources.trained[0].config.get("task_type")), labels=inputs.labels, format=options.fmt,
        gguf=written.gguf, device=sources.device,
    )


# ----------------------------------------------------------------------------------------------------
# Inputs


def _read_adapters(options: MergeOptions) -> list[TrainedAdapter]:
    """Each adapter and its run folder, refused when PEFT cannot merge it or its base weights cannot be honoured."""
    trained = [adapters.read_trained_adapter(spec.path) for spec in options.adapters]
    _check_mergeable(trained, options.adapters, options.method)
    _check_base_weights(trained, options.base_weights, options.as_adapter, options.fmt)
    return trained


def _check_against_base(trained: list[TrainedAdapter], options: MergeOptions, notes: list[str]) -> _Inputs:
    """The base's config on the meta device (no weights read): the output folder, the format and every adapter are
    checked against it; then the dtype, the device to merge on and the verification prompts."""
    section = adapters.base_model_section(trained[0], options.base)
    source = models.resolve_model_source(section)
    _check_out_dir(options.out_dir, overwrite=options.overwrite, inputs=[t.path for t in trained] + [Path(source)])
    config = models.load_config(section, source)
    labels = _classifier_labels(trained, options.adapters)
    meta_model, _ = models.build_meta_model(config, trust_remote_code=section.trust_remote_code, labels=labels)
    tokenizer = _tokenizer(trained[0], section, source)
    if options.fmt != "safetensors":
        _check_gguf_exportable(options.fmt, options.quant, config, tokenizer, trained, labels)
    for i, adapter in enumerate(trained):
        own = tokenizer if i == 0 else adapters.load_adapter_tokenizer(
            adapter, trust_remote_code=section.trust_remote_code)
        adapters.check_adapter_fits(adapter, meta_model, config, source=source, base_setting="--base",
                                    tokenizer=own)
    model_class = type(meta_model)
    parameter_count = sum(p.numel() for p in meta_model.parameters())
    del meta_model
    torch_dtype = _torch_dtype(options.dtype, config)
    if options.fmt == "safetensors":
        four_bit = any(t.quantized for t in trained) and not options.as_adapter  # _qlora_base holds a 4-bit copy too
        device, device_reason = merge_device(parameter_count, torch_dtype, four_bit_copy=four_bit)
    else:  # the GGUF exporters read and write the weights in host memory
        device, device_reason = "cpu", f"{options.fmt} export"
    notes.append(f"merged on {device} ({device_reason})")
    prompts = _verification_prompts(trained[0], tokenizer, notes, classify=labels is not None)
    classifier = _classifier_head(labels, tokenizer, trained[0]) if labels is not None else None
    sources = _Adapters(trained, options.adapters, section, source, model_class, torch_dtype, options.method,
                        options.density, classifier, device)
    return _Inputs(sources, tokenizer, labels, prompts)


def _check_options(options: MergeOptions) -> None:
    """The command-line options, checked before anything is read."""
    if not options.adapters:
        raise LorafitError("no adapter given", hint="lorafit merge runs/<name>/adapter --out merged/")
    if options.method not in METHODS:
        raise LorafitError(f"unknown method {options.method!r}", where="--method",
                           hint=f"one of: {', '.join(METHODS)}")
    if options.base_weights not in BASE_WEIGHTS:
        raise LorafitError(f"unknown choice {options.base_weights!r}", where="--base-weights",
                           hint=" | ".join(BASE_WEIGHTS))
    if not 0.0 < options.density <= 1.0:
        raise LorafitError(f"must be in (0, 1], got {options.density}", where="--density")
    _check_shard_size(options.max_shard_size)
    _check_format(options.fmt, options.quant, options.as_adapter)


def _check_format(fmt: str, quant: str | None, as_adapter: bool) -> None:
    from lorafit.gguf_export import QUANTS

    if fmt not in _WRITERS:
        raise LorafitError(f"unknown format {fmt!r}", where="--format", hint=" | ".join(_WRITERS))
    if quant is not None and fmt == "safetensors":
        raise LorafitError("--quant applies to GGUF output only", where="--quant",
                           hint="add --format gguf, or drop --quant")
    if quant is not None and quant not in QUANTS:
        raise LorafitError(f"unknown quant type {quant!r}", where="--quant", hint=f"one of: {', '.join(QUANTS)}")
    if as_adapter and fmt != "safetensors":
        raise LorafitError("--as-adapter writes a PEFT adapter folder", where=f"--format {fmt}",
                           hint="drop --as-adapter (--format gguf-adapter writes the adapter alone as GGUF)")


def _check_gguf_exportable(fmt: str, quant: str | None, config, tokenizer, trained: list[TrainedAdapter],
                           labels: list[str] | None) -> None:
    """Refuse what a GGUF file cannot hold before any weights are read."""
    from lorafit.gguf_adapter import check_adapter_exportable
    from lorafit.gguf_export import check_exportable

    if labels is not None:
        raise LorafitError("a sequence classifier cannot be exported to GGUF: llama.cpp runs language models",
                           where=f"--format {fmt}", hint="use --format safetensors")
    if fmt == "gguf":
        check_exportable(config, tokenizer, quant or "f16")
    else:
        for adapter in trained:
            check_adapter_exportable(config, adapter.config, quant or "f16")


def _check_out_dir(out_dir: Path, *, overwrite: bool, inputs: list[Path]) -> None:
    run_folder.check_output_path(out_dir, where=f"--out {out_dir}")  # first: a link loop stops resolve()
    resolved = out_dir.resolve()
    forbidden = {Path("/").resolve(): "the filesystem root", Path.home().resolve(): "your home folder",
                 Path.cwd().resolve(): "the current folder"}
    for path in inputs:
        if path.exists():
            forbidden[path.resolve()] = "an input folder (adapter or base model)"
            if (path.parent / run_folder.RECIPE).is_file():
                forbidden.setdefault(path.resolve().parent, "a run folder")
    if resolved in forbidden:
        raise LorafitError(f"refusing to write the merged model into {forbidden[resolved]}", where=f"--out {out_dir}",
                           hint="choose a new folder, e.g. merged/<name>")
    # Only an earlier merge's own files (listed in its lorafit.json) are ever replaced; nothing else is touched.
    # The exact file names are known once the model is saved (publishing checks them again); these are checked now.
    likely = [*_LIKELY_OUTPUTS, *(p.name for p in out_dir.glob("*.safetensors*"))] if out_dir.is_dir() else []
    run_folder.check_output_folder(out_dir, "merge", overwrite=overwrite, where=f"--out {out_dir}", names=likely)


def _check_mergeable(trained: list[TrainedAdapter], specs: Sequence[AdapterSpec], method: str) -> None:
    """Refuse, before any weights load, what PEFT cannot merge or combine, with the reason."""
    kinds = [str(t.config.get("peft_type", "")).upper() for t in trained]
    for adapter, kind in zip(trained, kinds, strict=True):
        if kind not in ("LORA", "ADALORA", "IA3"):
            raise LorafitError(
                f"a {kind.lower().replace('_', '-')} adapter cannot be merged: it adds learned virtual tokens to every "
                "forward pass instead of changing weights, so there is nothing to fold into the base model",
                where=f"adapter: {adapter.path}",
                hint="use it with PEFT on top of the base (lorafit eval does), or train method: lora for a mergeable "
                     "adapter")
    combine = len(specs) > 1 or specs[0].weight != 1.0
    if combine and len(set(kinds)) > 1:
        raise LorafitError(f"cannot combine adapters of different methods ({' and '.join(sorted(set(kinds)))}): PEFT "
                           "combines adapters of one method only", where="--adapter",
                           hint="merge them one after the other: merge the first, then pass the merged folder as "
                                "--base when merging the next")
    if combine and kinds[0] == "ADALORA":
        raise LorafitError("AdaLoRA adapters cannot be combined: each module keeps its own pruned rank, and PEFT's "
                           "add_weighted_adapter does not support them", where="--adapter",
                           hint="merge them one after the other: merge the first, then pass the merged folder as "
                                "--base when merging the next")
    if combine and kinds[0] == "IA3" and method != "linear":
        raise LorafitError(f"IA3 adapters are combined linearly only, not with {method}", where="--method",
                           hint="use --method linear (the default)")


def _started_with_loftq(adapter: TrainedAdapter) -> bool:
    """Whether its run started it with adapter.init loftq: then it holds a correction of the 4-bit quantization error."""
    return adapter.quantized and adapter.recipe.adapter.init == "loftq"


def _check_base_weights(trained: list[TrainedAdapter], base_weights: str, as_adapter: bool, fmt: str) -> None:
    """Refuse to put a LoftQ-started adapter on any base but the 4-bit weights it corrects: the original weights
    already hold what its correction adds (--base-weights original), and a llama.cpp base has another error."""
    loftq = next((t for t in trained if _started_with_loftq(t)), None)
    if loftq is not None and fmt == "gguf-adapter":
        raise LorafitError(
            f"{loftq.path} was started with adapter.init loftq: it corrects bitsandbytes' 4-bit error of its base, "
            "which a llama.cpp base does not have", where="--format gguf-adapter",
            hint="use --format gguf: the adapter merged into the de-quantized weights it corrects")
    if loftq is not None and base_weights == "original" and not as_adapter:
        raise LorafitError(
            f"{loftq.path} was started with adapter.init loftq: it corrects the 4-bit quantization error, so on the "
            "original weights it would add that correction a second time", where="--base-weights original",
            hint="use --base-weights dequantized (or auto, which picks it for LoftQ adapters)")


def _check_shard_size(text: str) -> None:
    """--max-shard-size, parsed the way save_pretrained will parse it (huggingface_hub's sharding), before any work."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        size = parse_size_to_int(text)
    except (ValueError, TypeError):
        size = 0
    if size <= 0:
        raise LorafitError(f"not a size: {text!r}", where="--max-shard-size", hint="e.g. 5GB, 500MB or 100KB")


def _classifier_labels(trained: list[TrainedAdapter], specs: Sequence[AdapterSpec]) -> list[str] | None:
    """The class names of a sequence-classification adapter, from its run folder; None for causal-LM adapters."""
    classifiers = [t for t in trained if t.config.get("task_type") == "SEQ_CLS"]
    if not classifiers:
        return None
    adapter = classifiers[0]
    if len(specs) > 1 or specs[0].weight != 1.0:
        # Each one carries its own fully trained head (modules_to_save); PEFT cannot weight or combine those.
        raise LorafitError("a sequence-classification adapter cannot be combined or re-weighted: it carries its own "
                           "trained classifier head", where=f"adapter: {adapter.path}",
                           hint="merge it alone, at weight 1")
    if adapter.recipe is None or not adapter.recipe.data.labels:
        raise LorafitError(f"a sequence-classification adapter needs the {run_folder.RECIPE} of its run folder, "
                           "which names its classes", where=f"adapter: {adapter.path}",
                           hint="pass the adapter/ folder inside the run folder lorafit train wrote")
    return list(adapter.recipe.data.labels)


def _classifier_head(labels: list[str], tokenizer: PreTrainedTokenizerBase, adapter: TrainedAdapter) -> dict:
    """The head config a sequence-classification adapter was trained under (classes, pad id), with the random
    generator seeded as in training: the base's fresh head, replaced by the trained one, gives a reproducible report."""
    from transformers import set_seed

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    set_seed(adapter.recipe.training.seed)
    return models.classifier_config(labels, pad)


def _tokenizer(adapter: TrainedAdapter, section: ModelSection, source: str) -> PreTrainedTokenizerBase:
    """The adapter's own tokenizer (with the training chat template); the base's when it saved none."""
    from transformers import AutoTokenizer

    tokenizer = adapters.load_adapter_tokenizer(adapter, trust_remote_code=section.trust_remote_code)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=section.revision,
                                                  trust_remote_code=section.trust_remote_code)
    return tokenizer


def _torch_dtype(dtype: str, config) -> torch.dtype:
    """--dtype, or (auto) the dtype the base checkpoint is stored in."""
    import torch

    if dtype not in DTYPES:
        raise LorafitError(f"unknown dtype {dtype!r}", where="--dtype", hint=" | ".join(DTYPES))
    if dtype != "auto":
        return getattr(torch, dtype)
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _verification_prompts(adapter: TrainedAdapter, tokenizer: PreTrainedTokenizerBase, notes: list[str], *,
                          classify: bool = False) -> list[list[int]]:
    """A few token sequences to compare logits on: rows of the run's own data, else generic prompts."""
    from lorafit.data import eval_rows
    from lorafit.templates import render

    if classify:
        return _classifier_prompts(adapter, tokenizer, notes)
    texts: list[str] = []
    recipe = adapter.recipe
    if recipe is not None and recipe.data.eval is not None:
        try:
            for item in eval_rows(recipe, limit=len(_FALLBACK_PROMPTS)).conversations:
                text = item if isinstance(item, str) else render(tokenizer, item)
                if text.strip():
                    texts.append(text)
        except LorafitError as exc:
            notes.append(f"verification uses generic prompts: the run's eval data could not be read ({exc})")
    if not texts:
        for prompt in _FALLBACK_PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            texts.append(render(tokenizer, messages, add_generation_prompt=True) if tokenizer.chat_template else prompt)
    special = not tokenizer.chat_template  # chat-rendered text already holds its special tokens
    return [tokenizer(t, add_special_tokens=special)["input_ids"][:_MAX_PROMPT_TOKENS] for t in texts]


def _classifier_prompts(adapter: TrainedAdapter, tokenizer: PreTrainedTokenizerBase,
                        notes: list[str]) -> list[list[int]]:
    """A classifier's verification inputs: texts of the run's own data, tokenized as training did; else generic ones."""
    from lorafit.data import class_labels, encode_labelled, eval_rows

    recipe, examples = adapter.recipe, []
    if recipe is not None and recipe.data.eval is not None:
        try:
            labels = list(recipe.data.labels or class_labels(recipe))
            rows = eval_rows(recipe, labels=labels, limit=len(_FALLBACK_PROMPTS)).labelled
            examples, _ = encode_labelled(rows, recipe.data, tokenizer)
        except LorafitError as exc:
            notes.append(f"verification uses generic texts: the run's eval data could not be read ({exc})")
    prompts = [e.input_ids[:_MAX_PROMPT_TOKENS] for e in examples[:len(_FALLBACK_PROMPTS)]]
    return prompts or [tokenizer(text)["input_ids"][:_MAX_PROMPT_TOKENS] for text in _FALLBACK_PROMPTS]


# ----------------------------------------------------------------------------------------------------
# Models


def merge_device(parameter_count: int, dtype: torch.dtype, *, four_bit_copy: bool = False) -> tuple[str, str]:
    """Where to merge: the current GPU when there is one and the model fits its free memory, else the CPU; and why.

    Merging is one addition per adapted weight, memory-bound: on a GPU it takes seconds where a CPU takes minutes,
    and the verification forward passes run there too. The 25% margin covers the adapter, the delta being added
    and the verification activations; a model that does not fit is merged in host memory, as before.
    `four_bit_copy`: a QLoRA adapter's merge also holds the 4-bit base (the reference, then de-quantized in place)
    beside a full copy (_qlora_base), about 0.55 bytes per parameter (4-bit values and their scales).
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu", "no GPU"
    index = torch.cuda.current_device()
    free, _total = torch.cuda.mem_get_info(index)
    needed = parameter_count * (torch.empty((), dtype=dtype).element_size() * 1.25 + (0.55 if four_bit_copy else 0))
    name = torch.cuda.get_device_name(index)
    if needed <= free:
        return f"cuda:{index}", f"{name}, {free / 2**30:.1f} GiB free for a {needed / 2**30:.1f} GiB need"
    return "cpu", f"the model needs {needed / 2**30:.1f} GiB with margin, {name} has {free / 2**30:.1f} GiB free"


def _load_full(model_class, section: ModelSection, source: str, dtype: torch.dtype, classifier: dict | None = None,
               device: str = "cpu"):
    """The base model in 16/32-bit as stored on disk (safetensors unless pickles are allowed), on `device`.

    `classifier` (models.classifier_config) gives a sequence classifier its classes and pad id; a head of another
    size in the checkpoint is replaced by a fresh one, as in training.
    """
    head = {**classifier, "ignore_mismatched_sizes": True} if classifier else {}
    placement = {"device_map": {"": device}} if device != "cpu" else {}
    try:
        return model_class.from_pretrained(
            source, revision=section.revision, trust_remote_code=section.trust_remote_code, dtype=dtype,
            use_safetensors=None if section.allow_pickle_weights else True, **head, **placement,
        )
    except (OSError, ValueError) as exc:
        raise LorafitError(f"cannot load the base model: {first_line(exc)}",
                           where=f"base: {section.path}",
                           hint="check --base, or the folder recorded in the adapter") from None


def _attach(model, trained: list[TrainedAdapter], specs: Sequence[AdapterSpec], method: str, density: float,
            combine: bool) -> PeftModel:
    """Base + adapter(s); several (or a re-weighted one) are combined into one adapter named 'default'."""
    import torch
    from peft import PeftModel

    if not combine:
        peft_model = PeftModel.from_pretrained(model, str(trained[0].path))
        peft_model.eval()
        return peft_model
    names = [f"a{i}" for i in range(len(trained))]
    peft_model = PeftModel.from_pretrained(model, str(trained[0].path), adapter_name=names[0])
    for name, adapter in zip(names[1:], trained[1:], strict=True):
        peft_model.load_adapter(str(adapter.path), adapter_name=name)
    torch.manual_seed(0)  # dare_* drop weights at random: the same command gives the same model
    try:
        if str(trained[0].config.get("peft_type", "")).upper() == "IA3":  # IA3 has only the linear combination
            peft_model.add_weighted_adapter(names, [s.weight for s in specs], "default")
        else:
            peft_model.add_weighted_adapter(
                names, [s.weight for s in specs], "default", combination_type=method,
                density=density if method not in ("linear", "cat", "svd") else None,
            )
    except ValueError as exc:
        hint = "use --method cat or svd for adapters of different ranks" if "same r" in str(exc) else None
        raise LorafitError(f"cannot combine these adapters: {exc}", where="--method", hint=hint) from None
    peft_model.set_adapter("default")
    for name in names:  # the sources are folded into 'default'; dropping them frees their memory
        peft_model.delete_adapter(name)
    peft_model.eval()
    return peft_model


def _attach_to_base(inputs: _Inputs, options: MergeOptions, notes: list[str]) -> _Attached:
    """One base copy with the adapter(s) attached, its logits (the reference every output is checked against) and
    how far the adapter(s) move them. QLoRA adapters (unless saved as an adapter) get the base chosen by _qlora_base."""
    sources, prompts = inputs.sources, inputs.prompts
    quantized = [t for t in sources.trained if t.quantized]
    if quantized and not options.as_adapter:
        model, reference, chosen = _qlora_base(sources, quantized[0], prompts, options.base_weights)
    else:
        if options.base_weights == "dequantized":
            notes.append("--base-weights dequantized only applies to QLoRA-trained adapters; used the original base")
        model = sources.on_full_base()
        reference = prompt_logits(model, prompts)
        chosen = _BaseWeights("original", "the adapter was trained on an unquantized base" if not quantized else
                              "a combined adapter does not contain base weights")
    with model.disable_adapter():
        effect = compare_logits(prompt_logits(model, prompts), reference)[0]
    return _Attached(model, reference, effect, chosen)


def _qlora_base(sources: _Adapters, adapter: TrainedAdapter, prompts: list[list[int]],
                choice: str) -> tuple[PeftModel, list[torch.Tensor], _BaseWeights]:
    """Pick the 16/32-bit base for a QLoRA adapter (`choice`: auto, original or dequantized): the base with the
    adapter(s) attached, its logits on `prompts`, and which weights were chosen and why.

    The trained QLoRA model (4-bit base + adapter) is the reference. Candidates are built one at a time so at
    most one full-precision copy (plus the small 4-bit one) is in memory.
    """
    recipe = adapter.recipe.model_copy(update={"model": sources.section})
    precision, _ = models.choose_precision(recipe.training.precision)
    # The 4-bit base goes where the merge runs, because it is de-quantized where it sits: on a GPU machine that
    # merges on the CPU (a GGUF export, or a model too large for the GPU) it would otherwise load on the GPU.
    precision = replace(precision, device=sources.device.split(":")[0])
    pad = sources.classifier.get("pad_token_id") if sources.classifier else None
    quantized_base = models.load_base_model(recipe, sources.source, precision, pad_token_id=pad)
    qlora = sources.attached_to(quantized_base)  # 4-bit layers as trained: see models.keep_4bit_layers_as_trained
    qlora_logits = prompt_logits(qlora, prompts)
    quantized_base = qlora.unload()  # back to the bare 4-bit base, kept for de-quantizing
    del qlora

    def dequantized():
        # The same 4-bit -> float round trip the adapter was trained against (bitsandbytes' own de-quantizer).
        return sources.attached_to(quantized_base.dequantize(dtype=sources.dtype).to(sources.dtype))

    build = {"original": sources.on_full_base, "dequantized": dequantized}
    # The de-quantized candidate goes last: it is usually the closer one, and then it needs no rebuild. A LoftQ
    # adapter has one right base, the de-quantized one (_check_base_weights refused original).
    loftq = any(_started_with_loftq(t) for t in sources.trained)
    order = ["dequantized"] if loftq else ["original", "dequantized"] if choice == "auto" else [choice]
    fidelity: dict[str, float] = {}
    model = logits = None
    for name in order:
        del model
        gc.collect()
        model = build[name]()
        logits = prompt_logits(model, prompts)
        fidelity[name] = compare_logits(logits, qlora_logits)[0]
    name = min(fidelity, key=fidelity.__getitem__)
    if name != order[-1]:  # the kept model is the other candidate: rebuild the winner, one copy at a time
        del model
        quantized_base = None  # noqa: F841 - de-quantized in place above; frees it before the rebuild
        gc.collect()
        model = build[name]()
        logits = prompt_logits(model, prompts)
    if loftq:
        reason = (f"adapter.init loftq: the adapter corrects the 4-bit quantization error, so it is merged into the "
                  f"de-quantized 4-bit weights it corrects (max diff {fidelity[name]:.4g} vs the trained QLoRA model)")
    elif choice != "auto":
        reason = f"chosen with --base-weights {choice}"
    else:
        other = next(n for n in fidelity if n != name)
        reason = (f"auto: its logits are closer to the trained QLoRA model (max diff {fidelity[name]:.4g} vs "
                  f"{fidelity[other]:.4g} with the {other} base)")
    return model, logits, _BaseWeights(name, reason, fidelity)


def _merged_in_place(model: PeftModel):
    """The adapter folded into the base weights, checked finite.

    In place, not PEFT's safe_merge: that clones every weight before adding the delta, and since the base is
    memory-mapped the clones and the file pages it leaves mapped both count (2.2x the model's size at peak for
    SmolLM2 vs ~1.2x in place; docs/performance.md).
    """
    import torch

    merged = model.merge_and_unload()
    # A sum is NaN/inf when any element is; unlike isfinite it allocates nothing the size of the tensor.
    broken = next((name for name, p in merged.named_parameters()
                   if not math.isfinite(torch.sum(p, dtype=torch.float32).item())), None)
    if broken is not None:
        raise RunFailed(f"merging produced non-finite weights (first: {broken})", where="adapter",
                        hint="the adapter holds NaN/inf weights; use an earlier checkpoint")
    return merged


def prompt_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt, a [positions, width] matrix: every position's vocabulary logits (causal LM), or one row of class
    logits (sequence classifier); `compare_logits` treats both alike."""
    import torch

    device = next(model.parameters()).device
    logits = []
    with torch.no_grad():
        for ids in prompts:
            out = model(input_ids=torch.tensor([ids], device=device)).logits.float().cpu()
            logits.append(out.reshape(-1, out.shape[-1]))
    return logits


def _verify(got: list[torch.Tensor], want: list[torch.Tensor], dtype_name: str, *, effect: float, out_dir: Path,
            what: str) -> _Verification:
    """Fail loudly unless the merged logits match base+adapter."""
    max_diff, scale, top1 = compare_logits(got, want)
    tolerance = _TOLERANCE[dtype_name] * max(1.0, scale)
    if not (max_diff <= tolerance and top1 >= _MIN_TOP1_AGREEMENT):  # written so that NaN fails too
        raise RunFailed(
            f"verification failed: the {what}'s logits differ from base+adapter by up to {max_diff:.4g} (tolerance "
            f"{tolerance:.3g}; the adapter itself moves them by {effect:.4g}), top-1 agreement {100 * top1:.1f}%; "
            "nothing was written", where=str(out_dir),
            hint="re-run with --dtype float32, or report this with --debug output",
        )
    return _Verification(max_diff, tolerance, top1)


def compare_logits(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float, float]:
    """Max |difference|, the largest |logit| of the reference, and the share of positions whose argmax agrees (1.0
    when there are none). The one comparison of logits lists: merging, and the GGUF adapter's check, use it."""
    max_diff = max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
    scale = max(w.abs().max().item() for w in want)
    agree = sum((g.argmax(-1) == w.argmax(-1)).sum().item() for g, w in zip(got, want, strict=True))
    total = sum(w.shape[0] for w in want)
    return max_diff, scale, agree / total if total else 1.0


# ----------------------------------------------------------------------------------------------------
# Writers: one per output format, each verifying what it writes into the staging folder before it is published.


def _write_merged_model(attached: _Attached, inputs: _Inputs, options: MergeOptions, staging: Path) -> _Written:
    """--format safetensors: the merged model as a transformers folder (safetensors shards) with the tokenizer."""
    merged, _, verification = _merge_and_verify(attached, inputs, options)
    merged.save_pretrained(str(staging), max_shard_size=options.max_shard_size, safe_serialization=True)
    inputs.tokenizer.save_pretrained(str(staging))
    return _Written(_staged_files(staging), verification)


def _write_peft_adapter(attached: _Attached, inputs: _Inputs, options: MergeOptions, staging: Path) -> _Written:
    """--as-adapter (safetensors only): the combined adapter as a PEFT folder with the tokenizer, verified by loading
    it back onto the base."""
    model = attached.model
    model.save_pretrained(str(staging), selected_adapters=["default"], safe_serialization=True)
    model.load_adapter(str(staging), adapter_name="reloaded")
    model.set_adapter("reloaded")
    verification = _verify(prompt_logits(model, inputs.prompts), attached.reference, inputs.dtype_name,
                           effect=attached.effect, out_dir=options.out_dir, what="saved adapter")
    inputs.tokenizer.save_pretrained(str(staging))
    return _Written(_staged_files(staging), verification)


def _write_gguf(attached: _Attached, inputs: _Inputs, options: MergeOptions, staging: Path) -> _Written:
    """--format gguf: the merged model as model.gguf and a Modelfile (the file carries the tokenizer and chat
    template), read back and checked against the merged model by lorafit.gguf_export."""
    from lorafit.gguf_export import export_gguf

    merged, merged_logits, verification = _merge_and_verify(attached, inputs, options)
    report = export_gguf(merged, inputs.tokenizer, staging, quant=options.quant or "f16", name=options.out_dir.name,
                         prompts=inputs.prompts, reference=merged_logits)
    return _Written(_staged_files(staging), verification, report)


def _write_gguf_adapter(attached: _Attached, inputs: _Inputs, options: MergeOptions, staging: Path) -> _Written:
    """--format gguf-adapter: no merge, the adapter alone as adapter.gguf, checked against base+adapter by
    lorafit.gguf_adapter (whose check is the verification)."""
    from lorafit.gguf_adapter import export_gguf_adapter

    report = export_gguf_adapter(attached.model, inputs.tokenizer, staging, quant=options.quant or "f16",
                                 name=options.out_dir.name, base=inputs.sources.source, prompts=inputs.prompts,
                                 reference=attached.reference)
    verification = _Verification(report.max_logit_diff, report.tolerance, report.top1_agreement)
    return _Written(_staged_files(staging), verification, report)


# --format -> its writer (--as-adapter, safetensors only, writes with _write_peft_adapter instead).
_WRITERS = {"safetensors": _write_merged_model, "gguf": _write_gguf, "gguf-adapter": _write_gguf_adapter}


def _merge_and_verify(attached: _Attached, inputs: _Inputs,
                      options: MergeOptions) -> tuple[Any, list[torch.Tensor], _Verification]:
    """The adapter(s) folded into the base in place and verified against base+adapter(s), set up for inference:
    (merged model, its logits, the verification)."""
    merged = _merged_in_place(attached.model)
    merged_logits = prompt_logits(merged, inputs.prompts)
    verification = _verify(merged_logits, attached.reference, inputs.dtype_name, effect=attached.effect,
                           out_dir=options.out_dir, what="merged model")
    merged.config.use_cache = True  # training switched the KV cache off; inference wants it
    if inputs.labels is None:  # a classifier does not generate
        _stop_on_end_of_turn(merged, inputs.tokenizer)
    return merged, merged_logits, verification


def _staged_files(staging: Path) -> list[str]:
    """The names written into the staging folder so far."""
    return sorted(p.name for p in staging.iterdir())


def _stop_on_end_of_turn(model, tokenizer) -> None:
    """Make plain `generate()` stop where the adapter learned to stop: the template's end-of-turn token."""
    eos = tokenizer.eos_token_id
    config = model.generation_config
    if eos is None or config is None:
        return
    current = config.eos_token_id
    current = current if isinstance(current, list) else [current] if current is not None else []
    if eos not in current:
        config.eos_token_id = [*current, eos] if current else eos
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id


# ----------------------------------------------------------------------------------------------------
# Output


def _peak_memory_mb(device: str) -> float:
    """The peak memory of the device the merge ran on (cpu, or cuda:N): host memory for a CPU merge even when the
    machine has a GPU, whose allocator would report the little or nothing the merge put there."""
    return models.peak_memory_mb("cuda" if device.startswith("cuda") else "cpu")


def _model_card(result: MergeResult) -> str:
    sources = "\n".join(f"- `{a['path']}` (weight {a['weight']:g}{', QLoRA-trained' if a['quantized'] else ''})"
                        for a in result.adapters)
    how = f"combined with `{result.method}`" if result.method else "merged"
    if result.format == "gguf-adapter":
        use = _gguf_adapter_usage(result)
    elif result.gguf is not None:
        use = _gguf_usage(result)
    elif result.labels is not None:
        use = _classifier_usage(result)
    elif result.as_adapter:
        use = ("```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
               f'model = AutoPeftModelForCausalLM.from_pretrained("{result.out_dir}")\n```')
    else:
        use = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
               f'model = AutoModelForCausalLM.from_pretrained("{result.out_dir}")\n'
               f'tokenizer = AutoTokenizer.from_pretrained("{result.out_dir}")  # with the training chat template\n```')
    return "\n".join([
        f"# {result.out_dir.name}",
        "",
        f"{_what(result)}: base `{result.base}` with these "
        f"adapter(s) {how}, written by [lorafit](https://pypi.org/project/lorafit/) `merge`.",
        "",
        sources,
        "",
        "| | |", "|---|---|",
        f"| base weights | {result.base_weights} ({result.base_weights_reason}) |",
        f"| dtype | {result.dtype} |",
        f"| verification | max logit difference {result.max_logit_diff:.3g} vs base+adapter on {result.prompts} "
        f"prompts (tolerance {result.tolerance:.3g}; the adapter moves logits by up to {result.adapter_effect:.3g}); "
        f"top-1 agreement {100 * result.top1_agreement:.1f}% |",
        *_gguf_rows(result),
        *(f"| note | {note.replace('|', '/')} |" for note in result.notes + (result.gguf.notes if result.gguf else [])),
        "",
        "## Use it",
        "",
        use,
        "",
    ])


def _what(result: MergeResult) -> str:
    if result.format == "gguf-adapter":
        return f"A LoRA adapter as GGUF for llama.cpp and Ollama, which needs the base model `{result.base}`"
    return "A combined LoRA adapter" if result.as_adapter else "A full model"


def _gguf_rows(result: MergeResult) -> list[str]:
    """Model-card rows saying what the GGUF file is and how it was proven to match the merged model."""
    report = result.gguf
    if report is None:
        return []
    if result.format == "gguf-adapter":
        llama_cpp = (f"; llama.cpp running the base with this file: max logit difference "
                     f"{report.llama_cpp_max_logit_diff:.3g}" if report.llama_cpp_max_logit_diff is not None else
                     "; llama.cpp not installed, not checked with it")
        return [
            f"| GGUF adapter | `{report.file}`: {report.quant}, {report.size_bytes / 2**20:.2f} MiB, {report.tensors} "
            f"LoRA pairs for llama.cpp architecture `{report.architecture}`, adapter.lora.alpha {report.alpha:g} |",
            f"| base model | `{report.base}` (as GGUF: the adapter changes its weights, nothing else) |",
            f"| GGUF verification | read back and applied to the base: max logit difference {report.max_logit_diff:.3g} "
            f"vs base+adapter (tolerance {report.tolerance:.3g} for {report.quant}), top-1 agreement "
            f"{100 * report.top1_agreement:.1f}%{llama_cpp} |",
        ]
    llama_cpp = ("; llama.cpp: the same token ids, greedy generations in merge.json" if report.llama_cpp else
                 "; llama.cpp not installed, not checked with it")
    return [
        f"| GGUF file | `{report.file}`: {report.quant}, {report.size_bytes / 2**20:.1f} MiB, llama.cpp architecture "
        f"`{report.architecture}`, tokenizer `{report.tokenizer_model}`, pre-tokenizer `{report.tokenizer_pre}` |",
        f"| GGUF verification | loaded back with {' and '.join(report.verified_with)}: {report.texts_checked} sample "
        f"texts give the same token ids{llama_cpp}; max logit difference {report.max_logit_diff:.3g} vs the merged "
        f"model (tolerance {report.tolerance:.3g} for {report.quant}), top-1 agreement "
        f"{100 * report.top1_agreement:.1f}% (needs {100 * report.min_top1:.0f}%) |",
        f"| stops on | {', '.join(f'`{token}`' for token in report.stop)} |",
    ]


def _gguf_adapter_usage(result: MergeResult) -> str:
    """How to run the adapter file on top of a GGUF of its base model."""
    path = f"{result.out_dir}/{result.gguf.file}"
    return "\n".join([
        f"It needs its base model `{result.base}` as a GGUF file of the same architecture (the adapter holds no "
        "vocabulary or other weights). With llama.cpp:",
        "",
        "```sh",
        f"llama-cli -m base.gguf --lora {path} -cnv",
        "```",
        "",
        "With Ollama, in a Modelfile next to the base:",
        "",
        "```",
        "FROM ./base.gguf",
        f"ADAPTER {path}",
        "```",
    ])


def _gguf_usage(result: MergeResult) -> str:
    """How to run the exported GGUF file with llama.cpp and Ollama."""
    name = result.out_dir.name
    return "\n".join([
        "With llama.cpp (the chat template is in the file):",
        "",
        "```sh",
        f"llama-cli -m {result.out_dir}/{result.gguf.file} -cnv",
        "```",
        "",
        "With Ollama (the Modelfile holds the prompt template and the stop tokens):",
        "",
        "```sh",
        f"ollama create {name} -f {result.out_dir}/Modelfile",
        f"ollama run {name}",
        "```",
    ])


def _classifier_usage(result: MergeResult) -> str:
    """Loading code for a merged classifier (its config holds the classes), or for a saved classification adapter."""
    if result.as_adapter:
        return ("```python\nfrom peft import PeftModel\n"
                "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
                f"labels = {result.labels!r}\n"
                f'tokenizer = AutoTokenizer.from_pretrained("{result.out_dir}")\n'
                f'base = AutoModelForSequenceClassification.from_pretrained("{result.base}", num_labels=len(labels), '
                "pad_token_id=tokenizer.pad_token_id)\n"
                f'model = PeftModel.from_pretrained(base, "{result.out_dir}")  # LoRA + trained classifier head\n```')
    return ("```python\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f'model = AutoModelForSequenceClassification.from_pretrained("{result.out_dir}")  # classes: '
            f"{', '.join(result.labels)}\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{result.out_dir}")\n'
            'inputs = tokenizer("...", return_tensors="pt")\n'
            "print(model.config.id2label[model(**inputs).logits.argmax(-1).item()])\n```")
