"""How a training run is spread over processes: none, DDP, FSDP or DeepSpeed ZeRO, as the launcher set it up.

`torchrun` and `accelerate launch` describe the run in environment variables that transformers' TrainingArguments
read; `read_layout` turns them into a `Layout` before the model is loaded, because loading depends on it:
- under ZeRO-3 `from_pretrained` builds the model partitioned (deepspeed.zero.Init) and reads the checkpoint on
  rank 0 only, but only when the training arguments (which register the DeepSpeed config) exist as it loads;
- under FSDP with `fsdp_cpu_ram_efficient_loading`, transformers (5.24) still reads the full checkpoint on every
  rank, and accelerate moves ranks > 0 to the meta device and broadcasts rank 0's weights when it shards
  (measured: scripts/load_memory.py, docs/performance.md);
- 4-bit weights shard only when packed into a floating dtype (lorafit.models.quant_storage);
- PEFT under ZeRO-3 follows TRL's rules (lorafit.adapters.wrap_model).

`gathered_state_dict` is the other half: sharded weights are gathered on every rank before rank 0 writes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafit.errors import LorafitError

if TYPE_CHECKING:
    import torch
    from torch import nn


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (RANK is set before any Trainer exists); True when not distributed."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Layout:
    """The parallel layout of a run, as the launcher asked for it."""

    strategy: str  # none | DDP | FSDP1 | FSDP2 | ZeRO-1 | ZeRO-2 | ZeRO-3
    world_size: int

    @property
    def shards_weights(self) -> bool:
        """True when each process holds only part of the frozen weights (FSDP, ZeRO-3)."""
        return self.strategy.startswith("FSDP") or self.strategy == "ZeRO-3"

    @property
    def zero3(self) -> bool:
        """DeepSpeed ZeRO stage 3."""
        return self.strategy == "ZeRO-3"


def read_layout(args) -> Layout:
    """The layout the launcher set up, from transformers TrainingArguments (creating the process group if needed).

    FSDP asked for on CPUs is refused: accelerate shards only on accelerators and would train an FSDP configuration
    on CPUs as plain DDP, while transformers, seeing FSDP's cpu_ram_efficient_loading, leaves ranks > 0 with
    placeholder buffers for FSDP's broadcast from rank 0, which would then never come.
    """
    world_size = args.world_size  # the first access sets up the process group (accelerate's PartialState)
    if args.deepspeed_plugin is not None:
        return Layout(f"ZeRO-{args.deepspeed_plugin.zero_stage}", world_size)
    fsdp_version = _requested_fsdp_version(args)
    if fsdp_version is None:
        return Layout("DDP" if world_size > 1 else "none", world_size)
    if args.device.type == "cpu":
        raise LorafitError(
            "FSDP shards a model across GPUs only; on CPUs accelerate would silently train it as plain data parallel",
            where="accelerate config: distributed_type FSDP",
            hint="on CPUs launch with configs/accelerate/ddp.yaml (use_cpu: true) or torchrun; keep FSDP for GPUs",
        )
    return Layout(f"FSDP{fsdp_version}", world_size)


def _requested_fsdp_version(args) -> int | None:
    """FSDP's version when TrainingArguments (fsdp=...) or `accelerate launch` (an FSDP config) asks for it."""
    if args.fsdp_plugin_args is not None:
        return int(args.fsdp_plugin_args.get("fsdp_version", 1))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def actual_strategy(trainer) -> str:
    """What the Trainer really ran, read from the trained model: FSDP2 when its modules are FSDP2 modules, etc."""
    import torch.distributed as dist

    if trainer.is_deepspeed_enabled:
        return f"ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    if trainer.is_fsdp_enabled:
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(module, FSDPModule) for module in trainer.model.modules()):
            return "FSDP2"
        return "FSDP1"
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return "DDP" if world > 1 else "none"


def run_record(trainer, layout: Layout) -> dict:
    """metrics.json's account of how the run was spread: strategy (as run), processes and batch sizes."""
    args = trainer.args
    per_device = args.per_device_train_batch_size
    return {
        "strategy": actual_strategy(trainer),
        "world_size": layout.world_size,
        "per_device_batch": per_device,
        "grad_accum": args.gradient_accumulation_steps,
        "global_batch": per_device * args.gradient_accumulation_steps * layout.world_size,
    }


def device_kind(device: str) -> str:
    """What the run computed on, by name: the GPU model, or the CPU's model name."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(torch.cuda.current_device())
    if device == "cpu":
        try:
            for line in open("/proc/cpuinfo", encoding="utf-8"):
                if line.startswith("model name"):
                    return f"cpu: {line.split(':', 1)[1].strip()}"
        except OSError:
            pass
        import platform

        return f"cpu: {platform.processor() or platform.machine()}"
    return device


class TrainableOnlyCheckpoints:
    """Trainer mixin: under FSDP2 a checkpoint gathers the trainable tensors only, not the whole model.

    With FULL_STATE_DICT (configs/accelerate/fsdp.yaml) Trainer.save_model gathers `accelerator.get_state_dict`
    (transformers/trainer.py, save_model), which for FSDP2 is every parameter, frozen ones included, offloaded into
    rank 0's host memory (accelerate/accelerator.py, get_state_dict: full_state_dict, cpu_offload): 16 GB for an 8B
    model at every save, of which PEFT's save_pretrained then keeps only the adapter. `gathered_state_dict` gives the
    same adapter tensors (so the checkpoint files, and resuming from them, are unchanged) from the trainable
    parameters alone. Other layouts keep the Trainer's own save (ZeRO-3 already excludes frozen parameters).
    """

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from torch.distributed.fsdp import FSDPModule

        fsdp2 = self.is_fsdp_enabled and any(isinstance(module, FSDPModule) for module in self.model.modules())
        if not (_internal_call and fsdp2):
            return super().save_model(output_dir, _internal_call)
        state_dict = gathered_state_dict(self.model, self)  # every rank sends its shards
        self._save(output_dir or self.args.output_dir, state_dict=state_dict)
        return None


def gathered_state_dict(model: nn.Module, trainer=None) -> dict[str, torch.Tensor] | None:
    """The model's full, unsharded state dict on rank 0 when its weights are sharded; None when they are whole.

    Every rank must call it (each sends its shards). Only trainable tensors (the adapter, modules_to_save) are
    gathered, so rank 0 never holds the whole base model in host memory; when an embedding is a LoRA target PEFT
    saves its base weight with the adapter, so then everything is gathered. The gathering itself is torch's
    `get_model_state_dict` (FSDP2) or accelerate's `get_state_dict` (FSDP1, ZeRO-3), as the Trainer's own save uses.
    """
    import torch
    from torch.distributed.fsdp import FSDPModule

    embedding_targeted = any(isinstance(getattr(module, "base_layer", None), torch.nn.Embedding)
                             for module in model.modules())
    if any(isinstance(module, FSDPModule) for module in model.modules()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not embedding_targeted)
        return get_model_state_dict(model, options=options)
    if trainer is None:
        return None
    if trainer.is_fsdp_enabled:  # FSDP1 (FullyShardedDataParallel wrapper)
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        engine = trainer.model_wrapped
        if not embedding_targeted:
            # What Trainer.save_model does for PEFT under ZeRO-3: gather the trainable parameters only.
            return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        return trainer.accelerator.get_state_dict(engine)
    return None
