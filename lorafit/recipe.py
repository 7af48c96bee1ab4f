"""The recipe: one YAML file that is the whole experiment.

`load_recipe` reads a file (following `extends:`), applies `--set` overrides, and validates the result
into a frozen `Recipe`. That object is the single source of truth for every later stage; nothing
downstream re-reads YAML. Every field is documented once, here, in its `description`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from lorafit import tasks
from lorafit.errors import LorafitError
from lorafit.rewards import RewardSpec
from lorafit.tasks import dpo, grpo, kto

BUILTIN_MODELS = ("smollm2-135m-instruct",)
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


class _Section(BaseModel):
    # inf/NaN pass `gt=0`-style bounds (inf > 0), so they are refused explicitly: `.inf` is never a useful setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSection(_Section):
    path: str = Field(description="Base model: a built-in alias (smollm2-135m-instruct), a local folder, or a hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype the base weights are loaded in; auto follows training.precision."
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto lets transformers pick (SDPA where available)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow running Python code shipped with the model. Only for models you trust."
    )
    allow_pickle_weights: bool = Field(
        False, description="Allow loading .bin/.pt (pickle) weights; pickles can execute code when loaded."
    )

    @field_validator("path")
    @classmethod
    def _home_expanded(cls, value: str) -> str:
        return _expand_home(value)


class QuantizationSection(_Section):
    bits: Literal[4, 8] = Field(4, description="Load the base model in 4-bit (QLoRA) or 8-bit via bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the de-quantized matmuls; auto follows training.precision."
    )


class AdapterSection(_Section):
    method: Literal["lora", "adalora", "ia3", "prefix"] = Field(
        "lora", description="PEFT method: lora; adalora (LoRA whose ranks are pruned during training from init_r to "
        "an average of target_r, keeping rank where it matters most); ia3; prefix (tuning).")
    r: int = Field(16, gt=0, description="LoRA rank (adalora: init_r and target_r instead).")
    alpha: float = Field(None, gt=0, description="LoRA scaling numerator (scale = alpha / r); default 2 * r "  # type: ignore[assignment]
                         "(adalora: scale = alpha / init_r, default 2 * init_r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input, in [0, 1).")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt: a list of names (leaf names or regex-free suffixes), or a preset: "
        "all-linear | attention | attention+mlp. `lorafit inspect-modules` shows what a model has.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained fully and saved with the adapter (e.g. lm_head, score)."
    )
    layers_to_transform: list[int] | None = Field(None, description="Only adapt these layer indices.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale = alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    init: Literal["default", "gaussian", "pissa", "olora", "orthogonal", "loftq", "eva", "corda"] = Field(
        "default", description="LoRA weight initialisation (PEFT's init_lora_weights). loftq: with 4-bit "
        "quantization, the adapter starts by cancelling the quantization error (merge then uses the de-quantized "
        "base). eva: A from the principal directions of each layer's inputs on the first training batches, rank moved "
        "to the layers that need it. corda: the adapter starts from the weight directions the first training batches "
        "use (ipm), the rest stays in the base; saved as a plain LoRA of rank 2r.",
    )
    init_batches: int = Field(
        8, gt=0, description="init eva / corda: how many training batches (of training.batch_size rows, the first "
        "rows in file order) are read to initialise the adapter.",
    )
    num_virtual_tokens: int = Field(20, gt=0, description="Prefix tuning: number of virtual tokens.")
    init_from: str | None = Field(
        None, description="Start from a trained adapter folder (e.g. runs/quickstart/adapter, an SFT run before "
        "task: dpo) instead of a new one; its own rank, alpha and target modules apply, and the recipe's must match.",
    )
    # AdaLoRA's budget schedule, under PEFT's names and defaults (peft.AdaLoraConfig). Steps are optimizer steps.
    init_r: int = Field(12, gt=0, description="adalora: the rank every adapted module starts with.")
    target_r: int = Field(8, gt=0, description="adalora: the average rank per module after pruning; the total budget "
                          "(target_r x the adapted modules) is shared out by importance, so some modules keep more.")
    tinit: int = Field(0, ge=0, description="adalora: optimizer steps trained at init_r before pruning starts.")
    tfinal: int = Field(0, ge=0, description="adalora: last optimizer steps trained at the final ranks, after pruning.")
    deltaT: int = Field(1, gt=0, description="adalora: prune every deltaT optimizer steps while the budget shrinks.")
    beta1: float = Field(0.85, gt=0, lt=1, description="adalora: smoothing (EMA) of each weight's importance score.")
    beta2: float = Field(0.85, gt=0, lt=1, description="adalora: smoothing (EMA) of the importance's uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0, description="adalora: weight of the loss term that keeps each module's "
                                   "singular vectors orthogonal.")

    @model_validator(mode="before")
    @classmethod
    def _alpha_defaults_to_twice_r(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("alpha") is None:
            r = data.get("init_r", 12) if data.get("method") == "adalora" else data.get("r", 16)
            if isinstance(r, int) and not isinstance(r, bool):
                data = {**data, "alpha": 2 * r}
        return data

    @field_validator("target_modules")
    @classmethod
    def _non_empty_targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module or a preset such as all-linear")
        return value

    @field_validator("layers_to_transform")
    @classmethod
    def _layer_indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0):
            raise ValueError("must list layer indices from 0 (or be null for every layer)")
        return value

    @model_validator(mode="after")
    def _settings_the_method_uses(self) -> AdapterSection:
        # A setting the chosen method cannot use is refused, never ignored. Defaults are fine: a run's recipe.yaml
        # lists every key with its default, and must load again.
        unused = [key for key in _NOT_USED_BY[self.method] if getattr(self, key) != _default_of(self, key)]
        if self.method == "adalora" and "r" in unused:
            raise ValueError(f"r: not used by method: adalora, whose modules start at init_r and are pruned to an "
                             f"average of target_r; replace r: {self.r} with init_r (and target_r)")
        if unused:
            raise ValueError(f"{', '.join(unused)}: not used by method: {self.method} (only by "
                             f"{_USED_BY_WHOM[unused[0]]}); remove {'it' if len(unused) == 1 else 'them'} or change "
                             "the method")
        if self.init_batches != _default_of(self, "init_batches") and self.init not in ("eva", "corda"):
            raise ValueError(f"init_batches: only init eva and corda read training batches (init is {self.init}); "
                             "remove it or change init")
        if self.init in ("loftq", "eva", "corda") and self.use_dora:
            raise ValueError(f"use_dora: init {self.init} sets A and B after PEFT has computed DoRA's magnitudes from "
                             "them, which would then be wrong; use use_dora: false or init: default")
        if self.init in ("loftq", "eva", "corda") and self.init_from is not None:
            raise ValueError(f"init_from: the adapter starts from the trained weights in {self.init_from}, so init "
                             f"{self.init} would have nothing to initialise; remove init or init_from")
        if self.method == "lora" and self.init == "orthogonal" and self.r % 2:
            raise ValueError(f"init: orthogonal builds A and B from the two halves of an r x r orthogonal matrix, so "
                             f"it needs an even r (got r: {self.r})")
        if self.method == "adalora" and self.target_r >= self.init_r:
            raise ValueError(f"target_r: adalora prunes each module from init_r down to an average of target_r, so "
                             f"target_r must be below init_r (got {self.target_r} and {self.init_r}); for one fixed rank "
                             "use method: lora")
        return self


# Settings of one PEFT method that the others do not have (prefix tuning learns virtual tokens, not weight deltas).
# AdaLoRA is LoRA with singular-value triplets: it takes alpha, dropout, bias and layers_to_transform, but sets each
# rank itself (init_r, target_r) and initialises them its own way (PEFT's SVD layers ignore init_lora_weights,
# use_rslora, and refuse DoRA).
_LORA_ONLY = ("r", "alpha", "dropout", "bias", "layers_to_transform", "use_rslora", "use_dora", "init",
              "init_batches")
_ADALORA_ONLY = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")
_NOT_USED_BY = {
    "lora": ("num_virtual_tokens", *_ADALORA_ONLY),
    "adalora": ("r", "use_rslora", "use_dora", "init", "init_batches", "num_virtual_tokens"),
    "ia3": (*_LORA_ONLY, "num_virtual_tokens", *_ADALORA_ONLY),
    "prefix": (*_LORA_ONLY, "target_modules", *_ADALORA_ONLY),
}
_USED_BY_WHOM = {**{key: "methods lora and adalora" for key in _LORA_ONLY},
                 **{key: "method: lora" for key in ("r", "use_rslora", "use_dora", "init", "init_batches")},
                 **{key: "method: adalora" for key in _ADALORA_ONLY},
                 "num_virtual_tokens": "method: prefix", "target_modules": "methods lora, adalora and ia3"}


def _default_of(section: AdapterSection, key: str) -> Any:
    if key == "alpha":  # default: twice r (adalora: twice init_r)
        return 2 * (section.init_r if section.method == "adalora" else section.r)
    return AdapterSection.model_fields[key].get_default(call_default_factory=True)


def _expand_home(value: str) -> str:
    """`~` and `~user` mean a home folder wherever lorafit reads a path, as in the shell."""
    return os.path.expanduser(value) if value.startswith("~") else value


DataFormat = Literal["auto", "messages", "alpaca", "prompt-completion", "text"]


class DataSource(_Section):
    path: str = Field(description="A local jsonl/json/csv/parquet file or a hub dataset id.")
    weight: float = Field(1.0, gt=0, description="Share of the mixed training rows drawn from this source, relative "
                          "to the other sources' weights (3 and 1: three rows from this one for every one from the other).")
    split: str | None = Field(None, description="Split to read from a hub dataset; default data.split.")
    fields: dict[str, str] | None = Field(None, description="This source's column names; default data.fields.")
    format: DataFormat | None = Field(None, description="This source's row format; default data.format.")

    @field_validator("path")
    @classmethod
    def _home_expanded(cls, value: str) -> str:
        return _expand_home(value)


class DataSection(_Section):
    train: str | list[str | DataSource] = Field(
        description="Training data: local jsonl/json/csv/parquet file(s) or a hub dataset id; a list of files is read "
        "as one data set, and a list of {path, weight, split, fields, format} entries is mixed by weight "
        "(sampled under training.seed, without repeating a row; it ends when a source runs out).")
    eval: str | float | None = Field(
        None, description="Eval data: a file, or a fraction in (0, 1) held out from train; null for none."
    )
    format: DataFormat = Field(
        "auto", description="Row format; auto detects it from the columns (ShareGPT 'conversations' included)."
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map this format's column names to yours, e.g. {prompt: question, completion: answer}; "
        "sequence-classification reads text (and optionally text_pair) and label, e.g. {text: review, label: stars}.",
    )
    labels: list[str] | None = Field(
        None, description="sequence-classification: the class names in id order; default: the distinct label "
        "values of data.train, sorted (numbers numerically).",
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    max_length: int = Field(1024, gt=0, description="Tokens per example; longer rows are truncated.")
    packing: bool = Field(
        False, description="Pack several examples per row without cross-attention (padding-free); faster on ragged data."
    )
    num_proc: int | None = Field(
        None, gt=0, description="Processes that tokenize the data; default: the CPU cores available (at most 8). "
        f"Task {tasks.names_where(lambda t: not t.prepares_in_parallel)} prepares its rows in one process and "
        "refuses it."
    )
    cache: bool = Field(
        True, description="Keep the prepared (tokenized) data in the lorafit cache folder and reuse it while nothing "
        "that changes it changes (data files, tokenizer, template, format, fields, max_length, train_on, ...)."
    )
    streaming: bool = Field(
        False, description="Read, tokenize (and pack) rows on the fly instead of preparing them all first, for data "
        "larger than memory or disk; needs training.max_steps, and data.eval as a file or null.",
    )
    group_by_length: bool = Field(
        False, description="Batch rows of similar length together, so little compute goes to padding; faster on "
        "ragged data without packing (each batch then holds short or long rows, not a random mix)."
    )

    @field_validator("eval")
    @classmethod
    def _fraction_in_range(cls, value: str | float | None) -> str | float | None:
        if isinstance(value, float) and not 0.0 < value < 1.0:
            raise ValueError("a held-out fraction must be between 0 and 1 (exclusive), or give a file")
        return _expand_home(value) if isinstance(value, str) else value

    @field_validator("train")
    @classmethod
    def _home_expanded(cls, value: str | list[str | DataSource]) -> str | list[str | DataSource]:
        if isinstance(value, list):  # weighted entries expand their own path (DataSource._home_expanded)
            return [_expand_home(item) if isinstance(item, str) else item for item in value]
        return _expand_home(value)

    @field_validator("labels", mode="before")
    @classmethod
    def _integer_labels_as_names(cls, value: Any) -> Any:
        # `labels: [0, 1, 2]` names classes as the data's integer labels do; they are matched as text.
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("labels")
    @classmethod
    def _distinct_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) < 2 or len(set(value)) != len(value)):
            raise ValueError("must list at least two distinct class names")
        return value


class PreferenceSection(_Section):
    beta: float = Field(0.1, gt=0, description="How far the adapter may move from the reference: higher beta keeps "
                        "it closer (DPO/KTO's beta; for loss ipo, the regulariser tau). orpo: the weight of the "
                        "odds-ratio term beside the chosen answers' NLL (the paper's lambda).")
    loss: str | None = Field(
        None, description=f"TRL's loss type. dpo: {', '.join(dpo.DPO_LOSSES)} (default sigmoid); kto: "
        f"{', '.join(kto.KTO_LOSSES)} (default kto); orpo has one loss and takes none.",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo losses robust and exo_pair: the assumed "
                                   "share of flipped preference labels (exo_pair needs it above 0).")
    reference: Literal["adapter-disabled", "init-adapter"] = Field(
        "adapter-disabled", description="The model rewards are measured against, never a second copy in memory: "
        "adapter-disabled = the base model (the adapter switched off); init-adapter = a frozen copy of the adapter "
        "the run starts from (adapter.init_from, e.g. the SFT adapter), only the adapter's weights are duplicated. "
        "orpo has no reference model: the default is unused there, init-adapter refused.",
    )
    sft_weight: float = Field(0.0, ge=0, description="dpo: weight of an extra loss term, the chosen answer's own "
                              "negative log-likelihood (RPO; TRL's loss 'sft' added to the preference loss). DPO "
                              "alone can widen the margin by pushing both answers down; 0.5-1.0 keeps the chosen "
                              "answer likely. 0 = plain preference loss.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable (label true) rows' loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable (label false) rows' loss.")


class TemplateSection(_Section):
    name: Literal["auto", "model", "chatml", "alpaca", "custom"] = Field(
        "auto",
        description="Prompt template: the tokenizer's chat template (model), chatml, alpaca, or custom; "
        "auto = model when the tokenizer has one, else chatml.",
    )
    custom: str | None = Field(None, description="Jinja chat template text, or a path to a .jinja file (name: custom).")
    system_prompt: str | None = Field(None, description="System message put before rows that have none.")
    train_on: Literal["completions", "all"] = Field(
        "completions", description="Loss on assistant/completion tokens only, or on every token."
    )

    @model_validator(mode="after")
    def _custom_needs_text(self) -> TemplateSection:
        if self.name == "custom" and not self.custom:
            raise ValueError("name: custom needs template.custom (Jinja text or a .jinja file)")
        return self

    @field_validator("custom")
    @classmethod
    def _home_expanded(cls, value: str | None) -> str | None:
        return _expand_home(value) if value is not None and "\n" not in value else value


class TrainingSection(_Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, gt=0, description="Examples per device per forward pass.")
    grad_accum: int = Field(4, gt=0, description="Forward passes per optimizer step.")
    learning_rate: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    scheduler: str = Field("cosine", description="LR schedule (any transformers scheduler name).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: str = Field("adamw_torch", description="Any transformers optimizer name, e.g. paged_adamw_8bit.")
    gradient_checkpointing: Literal["auto", True, False] = Field(
        "auto", description="Recompute activations in backward to save memory; auto = on for GPUs and 4-bit."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute precision; auto picks the fastest the hardware runs natively."
    )
    seed: int = Field(42, description="Seed for data order, dropout and initialisation.")
    logging_steps: int = Field(10, gt=0, description="Log loss every N steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps; default: at the end only.")
    save_steps: int = Field(200, gt=0, description="Write a resumable checkpoint every N steps.")
    save_total_limit: int | None = Field(2, gt=0, description="Keep at most N checkpoints (oldest removed).")
    max_nonfinite_steps: int = Field(3, gt=0, description="Stop after this many consecutive NaN/inf losses.")


class GenerationSection(_Section):
    num_generations: int = Field(8, ge=2, description="task grpo / rloo: completions sampled per prompt; each one's "
                                 "reward is compared with the others of its group.")
    max_completion_length: int = Field(64, gt=0, description="Most tokens sampled per completion; a completion cut "
                                       "there is counted as clipped (completions/clipped_ratio).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the share of probability mass sampled from.")


class RLSection(_Section):
    loss: Literal[grpo.GRPO_LOSSES] | None = Field(  # type: ignore[valid-type]
        None, description=f"grpo: TRL's loss type, one of {', '.join(grpo.GRPO_LOSSES)} (default dapo: token-level, "
        "normalised by the active tokens); rloo has one loss and takes none.")
    beta: float = Field(0.0, ge=0, description="Weight of the KL term to the reference model; 0 (the default) "
                        "computes no reference log-probabilities at all.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Clipping range of the policy ratio.")
    scale_rewards: Literal["group", "batch", "none"] | None = Field(
        None, description="grpo: divide advantages by the reward std of the group (default), of the batch, or not "
        "at all (Dr. GRPO); rloo does not scale.")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes over each batch of completions (mu); "
                                "above 1 the old policy's log-probabilities are computed once per batch.")
    reference: Literal["adapter-disabled", "init-adapter"] = Field(
        "adapter-disabled", description="With beta > 0, the model the KL term is measured against, never a second "
        "copy in memory: the base (adapter switched off), or a frozen copy of the adapter the run starts from "
        "(needs adapter.init_from).")


class OutputSection(_Section):
    dir: str | None = Field(None, description="Run folder; default runs/<name>.")
    report_to: Literal["auto"] | list[str] = Field(
        "auto", description="Trackers (tensorboard, wandb, mlflow, ...); auto = tensorboard when installed."
    )

    @field_validator("dir")
    @classmethod
    def _usable_path(cls, value: str | None) -> str | None:
        if value is not None and "\0" in value:  # path calls raise on it, deep inside the run-folder checks
            raise ValueError("a folder path cannot contain a NUL character")
        return _expand_home(value) if value is not None else None


class Recipe(_Section):
    name: str = Field(description="Run name; names the default run folder.")
    task: Literal[tuple(tasks.TASKS)] = Field(  # type: ignore[valid-type]  # the names of lorafit/tasks/
        tasks.DEFAULT, description=" ".join(task.summary for task in tasks.TASKS.values()),
    )
    model: ModelSection
    quantization: QuantizationSection | None = Field(None, description="Absent: plain LoRA. Present: QLoRA.")
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    data: DataSection
    preference: PreferenceSection | None = Field(
        None, description="task dpo / kto / orpo: beta, loss type and reference model; absent = the defaults.")
    rewards: list[RewardSpec] | None = Field(
        None, description="task grpo / rloo: what a completion is worth, a weighted sum of these entries (a built-in "
        "by name, or function: path.py:name with --allow-code); each one is logged on its own.")
    generation: GenerationSection | None = Field(
        None, description="task grpo / rloo: how completions are sampled; absent = the defaults.")
    rl: RLSection | None = Field(
        None, description="task grpo / rloo: the policy loss, KL weight and reference; absent = the defaults.")
    template: TemplateSection = Field(default_factory=TemplateSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @field_validator("name")
    @classmethod
    def _usable_as_folder_name(cls, value: str) -> str:
        if not value.strip() or "\0" in value:  # it names the default run folder, runs/<name>
            raise ValueError("must be a non-empty name without NUL characters")
        parts = Path(value).parts
        if os.path.isabs(value) or ".." in parts or value.startswith("~"):
            # runs/<name> must stay inside runs/: `name: ../../x` would put the run anywhere
            raise ValueError("must be a name, not a path outside runs/ (no leading /, ~ or .. parts); set output.dir "
                             "to choose the folder")
        too_long = next((part for part in parts if len(part.encode()) > 255), None)
        if too_long is not None:
            raise ValueError(f"is {len(too_long.encode())} bytes long; file systems allow 255 per folder name")
        return value

    @model_validator(mode="after")
    def _cross_field_checks(self) -> Recipe:
        if self.quantization and self.adapter.init in ("pissa", "olora"):
            raise ValueError(
                f"adapter.init: {self.adapter.init} decomposes full-precision weights and cannot start from a "
                "quantized model; use init: default with quantization, or remove the quantization section"
            )
        if self.quantization and self.adapter.init == "orthogonal":
            # It needs only the layer shapes, but PEFT creates the matrices in the base layer's storage dtype, which
            # under bitsandbytes is packed 8-bit integers: the adapter could not be trained.
            raise ValueError(
                "adapter.init: orthogonal cannot be used with quantization: PEFT stores the orthogonal matrices in "
                "the base layer's weight dtype, which is packed uint8 in a 4/8-bit model; use init: default or "
                "gaussian with quantization, or remove the quantization section"
            )
        self._check_init()
        if self.adapter.method != "lora" and (self.adapter.use_dora or self.adapter.use_rslora):
            raise ValueError("adapter.use_dora / use_rslora only apply to method: lora")
        if self.data.packing and self.adapter.method == "prefix":
            # The prefix reaches attention as a KV cache, and with a cache transformers does not split packed rows
            # at their sequence boundaries: packed examples would attend to each other (tests/test_packing.py).
            raise ValueError("data.packing: prefix tuning cannot be packed (packed examples would attend to each "
                             "other); set packing: false, or use data.group_by_length for speed")
        if self.data.streaming:
            self._check_streaming()
        task = tasks.TASKS[self.task]
        for part, given in (("data.labels", self.data.labels is not None), ("preference", self.preference),
                            ("rewards", self.rewards), ("generation", self.generation), ("rl", self.rl)):
            if given is not None and given is not False and part not in task.sections:
                users = tasks.names_where(lambda t, part=part: part in t.sections)
                raise ValueError(f"data.labels: class names only apply to task: {users}" if part == "data.labels"
                                 else f"{part}: only applies to task: {users}")
        if self.data.num_proc is not None and not task.prepares_in_parallel:
            raise ValueError(f"data.num_proc: task {self.task} prepares its rows in this process (only task "
                             f"{tasks.names_where(lambda t: t.prepares_in_parallel)} tokenize in processes); remove "
                             "data.num_proc")
        if self.training.eval_steps is not None and self.data.eval is None:
            raise ValueError("training.eval_steps: evaluates the data.eval rows, and the recipe has none; set "
                             "data.eval (a file or a held-out fraction) or remove eval_steps")
        task.check_recipe(self)
        if self.adapter.init_from is not None and self.adapter.method == "prefix":
            raise ValueError("adapter.init_from: continuing a prefix-tuning adapter is not supported; use method: lora")
        if self.adapter.method == "adalora":
            self._check_adalora()
        return self

    def _check_adalora(self) -> None:
        adapter, steps = self.adapter, self.training.max_steps
        if adapter.init_from is not None:
            # A saved AdaLoRA adapter is already pruned (its rank pattern), and a LoRA adapter has no singular values:
            # neither is a start the rank budget can be scheduled from.
            raise ValueError("adapter.init_from: method adalora starts every module at init_r and prunes from there, "
                             "so it cannot continue a saved adapter; remove init_from, or use method: lora to continue "
                             "a LoRA adapter")
        problem = adalora_schedule_problem(adapter, steps, f"training.max_steps: {steps}") if steps else None
        if problem:
            raise ValueError(problem)

    def _check_init(self) -> None:
        """adapter.init loftq / eva / corda: the combinations that cannot work, each with the reason."""
        init, quantization = self.adapter.init, self.quantization
        if init == "loftq" and quantization is None:
            raise ValueError("adapter.init: loftq starts the adapter by cancelling the 4-bit quantization error, and "
                             "without a quantization section there is none; add quantization: {bits: 4} or use "
                             "init: default")
        if init == "loftq" and quantization.bits != 4:
            raise ValueError("adapter.init: loftq compensates 4-bit weights (PEFT's LoftQ for bitsandbytes); set "
                             "quantization.bits: 4 or use init: default")
        if init == "corda" and quantization is not None:
            raise ValueError("adapter.init: corda decomposes full-precision weights and cannot start from a quantized "
                             "model; use init: eva or loftq with quantization, or remove the quantization section")
        if init in ("eva", "corda") and not tasks.TASKS[self.task].data_driven_init:
            raise ValueError(f"adapter.init: {init} reads the first training batches as SFT rows (task causal-lm); "
                             f"for task {self.task} use init: default, or start from an SFT adapter trained with "
                             f"init {init} (adapter.init_from)")

    def _check_streaming(self) -> None:
        if self.training.max_steps is None:
            raise ValueError("data.streaming: a stream has no known length, so training needs training.max_steps")
        if isinstance(self.data.eval, float):
            raise ValueError("data.eval: a fraction cannot be held out of a stream; give an eval file, or null")
        if self.data.group_by_length:
            raise ValueError("data.group_by_length: needs every row's length up front, which a stream does not have")
        if not tasks.TASKS[self.task].streams:
            raise ValueError(f"data.streaming: only task {tasks.names_where(lambda t: t.streams)} streams its data")

    @property
    def run_dir(self) -> Path:
        """The run folder this recipe writes to."""
        return Path(self.output.dir or f"runs/{self.name}").expanduser()


def adalora_schedule_problem(adapter: AdapterSection, total_steps: int, source: str) -> str | None:
    """Why an AdaLoRA schedule cannot run in `total_steps` optimizer steps (None when it can).

    PEFT needs tinit < total steps - tfinal: some steps must be left to prune ranks in. `source` says where the
    step count comes from (e.g. "training.max_steps: 6").
    """
    if adapter.tinit + adapter.tfinal < total_steps:
        return None
    return (f"adapter.tinit / adapter.tfinal: the run has {total_steps} optimizer steps ({source}), but tinit "
            f"{adapter.tinit} + tfinal {adapter.tfinal} leave no step for adalora to prune ranks in; lower tinit or "
            "tfinal, or train for more steps")


SECTIONS: dict[str, type[BaseModel]] = {
    "": Recipe,
    "model": ModelSection,
    "quantization": QuantizationSection,
    "adapter": AdapterSection,
    "data": DataSection,
    "preference": PreferenceSection,
    "generation": GenerationSection,
    "rl": RLSection,
    "template": TemplateSection,
    "training": TrainingSection,
    "output": OutputSection,
}

# Names users bring from PEFT, TRL, axolotl and LLaMA-Factory recipes, mapped to ours.
_FAMILIAR_NAMES = {
    "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_target_modules": "target_modules",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "micro_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "lr": "learning_rate", "lr_scheduler": "scheduler", "lr_scheduler_type": "scheduler", "optim": "optimizer",
    "sequence_len": "max_length", "max_seq_length": "max_length", "cutoff_len": "max_length",
    "base_model": "path", "model_name_or_path": "path", "output_dir": "dir", "bf16": "precision",
    "fp16": "precision", "load_in_4bit": "bits", "load_in_8bit": "bits", "warmup_steps": "warmup_ratio",
    "datasets": "train", "dataset": "train", "chat_template": "name", "peft_type": "method",
}


# ----------------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge (`extends:`), override (`--set`) and validate a recipe file."""
    path = Path(path)
    raw = _load_with_extends(path, seen=())
    for override in overrides:
        _apply_override(raw, override)
    raw.setdefault("name", path.stem)
    return validate_recipe(raw, source=str(path))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `--set section.key=value` overrides to a raw recipe dict (in place; also returned)."""
    for override in overrides:
        _apply_override(raw, override)
    return raw


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a plain dict into a Recipe, turning pydantic errors into one clear LorafitError."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise LorafitError(_describe_validation_error(exc, raw), where=source) from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, as it applies, ready to write next to a run (and shown by --dry-run).

    Every key the run's adapter method and task use is listed, `# default` marking the values the recipe left at
    their defaults; the keys the method cannot use (which validation holds at their defaults, _NOT_USED_BY) and the
    optional sections the run has none of (quantization, preference, rewards, generation, rl) are left out. Loading
    it gives back the same Recipe, so `lorafit train recipe.yaml` re-runs the run and --resume fingerprints match.
    """
    lines = ["# Resolved recipe written by lorafit; re-run with: lorafit train recipe.yaml",
             f"# Only the keys method {recipe.adapter.method} and task {recipe.task} use; '# default' marks a value "
             "lorafit filled in."]
    for key, field in Recipe.model_fields.items():
        value = getattr(recipe, key)
        if isinstance(value, BaseModel):
            lines.append(f"{key}:")
            unused = _NOT_USED_BY[value.method] if isinstance(value, AdapterSection) else ()
            for inner in type(value).model_fields:
                if inner not in unused:
                    default = (_default_of(value, inner) if isinstance(value, AdapterSection)
                               else type(value).model_fields[inner].get_default(call_default_factory=True))
                    lines.append("  " + _yaml_line(inner, value.model_dump(mode="json")[inner],
                                                   default=getattr(value, inner) == default))
        elif value is not None:
            lines.append(_yaml_line(key, recipe.model_dump(mode="json")[key],  # rewards: a list of models
                                    default=field.default is not PydanticUndefined and value == field.default))
        elif key in tasks.task_of(recipe).sections:  # left unset (not written: the run record keeps it unset)
            lines.append(f"# {key}: not set; task {recipe.task} uses this section's defaults")
    return "\n".join(lines) + "\n"


def _yaml_line(key: str, value: Any, *, default: bool) -> str:
    """`key: value` on one line (flow style), with a `# default` comment when the value is the default."""
    text = yaml.safe_dump({key: value}, default_flow_style=True, allow_unicode=True, width=2**31 - 1).strip()[1:-1]
    return text + ("  # default" if default else "")


def read_yaml_file(path: Path) -> dict[str, Any]:
    """Safely parse one YAML mapping: no python tags, no duplicate keys, clear file errors."""
    if not path.exists():
        raise LorafitError("file not found", where=str(path), hint="check the path")
    if path.is_dir():
        raise LorafitError("is a directory, not a recipe file", where=str(path), hint="pass the .yaml file inside it")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LorafitError(f"not UTF-8 text (byte {exc.start})", where=str(path), hint="save the file as UTF-8") from None
    if not text.strip():
        raise LorafitError("the file is empty", where=str(path), hint="start from configs/quickstart.yaml")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}" if mark else "?"
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        raise LorafitError(f"{line}: {problem}", where=str(path), hint="fix the YAML syntax") from None
    except yaml.YAMLError as exc:
        raise LorafitError(f"invalid YAML: {exc}", where=str(path)) from None
    if not isinstance(data, dict):
        raise LorafitError(
            f"expected a mapping of sections at the top level, got {type(data).__name__}", where=str(path)
        )
    return data


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of letting the last one win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # `? [a, b]: 1`; SafeLoader would say the same, after a TypeError here
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not a {type(key).__name__}", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (each key may appear once per mapping)", key_node.start_mark
                )
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping  # type: ignore[arg-type]
)


def _load_with_extends(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13), a name too long
        raise LorafitError(f"cannot open the recipe ({exc})", where=str(path),
                           hint="fix the link or the path") from None
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise LorafitError(f"extends forms a cycle: {chain}", where=str(path))
    raw = read_yaml_file(path)
    _resolve_input_paths(raw, path.parent)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent.strip() or "\0" in parent:  # NUL: no OS accepts it in a path
        raise LorafitError("extends must be a path to another recipe file", where=f"{path}: extends")
    parent_path = Path(parent) if os.path.isabs(parent) else path.parent / parent
    base = _load_with_extends(parent_path, (*seen, resolved))
    base.pop("name", None)  # a child recipe is a new experiment; it names itself (or takes its file name)
    return _deep_merge(base, raw)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_input_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Make the input paths a file names relative to that file, so recipes can be shared and extended."""

    def resolve(value: Any, *, must_look_like_file: bool) -> Any:
        if isinstance(value, str):
            value = _expand_home(value)
        if not isinstance(value, str) or "\0" in value or os.path.isabs(value) or value in BUILTIN_MODELS:
            return value  # (a NUL byte makes path calls raise; such a value is reported as not found later)
        candidate = base_dir / value
        looks_local = value.startswith(("./", "../")) or value.lower().endswith(_DATA_SUFFIXES + (".jinja",))
        try:
            if candidate.exists() or (must_look_like_file and looks_local):
                return str(candidate.resolve())
        except (RuntimeError, OSError):  # a symlink loop or a name too long: left as written, reported when opened
            return str(candidate)
        return value

    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            value = data.get(key)
            if isinstance(value, list):
                data[key] = [{**item, "path": resolve(item.get("path"), must_look_like_file=True)}
                             if isinstance(item, dict) else resolve(item, must_look_like_file=True) for item in value]
            elif value is not None:
                data[key] = resolve(value, must_look_like_file=True)
    model = raw.get("model")
    if isinstance(model, dict):
        model["path"] = resolve(model.get("path"), must_look_like_file=False)
    adapter = raw.get("adapter")
    if isinstance(adapter, dict) and adapter.get("init_from") is not None:
        adapter["init_from"] = resolve(adapter["init_from"], must_look_like_file=False)
    for entry in raw.get("rewards") or []:  # a schema file or a reward function's file, beside the recipe
        if isinstance(entry, dict) and isinstance(entry.get("schema_file"), str):
            entry["schema_file"] = resolve(entry["schema_file"], must_look_like_file=True)
        if isinstance(entry, dict) and isinstance(entry.get("function"), str) and ".py:" in entry["function"]:
            file, _, function = entry["function"].rpartition(":")
            entry["function"] = f"{resolve(file, must_look_like_file=True)}:{function}"
    template = raw.get("template")
    if isinstance(template, dict) and isinstance(template.get("custom"), str) and "\n" not in template["custom"]:
        template["custom"] = resolve(template["custom"], must_look_like_file=True)


_INPUT_PATHS = ("model.path", "data.train", "data.eval", "template.custom")


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `--set section.key=value`; the value is parsed as YAML so types follow the schema."""
    key_path, sep, text = override.partition("=")
    if not sep or not key_path.strip():
        raise LorafitError(f"--set {override!r}: expected section.key=value", hint="e.g. --set training.max_steps=50")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    keys = key_path.strip().split(".")
    if ".".join(keys) in _INPUT_PATHS:
        # A path typed on the command line means what it means in the shell: relative to the current folder, as a
        # path in a file is relative to that file. The resolved path is what the run's recipe.yaml records.
        section, key = keys
        resolved = {section: {key: value}}
        _resolve_input_paths(resolved, Path.cwd())
        value = resolved[section][key]
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise LorafitError(f"--set {key_path}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


# ----------------------------------------------------------------------------------------------------
# Error messages that name the key path and the fix


def _describe_validation_error(exc: ValidationError, raw: dict[str, Any]) -> str:
    # Errors from the members of one union field (str | list[str]) are folded into one line.
    by_key: dict[str, list[str]] = {}
    for error in exc.errors():
        loc = _field_path(error["loc"])
        key = ".".join(str(part) for part in loc)
        kind = error["type"]
        if kind == "extra_forbidden":
            text = f"unknown key{_suggest([str(part) for part in loc])}"
        elif kind == "missing":
            text = "required key is missing"
        else:
            message = error["msg"]
            text = message.removeprefix("Value error, ") if message.startswith("Value error") else (
                "must be " + message.removeprefix("Input should be ")
            )
            if not isinstance(error.get("input"), dict):
                text += f" (got {error['input']!r})"
        by_key.setdefault(key, []).append(text)
    parts = []
    for key, texts in by_key.items():
        texts = list(dict.fromkeys(texts))
        joined = texts[0] if len(texts) == 1 else " or ".join(t.split(" (got")[0] for t in texts) + (
            " (got" + texts[0].split(" (got", 1)[1] if " (got" in texts[0] else ""
        )
        parts.append(f"{key}: {joined}" if key else joined)
    return "; ".join(parts)


def _field_path(loc: tuple[Any, ...]) -> list[Any]:
    """The YAML key path of an error, without the union-member tags pydantic appends."""
    path: list[Any] = []
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int):
            path.append(part)
        elif model is not None and (part in model.model_fields or not path or path[-1] in SECTIONS):
            path.append(part)
            model = SECTIONS.get(str(part)) if len(path) == 1 else None
        else:
            break
    return path


def _suggest(loc: list[str]) -> str:
    *parents, key = loc
    section = ".".join(parents)
    model = SECTIONS.get(section)
    if model is None:
        return ""
    valid = list(model.model_fields)
    if key in _FAMILIAR_NAMES and _FAMILIAR_NAMES[key] in valid:
        return f"; did you mean '{_FAMILIAR_NAMES[key]}'?"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    for other, other_model in SECTIONS.items():
        target = _FAMILIAR_NAMES.get(key, key)
        if other and other != section and target in other_model.model_fields:
            return f"; '{target}' belongs under '{other}:'"
    return f"; valid keys here: {', '.join(valid)}"
