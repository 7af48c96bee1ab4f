"""The model lm-evaluation-harness scores for `lorafit eval --benchmark`: the harness's own `HFLM`, loading the
recipe's base and applying an adapter through its `peft=` option (no merge).

Imported only when benchmarks run: it imports the harness (the optional extra `lorafit[bench]`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lm_eval.models.huggingface import HFLM

if TYPE_CHECKING:
    from lorafit.adapters import TrainedAdapter
    from lorafit.models import Precision
    from lorafit.recipe import Recipe


class QuantizedBaseHFLM(HFLM):
    """HFLM that loads the base with the recipe's 4/8-bit quantization, so a QLoRA adapter is scored on the base it
    was trained on (the rule merge and eval follow). HFLM takes a quantization config only from the checkpoint's
    own config.json; its docstring names `_create_model` as the method to override for such loading needs, and
    the harness still applies the adapter (`peft=`) inside it."""

    def __init__(self, *args, base_quantization=None, **kwargs):
        self._base_quantization = base_quantization
        super().__init__(*args, **kwargs)

    def _create_model(self, *args, quantization_config=None, **kwargs) -> None:
        super()._create_model(*args, quantization_config=self._base_quantization or quantization_config, **kwargs)


def harness_model(recipe: Recipe, source: str, precision: Precision, adapter: TrainedAdapter | None,
                  batch_size: int) -> HFLM:
    """The base (`source`: a local folder or hub id), with `adapter` applied by the harness when given, at the
    precision and on the device `lorafit eval` uses."""
    options = {
        "pretrained": source,
        "revision": recipe.model.revision,
        "trust_remote_code": recipe.model.trust_remote_code,
        "device": precision.device,
        "dtype": _dtype(recipe, precision),
        "batch_size": batch_size,
    }
    if adapter is not None:
        options["peft"] = str(adapter.path)
        if (adapter.path / "tokenizer_config.json").is_file():  # tokens added in training live with the adapter
            options["tokenizer"] = str(adapter.path)
    if recipe.quantization is None:
        return HFLM(**options)
    return QuantizedBaseHFLM(**options, base_quantization=_quantization_config(recipe, precision))


def _dtype(recipe: Recipe, precision: Precision) -> str:
    """The weights' dtype as training loaded them: model.dtype, or the precision chosen for this hardware."""
    return recipe.model.dtype if recipe.model.dtype != "auto" else str(precision.torch_dtype).removeprefix("torch.")


def _quantization_config(recipe: Recipe, precision: Precision):
    """The recipe's bitsandbytes settings, as lorafit/models.py's load_base_model applies them in training."""
    import torch
    from transformers import BitsAndBytesConfig

    quant = recipe.quantization
    if quant.bits != 4:
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = quant.compute_dtype if quant.compute_dtype != "auto" else _dtype(recipe, precision)
    compute = getattr(torch, dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=compute)
