"""Will this adapter serve in vLLM? vLLM's LoRA rules, checked against adapter_config.json before a model card
shows a vLLM snippet (lorafit/run_record.py) and when `lorafit merge` writes a model (lorafit/merge.py).

The rules are vLLM's own, read from its source (vllm-project/vllm, main branch):
- vllm/lora/peft_helper.py, `PEFTHelper._validate_features` and `validate_legal`: refused are DoRA (`use_dora`),
  `modules_to_save` other than a classifier's `classifier` / `score`, `lora_bias`, `bias` other than "none",
  inits that change the base weights (`init_lora_weights` pissa / olora / corda / loftq; gaussian, eva,
  orthogonal, mica and lora_ga are plain LoRAs once saved), aLoRA (`alora_invocation_tokens`),
  `layer_replication`, BD-LoRA (`use_bdlora`) and QALoRA (`use_qalora`); a rank (`r`, or any `rank_pattern`
  value) above the server's `max_lora_rank`. rsLoRA is supported (scaling alpha / sqrt(r)).
- vllm/config/lora.py, `MaxLoRARanks`: `max_lora_rank` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16),
  so a rank above 512 never loads and one above 16 needs `max_lora_rank` raised.
- vllm/lora/lora_model.py (`check_unexpected_modules`, "expected target modules in ... but received"): a LoRA on a
  module the model's vLLM implementation does not expose is refused; recent releases dropped LoRA on the
  embeddings and lm_head (vllm/config/lora.py deprecates `lora_extra_vocab_size`), so those targets are a warning.
- PEFTHelper reads LoRA configs only: other PEFT methods (prefix tuning, IA3, AdaLoRA's SVD form) do not load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
DEFAULT_MAX_LORA_RANK = 16
_SAVEABLE = {"classifier", "score"}  # the only modules_to_save vLLM accepts (classification models)
_PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}  # saved as plain LoRAs
_EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")
SOURCE = "vLLM's vllm/lora/peft_helper.py and vllm/config/lora.py"


@dataclass
class VllmCheck:
    """Whether vLLM loads the adapter as a LoRA, why not, and the server setting it needs."""

    loads: bool
    problems: list[str] = field(default_factory=list)  # each a reason vLLM refuses it
    warnings: list[str] = field(default_factory=list)  # may not load, depending on the vLLM release and model
    max_lora_rank: int | None = None  # the smallest max_lora_rank that admits it; None when it cannot load
    fix: str = ""  # what to do instead, when it does not load

    def refusal(self) -> str:
        """Why vLLM refuses it, citing where the rules come from (empty when it loads)."""
        return f"will not load in vLLM as a LoRA: {'; '.join(self.problems)} ({SOURCE})" if self.problems else ""

    def summary(self) -> str:
        """One line for merge's output and the model card."""
        if self.loads:
            return "loads in vLLM as a LoRA" + (f" ({'; '.join(self.warnings)})" if self.warnings else "")
        return f"{self.refusal()}. {self.fix}"


def check_adapter(config: dict[str, Any]) -> VllmCheck:
    """vLLM's LoRA rules applied to an adapter_config.json."""
    problems: list[str] = []
    retrain: list[str] = []
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        problems.append(f"vLLM serves LoRA adapters only, this is {peft_type}")
        retrain.append("adapter.method: lora")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported")
        retrain.append("adapter.use_dora: false")
    saved = [m for m in config.get("modules_to_save") or [] if m not in _SAVEABLE]
    if saved:
        problems.append(f"modules_to_save {saved} (fully trained modules) are not supported")
        retrain.append("no adapter.modules_to_save")
    if config.get("lora_bias"):
        problems.append("LoRA bias (lora_bias) is not supported")
    if str(config.get("bias") or "none") != "none":
        problems.append(f"adapter bias {config.get('bias')!r} is not supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base weights, which vLLM does not")
    for key, what in (("alora_invocation_tokens", "activated LoRA"), ("layer_replication", "layer_replication"),
                      ("use_bdlora", "block-diagonal LoRA"), ("use_qalora", "QALoRA")):
        if config.get(key):
            problems.append(f"{what} is not supported")
    # rank_pattern holds ranks (LoRA, EVA) or, for AdaLoRA, each module's mask of kept ranks
    rank = max([int(config.get("r") or 0), *[sum(map(bool, v)) if isinstance(v, list) else int(v)
                                             for v in (config.get("rank_pattern") or {}).values()]])
    if peft_type == "LORA" and rank > MAX_LORA_RANKS[-1]:
        problems.append(f"rank {rank} is above vLLM's largest max_lora_rank {MAX_LORA_RANKS[-1]}")
        retrain.append(f"adapter.r <= {MAX_LORA_RANKS[-1]}")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    warnings = [f"a LoRA on {name} (embeddings / lm_head) is refused by recent vLLM releases"
                for name in targets if name.rsplit(".", 1)[-1] in _EMBEDDINGS]
    if problems:
        fix = ("Serve it merged instead: `lorafit merge <adapter> --out merged/`, then `vllm serve merged/`"
               + (f"; or retrain with {', '.join(retrain)}" if retrain else "") + ".")
        return VllmCheck(False, problems, warnings, None, fix)
    return VllmCheck(True, [], warnings, next(r for r in MAX_LORA_RANKS if r >= max(rank, 1)))


def lora_snippet(base: str, name: str, adapter_dir: str, check: VllmCheck) -> list[str]:
    """The model card's vLLM lines: the LoRA serving code when the adapter loads, else why not and what to do."""
    if not check.loads:
        return [f"vLLM: this adapter {check.summary()}", ""]
    rank = f", max_lora_rank={check.max_lora_rank}" if check.max_lora_rank > DEFAULT_MAX_LORA_RANK else ""
    lines = [
        "With vLLM (LoRA serving):",
        "",
        "```python",
        "from vllm import LLM",
        "from vllm.lora.request import LoRARequest",
        "",
        f'llm = LLM(model="{base}", enable_lora=True{rank})',
        f'outputs = llm.chat(messages, lora_request=LoRARequest("{name}", 1, "{adapter_dir}"))',
        "```",
        "",
    ]
    if check.warnings:
        lines += [f"Note: {'; '.join(check.warnings)}; if it is refused, serve the merged model "
                  "(`lorafit merge`).", ""]
    return lines
