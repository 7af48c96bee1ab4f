"""Adapter initialisations that need more than the layer shapes (adapter.init: loftq, eva, corda).

`lorafit.adapters.wrap_model` calls these around PEFT's `get_peft_model`:
- corda, before it: PEFT's `preprocess_corda` runs the base over the first training batches and decomposes each
  weight along its input covariance; `get_peft_model` then starts the adapter from the largest (ipm) components and
  leaves the rest in the base weights (a residual base, as PiSSA's). `initial_corda_state` keeps the adapter as it
  started, so export can save what training changed as a plain LoRA of rank 2r on the original base
  (PEFT's `path_initial_model_for_weight_conversion`).
- eva, after it: PEFT's `initialize_lora_eva_weights` sets each LoRA A to the principal directions of the layer's
  inputs on the first training batches, and moves rank to the layers whose inputs need it (rank_pattern,
  alpha_pattern in adapter_config.json). B stays zero, so the model starts exactly as the base.
- loftq, after it: on a 4-bit base, A and B start as the best rank-r approximation of the quantization error
  (original weight - de-quantized 4-bit weight), so base + adapter starts closer to the full-precision model than the
  4-bit base alone. This is what PEFT's `replace_lora_weights_loftq` does, written out here because PEFT 0.21's
  version moves every weight to CUDA (it cannot run on a CPU) and ignores the LoRA scaling (alpha / r): with lorafit's
  default alpha = 2r its adapter would add the error twice.

`init_batches` builds the batches EVA and CorDA read: the first adapter.init_batches x training.batch_size training
rows, in file order (not shuffled: a resumed run recomputes the same start).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.errors import LorafitError

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from lorafit.recipe import Recipe

DATA_DRIVEN = ("eva", "corda")  # the inits that read training batches
# The inits that compute on the base weights as the adapter is attached (SVDs, QR, forward passes): on a GPU machine
# the base must already sit on the GPU then, not wait for the Trainer to move it (models.load_base_model).
COMPUTED_ON_THE_WEIGHTS = ("pissa", "olora", "eva", "corda", "loftq")
# EVA stops once every layer's components are stable between batches; it cycles over the batches until then. This
# bounds the cycles, so that a data set too uniform to converge stops with a message instead of running forever.
_EVA_MAX_PASSES = 40


@dataclass(frozen=True)
class AdapterStart:
    """What an init of this module did (`wrap_model` leaves it on the model as `lorafit_start`)."""

    note: str  # one line for the run's notes
    corda_start: dict[str, torch.Tensor] | None = None  # corda: the adapter's weights as they started


def start_of(model: nn.Module) -> AdapterStart | None:
    """The AdapterStart `wrap_model` recorded on `model`, if its init is one of this module's."""
    return getattr(model, "lorafit_start", None)


@dataclass(frozen=True)
class LoftqReport:
    """How much of the 4-bit quantization error the LoftQ start removes, summed over the adapted layers."""

    layers: int
    error_before: float  # ||W - dequant(Q(W))||_F over all layers: the 4-bit base alone
    error_after: float  # ||W - (dequant(Q(W)) + scaling * B A)||_F: base + adapter at the start

    def summary(self) -> str:
        """One line for the run's notes."""
        share = 100 * (1 - self.error_after / self.error_before) if self.error_before else 0.0
        return (f"adapter.init loftq: the adapter starts by cancelling {share:.1f}% of the 4-bit quantization error "
                f"of {self.layers} layers (weight error {self.error_before:.4g} -> {self.error_after:.4g})")


# ----------------------------------------------------------------------------------------------------
# The training batches EVA and CorDA read


def init_batches(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, train: Any) -> list[dict[str, torch.Tensor]]:
    """The first adapter.init_batches batches of prepared training rows (input_ids, attention_mask, labels = -100
    outside the trained tokens), padded as the trainer pads them."""
    from itertools import islice

    from transformers import DataCollatorForSeq2Seq

    size = recipe.training.batch_size
    wanted = recipe.adapter.init_batches * size
    rows = [{"input_ids": list(row["input_ids"]), "labels": list(row["labels"])} for row in islice(iter(train), wanted)]
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    batches = [collate(rows[i:i + size]) for i in range(0, len(rows), size)]
    return [{key: batch[key] for key in ("input_ids", "attention_mask", "labels")} for batch in batches]


def _move(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items()}


# ----------------------------------------------------------------------------------------------------
# CorDA


def prepare_corda(model: nn.Module, config: LoraConfig, batches: list[dict[str, torch.Tensor]]) -> None:
    """Run PEFT's `preprocess_corda` on the base over `batches` (before `get_peft_model`)."""
    import torch
    from peft.tuners.lora.corda import preprocess_corda

    def run_model() -> None:
        # PEFT's covariance hook takes one row per forward pass (it squeezes the batch dimension), so each row runs
        # alone and unpadded: padding would count as context the model never sees.
        with torch.no_grad():
            for batch in batches:
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                    model(**_move({"input_ids": ids[mask.bool()][None]}, model))

    training = model.training
    model.eval()
    try:
        preprocess_corda(model, config, run_model=run_model)
    finally:
        model.train(training)


def initial_corda_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's weights as CorDA started them (a copy), for the conversion to plain LoRA at export."""
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in get_peft_model_state_dict(model).items()}


def save_as_plain_lora(model: PeftModel, folder: Path, initial: dict[str, torch.Tensor], **save_options: Any) -> None:
    """Save a CorDA-started adapter as a plain LoRA on the original base: delta = B A - B0 A0 = [B | -B0] [A ; A0].

    PEFT's `path_initial_model_for_weight_conversion` does the algebra; it reads the start from a folder, written to a
    temporary folder (and removed) with init_lora_weights true, as PEFT requires.
    """
    import copy
    import shutil
    import tempfile

    from safetensors.torch import save_file

    # PEFT loads the start as an adapter named after its folder: a plain name, outside the run folder.
    scratch = Path(tempfile.mkdtemp(prefix="lorafit-corda-"))
    start = scratch / "corda_start"
    start.mkdir()
    try:
        config = copy.deepcopy(model.peft_config[model.active_adapter])
        config.init_lora_weights = True
        config.save_pretrained(str(start))
        save_file(initial, str(start / "adapter_model.safetensors"), metadata={"format": "pt"})
        model.save_pretrained(folder, path_initial_model_for_weight_conversion=str(start), **save_options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# EVA


def initialize_eva(model: PeftModel, batches: list[dict[str, torch.Tensor]]) -> None:
    """PEFT's `initialize_lora_eva_weights` over `batches` (the model is wrapped with init_lora_weights "eva")."""
    from peft import initialize_lora_eva_weights

    config = model.peft_config[model.active_adapter]
    components = math.ceil(config.r * config.eva_config.rho)
    trained = min(int((batch["labels"] != -100).sum()) for batch in batches)
    if trained < components:
        # PEFT skips a batch with fewer tokens than components and cycles on: with none large enough it never ends.
        raise LorafitError(
            f"eva needs at least {components} trained tokens in each of its batches (r {config.r} x rho "
            f"{config.eva_config.rho:g}); one of the first {len(batches)} batches has {trained}",
            where="adapter.init", hint="raise training.batch_size, lower adapter.r, or use init: default")
    forwards = {"count": 0}

    def forward(peft_model, inputs):
        forwards["count"] += 1
        if forwards["count"] > _EVA_MAX_PASSES * len(batches):
            raise LorafitError(f"eva did not converge in {_EVA_MAX_PASSES} passes over its {len(batches)} batches",
                               where="adapter.init", hint="raise adapter.init_batches, or use init: default")
        return peft_model(**inputs)

    # Every process reads the same first batches, so nothing is gathered across processes.
    initialize_lora_eva_weights(model, dataloader=batches, forward_fn=forward, gather_distributed_inputs=False,
                                show_progress_bar=False)


# ----------------------------------------------------------------------------------------------------
# LoftQ


def initialize_loftq(model: PeftModel, source: str) -> LoftqReport:
    """Start every 4-bit LoRA layer's A and B at the rank-r SVD of its quantization error (one LoftQ step).

    The original weights are read from the model folder's safetensors, one tensor at a time; the 4-bit weights are
    de-quantized with bitsandbytes' own de-quantizer, the same the merge uses.
    """
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora.bnb import Linear4bit

    read = _safetensors_reader(source)
    adapter = model.active_adapter
    before = after = 0.0
    layers = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit) or adapter not in module.lora_A:
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        weight = module.get_base_layer().weight
        # On the 4-bit weight's device (the training GPU): a full SVD per layer is seconds there, minutes on a CPU.
        # A full SVD, not a randomized rank-r one: the quantization error's spectrum is flat, where a randomized
        # estimate of its top r directions is at its least accurate (PEFT's own LoftQ uses the full SVD too).
        original = read(key).to(weight.device).float()
        quantized = dequantize_4bit(weight.data, weight.quant_state).float()
        u, s, vh = torch.linalg.svd(original - quantized, full_matrices=False)
        rank = module.r[adapter]
        # scaling * B A must equal the truncated error, so each factor carries sqrt(S / scaling).
        root = (s[:rank] / module.scaling[adapter]).sqrt()
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        lora_a.data = (root[:, None] * vh[:rank]).to(lora_a.device, lora_a.dtype).contiguous()
        lora_b.data = (u[:, :rank] * root).to(lora_b.device, lora_b.dtype).contiguous()
        before += float((s ** 2).sum())
        after += float((s[rank:] ** 2).sum())
        layers += 1
    if not layers:
        raise LorafitError("loftq found no 4-bit layer among the adapted modules", where="adapter.init",
                           hint="adapt 4-bit linear layers (e.g. target_modules: all-linear), or use init: default")
    return LoftqReport(layers, math.sqrt(before), math.sqrt(after))


def _safetensors_reader(source: str):
    """name -> the original (full-precision) tensor from a local model folder's model.safetensors, sharded or not."""
    from safetensors import safe_open

    folder = Path(source)
    if not folder.is_dir():  # a hub id: its files in the local cache
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, allow_patterns=["*.safetensors", "*.json"]))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {key: folder / file for key, file in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
    elif (folder / "model.safetensors").is_file():
        files = None
    else:
        raise LorafitError(f"loftq reads the original weights from safetensors files, and {folder} has none",
                           where="adapter.init", hint="save the base model with safetensors, or use init: default")

    def read(key: str):
        path = files.get(key) if files is not None else folder / "model.safetensors"
        if path is not None:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                if key in handle.keys():
                    return handle.get_tensor(key)
        raise LorafitError(f"loftq needs the original weight {key}, which {folder} does not hold under that name",
                           where="adapter.init", hint="use init: default for this model")

    return read
