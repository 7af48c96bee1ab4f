"""What a finished run writes into its folder, the record of the run: adapter, recipe.yaml, metrics.json, model card.

    runs/<name>/
      adapter/         PEFT format (adapter_config.json, adapter_model.safetensors) + tokenizer + chat template
      recipe.yaml      the resolved recipe (defaults filled in); `lorafit train recipe.yaml` re-runs it
      metrics.json     losses, tokens/s, memory, time, versions, hardware, data fingerprint
      README.md        model card: how it was trained and how to load it
      loss.png         train loss, eval loss and learning rate against step (shown in the model card)
      lorafit.json     the ownership marker: kind run, the entries above, status (see run_folder)

Files are written to a temporary name and renamed, so a crash never leaves a half-written record; the marker
lists each entry before it is written and says `finished` only once all of them are.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit import adapter_init, run_folder, tasks, vllm_rules
from lorafit.recipe import AdapterSection, Recipe, dump_recipe

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from lorafit.train import TrainMetrics


def export_run(run_dir: Path, model: PeftModel, tokenizer: PreTrainedTokenizerBase, recipe: Recipe,
               metrics: TrainMetrics, notes: list[str] | None = None, *,
               state_dict: dict | None = None) -> Path:
    """Write adapter, recipe, loss chart, metrics and model card into the run folder; returns the adapter folder.

    A chart that cannot be drawn is a warning appended to `notes`, never a failed export. `state_dict` is the
    gathered state of a sharded model (lorafit.distributed.gathered_state_dict): FSDP and ZeRO-3 leave each rank
    only a slice of every weight, so the adapter is saved from it instead of the model's own tensors.
    """
    import shutil

    from lorafit.plots import write_loss_chart

    adapter_dir = run_dir / run_folder.ADAPTER
    staging = run_dir / run_folder.ADAPTER_STAGING
    run_folder.update_marker(run_dir, add_files=[run_folder.ADAPTER, run_folder.ADAPTER_STAGING, run_folder.RECIPE,
                                                 run_folder.MODEL_CARD, run_folder.METRICS, run_folder.LOSS_CHART])
    shutil.rmtree(staging, ignore_errors=True)
    # Only the trained adapter: a preference run may also hold TRL's frozen reference copy ("ref").
    options = {"safe_serialization": True, "selected_adapters": [model.active_adapter], "state_dict": state_dict}
    start = adapter_init.start_of(model)
    if start is not None and start.corda_start is not None:  # a plain LoRA on the original base, not the residual
        adapter_init.save_as_plain_lora(model, staging, start.corda_start, **options)
    else:
        model.save_pretrained(staging, **options)
    tokenizer.save_pretrained(staging)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    os.replace(staging, adapter_dir)
    run_folder.write_atomic(run_dir / run_folder.RECIPE, dump_recipe(recipe))
    chart_warning = write_loss_chart(metrics.loss_history, run_dir / run_folder.LOSS_CHART,
                                     title=recipe.name if run_dir.name == recipe.name else f"{recipe.name}: {run_dir.name}")
    if chart_warning and notes is not None:
        notes.append(chart_warning)
    card = model_card(recipe, metrics, adapter_dir, pad_token_id=tokenizer.pad_token_id,
                      loss_chart=run_folder.LOSS_CHART if chart_warning is None else None)
    run_folder.write_atomic(run_dir / run_folder.MODEL_CARD, card)
    run_folder.write_json_atomic(run_dir / run_folder.METRICS, metrics.as_json())
    run_folder.update_marker(run_dir, status="finished")
    return adapter_dir


def environment_info() -> dict[str, Any]:
    """Library versions and hardware, for metrics.json."""
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("lorafit", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    hardware: dict[str, Any] = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        hardware["gpu"] = torch.cuda.get_device_name(0)
        hardware["gpu_count"] = torch.cuda.device_count()
    return {"versions": versions, "hardware": hardware}


def git_commit_of(path: Path) -> str | None:
    """The commit of the git repository holding `path`, if any (marked -dirty when it has local changes)."""
    folder = path if path.is_dir() else path.parent
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=5)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _method_row(method: str, adapter: AdapterSection, metrics: TrainMetrics) -> str:
    """The model card's method cell: the rank(s), alpha and dropout as the method uses them."""
    if adapter.method == "ia3":  # no rank: one learned scale per channel
        return method
    if adapter.method == "prefix":
        return f"{method}, {adapter.num_virtual_tokens} virtual tokens"
    if adapter.method != "adalora":
        return f"{method}, r={adapter.r}, alpha={adapter.alpha:g}, dropout={adapter.dropout}"
    ranks = metrics.adapter_ranks
    pruned = (f"ranks pruned from init_r {adapter.init_r} to {sum(ranks.values())} in all (target_r "
              f"{adapter.target_r} x {len(ranks)} modules; per module {min(ranks.values())}-{max(ranks.values())})"
              if ranks else f"init_r={adapter.init_r} (not pruned yet)")
    return f"AdaLoRA, {pruned}, alpha={adapter.alpha:g}, dropout={adapter.dropout}"


# What the adapter folder means for the inits that change it (lorafit/adapter_init.py).
_INIT_NOTES = {
    "loftq": "LoftQ: the adapter started as a correction of the 4-bit quantization error, so it belongs on the 4-bit "
             "base (load the base with the recipe's quantization); `lorafit merge` folds it into the de-quantized "
             "4-bit weights, never the original ones",
    "eva": "EVA: A started from the principal directions of the first training batches' activations; the per-layer "
           "ranks it chose are in adapter_config.json (rank_pattern)",
    "corda": "CorDA (ipm) from the first training batches; trained on a residual base, saved converted to a plain "
             "LoRA of rank {r2} (recipe r {r}) on the original base",
}


def model_card(recipe: Recipe, metrics: TrainMetrics, adapter_dir: Path, *,
               pad_token_id: int | None = None, loss_chart: str | None = None) -> str:
    """A README.md saying what was trained, on what, how well, and how to load it.

    `pad_token_id` (the tokenizer's) goes into a classifier's loading code: decoder classifiers need it.
    `loss_chart` is the loss curve image next to the card, shown under the training table.
    """
    base = metrics.base_model
    adapter = recipe.adapter
    method = {"adalora": "AdaLoRA", "ia3": "IA3", "prefix": "prefix-tuning"}.get(adapter.method) or (
        "DoRA" if adapter.use_dora else "rsLoRA" if adapter.use_rslora else "LoRA")
    quant = f"QLoRA ({recipe.quantization.bits}-bit {recipe.quantization.quant_type})" if recipe.quantization else "none"
    final, eval_loss = metrics.train_loss_final, metrics.eval_loss
    labels = recipe.data.labels  # a classifier's classes: the recipe allows them for such a task only
    what = f"{'An' if method[0] in 'AEIOU' else 'A'} {method} adapter for `{recipe.model.path}`"
    what += tasks.task_of(recipe).card_description(recipe)
    lines = [
        f"# {recipe.name}",
        "",
        f"{what}, trained with [lorafit](https://pypi.org/project/lorafit/).",
        "",
        "## Training",
        "",
        "| | |", "|---|---|",
        f"| base model | `{recipe.model.path}` (loaded from `{base}`) |",
        f"| method | {_method_row(method, adapter, metrics)} |",
        f"| target modules | {', '.join(metrics.target_modules) or adapter.target_modules} |",
        f"| quantization | {quant} |",
        *([f"| initialisation | {_INIT_NOTES[adapter.init].format(r=adapter.r, r2=2 * adapter.r)} |"]
          if adapter.init in _INIT_NOTES else []),
        f"| trainable parameters | {metrics.trainable_params:,} of {metrics.total_params:,} |",
        f"| data | {', '.join(metrics.data_fingerprint)} ({metrics.train_examples} examples) |",
        f"| steps | {metrics.global_step} (batch {recipe.training.batch_size} x accum "
        f"{recipe.training.grad_accum}, lr {recipe.training.learning_rate:g}, {recipe.training.scheduler}) |",
        f"| precision | {metrics.precision} |",
        f"| final train loss | {final:.4f} |" if isinstance(final, float) else "| final train loss | n/a |",
        f"| eval loss | {eval_loss:.4f} |" if isinstance(eval_loss, float) else "| eval loss | n/a |",
        *([_percent_row("eval accuracy", metrics.eval_accuracy),
           _percent_row("eval macro-F1", metrics.eval_f1)] if labels else []),
        f"| wall time | {metrics.train_seconds:.0f} s |",
        "",
        *([f"![train loss, eval loss and learning rate against step]({loss_chart})", ""] if loss_chart else []),
        f"The full recipe is in `{run_folder.RECIPE}` next to this file; `lorafit train {run_folder.RECIPE}` "
        "reproduces the run.",
        "",
        "## Use it",
        "",
    ]
    if labels:
        return "\n".join([*lines, *_classifier_usage(recipe, labels, base, adapter_dir, pad_token_id)])
    lines += [
        "With PEFT:",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{adapter_dir}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{adapter_dir}")  # carries the training chat template',
        'messages = [{"role": "user", "content": "..."}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)",
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))",
        "```",
        "",
        f"As a full model for plain transformers: `lorafit merge {adapter_dir} --out merged/`, then "
        '`AutoModelForCausalLM.from_pretrained("merged/")`.',
        "",
        # vLLM's LoRA rules checked first: the snippet only for an adapter vLLM loads (lorafit/vllm_rules.py)
        *vllm_rules.lora_snippet(base, recipe.name, str(adapter_dir), _vllm_check(adapter_dir)),
    ]
    return "\n".join(lines)


def _vllm_check(adapter_dir: Path) -> vllm_rules.VllmCheck:
    import json

    path = adapter_dir / "adapter_config.json"
    return vllm_rules.check_adapter(json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {})


def _percent_row(name: str, value: Any) -> str:
    return f"| {name} | {100 * value:.1f}% |" if isinstance(value, float) else f"| {name} | n/a |"


def _classifier_usage(recipe: Recipe, labels: list[str], base: str, adapter_dir: Path,
                      pad_token_id: int | None) -> list[str]:
    """Loading code for a sequence-classification adapter.

    PEFT's AutoPeftModelForSequenceClassification would load the base with its own config (2 classes, no pad token
    on Llama-style models), so the code gives the classes and the pad id to the base explicitly.
    """
    pad = f", pad_token_id={pad_token_id}" if pad_token_id is not None else ""
    return [
        "With PEFT (the adapter holds the LoRA weights and the trained classifier head):",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f"labels = {list(labels)!r}",
        "base = AutoModelForSequenceClassification.from_pretrained(",
        f'    "{base}", num_labels=len(labels), id2label=dict(enumerate(labels)),',
        f"    label2id={{name: i for i, name in enumerate(labels)}}{pad},",
        ")",
        f'model = PeftModel.from_pretrained(base, "{adapter_dir}").eval()',
        f'tokenizer = AutoTokenizer.from_pretrained("{adapter_dir}")',
        'inputs = tokenizer("...", return_tensors="pt")',
        "print(labels[model(**inputs).logits.argmax(-1).item()])",
        "```",
        "",
        f"As a full model for plain transformers: `lorafit merge {adapter_dir} --out merged/`, then "
        '`AutoModelForSequenceClassification.from_pretrained("merged/")` (classes and pad id are in its config).',
        "",
    ]
