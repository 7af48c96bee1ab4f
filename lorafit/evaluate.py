"""`lorafit eval`: did the adapter help, in numbers — base vs each adapter on the same eval rows.

One base load; the adapters are attached side by side with PEFT and switched with `set_adapter`, the base
is measured under `disable_adapter()`. Every model gets the same rows, rendered with the recipe's template
exactly as in training: loss / perplexity on the completion tokens, then greedy generation scored against
the references (exact match, normalised exact match, ROUGE-L F1).

Which rows and which scores is the task's call (`Task.eval_plan`, lorafit/tasks/): this module holds the shared
flow and the causal-LM plan the other tasks build on (classification measures its head instead; the preference
tasks add how strongly each model prefers the chosen answers, lorafit/preference_eval.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit import adapters, benchmark, data, models, run_folder, tasks
from lorafit.errors import LorafitError
from lorafit.recipe import Recipe
from lorafit.rewards import normalize_answer, rouge_l
from lorafit.templates import apply_template

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from lorafit.preference_eval import PreferenceScores
    from lorafit.templates import Messages



@dataclass
class Scores:
    """One model's metrics on the eval rows."""

    name: str
    adapter: str | None
    loss: float | None
    perplexity: float | None
    exact_match: float | None
    normalized_exact_match: float | None
    rouge_l: float | None
    examples: int
    completion_tokens: int | None  # None for sequence classification (one label per row, no completion)
    seconds: float
    accuracy: float | None = None  # sequence classification only, like f1 and per_class
    f1: float | None = None  # macro-F1
    per_class: dict[str, dict[str, int]] | None = None  # class -> rows, predicted, correct
    preference: PreferenceScores | None = None  # task dpo / kto / orpo: how it prefers the chosen answers
    rewards: dict[str, float] | None = None  # task grpo / rloo: each reward's mean on the greedy answers, and `reward`


@dataclass
class EvalResult:
    """Base and adapter scores side by side, plus where the report and the sample generations are."""

    recipe: str
    base: str
    data: str
    template: str
    examples: int
    max_new_tokens: int
    scores: list[Scores]
    report_path: Path
    samples_path: Path
    samples: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    task: str = tasks.DEFAULT
    labels: list[str] | None = None  # sequence classification: the class names, in id order
    chart_path: Path | None = None  # scores.png next to report.json: base vs adapters (None if it could not be drawn)
    benchmarks: list[benchmark.BenchmarkRow] = field(default_factory=list)  # --benchmark: lm-eval's tasks, base first


@dataclass
class _Example:
    prompt: str
    prompt_ids: list[int]
    reference: str
    input_ids: list[int]  # the whole conversation, for the loss
    labels: list[int]


@dataclass
class EvalInputs:
    """What a task's eval plan is built from: the recipe, its tokenizer and the eval command's options."""

    recipe: Recipe
    tokenizer: PreTrainedTokenizerBase
    data_file: Path | None  # --data, else the recipe's eval rows
    samples: int | None  # --samples: the first N rows only
    max_new_tokens: int | None  # --max-new-tokens, None = enough for the longest reference
    batch_size: int
    names: list[str]  # the adapters' labels, in --adapter order
    saved_tokenizers: list  # the tokenizer each adapter folder holds (None where it holds none)
    labels: list[str] | None  # a classifier's classes (Task.eval_labels)
    notes: list[str]  # the report's notes, appended to
    allow_code: bool = False  # --allow-code: the recipe's Python (custom rewards) may run


@dataclass
class EvalPlan:
    """The eval rows and how one model is measured on them; run_eval runs `measure` for the base, then each adapter."""

    examples: list
    described: str  # where the rows came from
    template: str  # the template they were rendered with ("none": not rendered)
    max_new_tokens: int  # 0 when nothing is generated
    measure: Callable[[Any, str, Any], tuple[Scores, list]]  # (model, name, adapter or None) -> scores, outputs
    sample_rows: Callable[[dict[str, list]], list[dict[str, Any]]]  # every model's outputs -> samples.jsonl rows


def run_eval(recipe: Recipe, adapter_dirs: list[str | Path], *, data_file: str | Path | None = None,
             samples: int | None = None, max_new_tokens: int | None = None, batch_size: int = 8,
             out_dir: str | Path | None = None, allow_code: bool = False, benchmarks: list[str] | None = None,
             limit: int | None = None) -> EvalResult:
    """Score the recipe's base model and each adapter on the eval rows; writes report.json and samples.jsonl.

    `allow_code` is --allow-code: the recipe's Python (custom rewards) may run. `benchmarks` (--benchmark) are
    lm-evaluation-harness tasks run on the base and each adapter after the eval rows, each on its first `limit`
    documents (lorafit/benchmark.py)."""
    started = time.perf_counter()
    notes: list[str] = []
    if not adapter_dirs:
        raise LorafitError("no adapter given", where="--adapter", hint="e.g. --adapter runs/<name>/adapter")
    for option, value in (("--samples", samples), ("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size)):
        if value is not None and value <= 0:
            raise LorafitError(f"must be a positive number, got {value}", where=option)
    trained = [adapters.read_trained_adapter(path) for path in adapter_dirs]
    kinds = sorted({str(t.config.get("peft_type")).lower().replace("_", "-") for t in trained})
    if len(kinds) > 1:  # all adapters sit beside one base in one PeftModel, which holds one method only
        raise LorafitError(f"the adapters are of different methods ({' and '.join(kinds)}), which PEFT cannot load "
                           "beside one base", where="--adapter",
                           hint="run lorafit eval once per method; each report scores the base beside its adapters")
    names = _adapter_names(trained)
    if limit is not None and not benchmarks:
        raise LorafitError("applies to --benchmark only", where="--limit", hint="--samples limits the eval rows")
    bench = benchmark.check_benchmarks(benchmarks, limit) if benchmarks else None  # before any model loads
    out_dir = Path(out_dir).expanduser() if out_dir else recipe.run_dir / run_folder.EVAL
    data_file = Path(data_file).expanduser() if data_file is not None else None
    # Before any model loads: the report replaces only an earlier report of lorafit's, never a file of the user's
    # (such as the --data file itself when it sits in the same folder).
    run_folder.check_output_folder(out_dir, "eval", overwrite=True, where=f"--out {out_dir}",
                                   names=[run_folder.EVAL_REPORT, run_folder.EVAL_SAMPLES, run_folder.EVAL_CHART])

    # 1. Tokenizer + template as in training, and every adapter checked against the base (meta device).
    precision, warning = models.choose_precision(recipe.training.precision)
    if warning:
        notes.append(f"warning: {warning}")
    source = models.resolve_model_source(recipe.model)
    tokenizer = models.load_tokenizer(recipe, source)
    config = models.load_config(recipe.model, source)
    task = tasks.task_of(recipe)
    labels = task.eval_labels(recipe, trained, config, notes)
    meta_model, _ = models.build_meta_model(config, trust_remote_code=recipe.model.trust_remote_code, labels=labels)
    saved_tokenizers = [adapters.load_adapter_tokenizer(a, trust_remote_code=recipe.model.trust_remote_code)
                        for a in trained]
    for adapter, name, own in zip(trained, names, saved_tokenizers, strict=True):
        tasks.check_adapter_task(adapter, recipe)
        adapters.check_adapter_fits(adapter, meta_model, config, source=source, base_setting="model.path",
                                    tokenizer=own)
        if adapter.recipe is not None and adapter.recipe.model.path != recipe.model.path:
            notes.append(f"warning: {name} was trained on {adapter.recipe.model.path}, "
                         f"evaluated on {recipe.model.path}")
        if adapter.quantized != (recipe.quantization is not None):
            notes.append(f"warning: {name} was trained {'with' if adapter.quantized else 'without'} 4/8-bit "
                         f"quantization, evaluated {'with' if recipe.quantization else 'without'} it (this recipe)")
    del meta_model

    # 2. The eval rows, read and encoded as training read them, and how the task measures a model on them.
    plan = task.eval_plan(EvalInputs(recipe, tokenizer, data_file, samples, max_new_tokens, batch_size, names,
                                     saved_tokenizers, labels, notes, allow_code))

    # 3. One base, the adapters beside it; every model measured on the same rows (the base first).
    model = _base_with_adapters(recipe, labels, source, precision, tokenizer, trained, names)
    scores: list[Scores] = []
    outputs: dict[str, list] = {}
    for name, adapter in [("base", None), *zip(names, trained, strict=True)]:
        if adapter is None:
            context = model.disable_adapter()  # the same weights in memory; a classifier's head goes back to the base's
        else:
            model.set_adapter(name)
            context = contextlib.nullcontext()
        with context:
            score, outputs[name] = plan.measure(model, name, adapter)
        scores.append(score)
    benchmark_rows = []
    if bench is not None:  # the harness loads each model itself: this one goes first
        del model
        benchmark_rows = benchmark.run_benchmarks(bench, recipe, source, precision, trained, names, batch_size)
        notes.extend(benchmark.regressions(benchmark_rows))

    # 4. The report, and each row with every model's answer (or predicted label).
    result = EvalResult(
        recipe=recipe.name, base=source, data=plan.described, template=plan.template, examples=len(plan.examples),
        max_new_tokens=plan.max_new_tokens, scores=scores, report_path=out_dir / run_folder.EVAL_REPORT,
        samples_path=out_dir / run_folder.EVAL_SAMPLES, samples=plan.sample_rows(outputs), notes=notes,
        task=recipe.task, labels=labels, benchmarks=benchmark_rows,
    )
    result.seconds = time.perf_counter() - started
    _write(result)
    return result


def _base_with_adapters(recipe: Recipe, labels: list[str] | None, source: str, precision, tokenizer,
                        trained: list[adapters.TrainedAdapter], names: list[str]):
    """One base model (with a classifier head over `labels`, seeded as in training), every adapter loaded beside it."""
    from peft import PeftModel
    from transformers import set_seed

    if labels is not None:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"labels": labels})})
    set_seed(recipe.training.seed)  # a new classifier head starts from the same random weights as in training
    base = models.load_base_model(recipe, source, precision, pad_token_id=tokenizer.pad_token_id)
    if recipe.quantization is None and precision.device != "cpu":
        base.to(precision.device)  # quantized bases are placed when loaded; in training the Trainer moves the rest
    if labels is None:
        base.config.use_cache = True  # training turns the KV cache off; generation needs it
    model = PeftModel.from_pretrained(base, str(trained[0].path), adapter_name=names[0])
    for adapter, name in zip(trained[1:], names[1:], strict=True):
        model.load_adapter(str(adapter.path), adapter_name=name)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------
# Inputs


def _adapter_names(trained: list[adapters.TrainedAdapter]) -> list[str]:
    """Short, unique labels: the run folder's name for runs/<name>/adapter, else the folder's own name."""
    names: list[str] = []
    for adapter in trained:
        folder = adapter.path.resolve()
        label = folder.parent.name if folder.name == "adapter" and adapter.recipe is not None else folder.name
        label = re.sub(r"[^A-Za-z0-9_-]", "_", label) or "adapter"
        if label == "base" or label in names:  # "base" names the model without adapters
            label = f"{label}_{len(names) + 1}"
        names.append(label)
    return names


def causal_plan(inputs: EvalInputs) -> EvalPlan:
    """The eval rows as conversations (or text documents) rendered with the recipe's template, scored by completion
    loss and, where there is a prompt to answer, greedy generation against the reference answers."""
    rows = data.eval_rows(inputs.recipe, inputs.data_file, limit=inputs.samples)  # where eval rows come from
    return conversation_plan(inputs, rows.conversations, rows.described, dropped=rows.dropped)


def conversation_plan(inputs: EvalInputs, conversations: list[Messages | str], described: str, *,
                      dropped: int = 0) -> EvalPlan:
    """`causal_plan` over conversations already read (a task that reads its own rows hands over their answers)."""
    recipe, tokenizer, notes = inputs.recipe, inputs.tokenizer, inputs.notes
    chat = any(not isinstance(item, str) for item in conversations)
    template = apply_template(recipe.template, tokenizer) if chat else "none"
    for name, own in zip(inputs.names, inputs.saved_tokenizers, strict=True):
        if chat and own is not None and own.chat_template and own.chat_template != tokenizer.chat_template:
            notes.append(f"warning: {name} was trained with a different chat template than this recipe renders")
    examples, unanswered = _examples(conversations, recipe, tokenizer)
    dropped += unanswered
    if dropped:
        notes.append(f"skipped {dropped} row(s) with no assistant answer to compare against")
    if not examples:
        raise LorafitError("no usable eval rows", where=described, hint="rows need a final assistant turn / completion")
    max_new_tokens = inputs.max_new_tokens
    if not chat:  # format text: documents, no prompt to answer, so nothing is generated
        notes.append("format text: no prompt/reference split, so only loss and perplexity are measured")
        max_new_tokens = 0
    elif max_new_tokens is None:  # enough for the longest reference; greedy text past it cannot raise exact match
        max_new_tokens = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"])
                             for e in examples) + 16

    def measure(model, name: str, adapter):
        return _score(model, name, adapter, examples, tokenizer, inputs.batch_size, max_new_tokens,
                      _eos_ids(tokenizer, model.get_base_model()))

    def sample_rows(outputs: dict[str, list]) -> list[dict[str, Any]]:
        return [{"prompt": e.prompt, "reference": e.reference, **{n: outputs[n][i] for n in outputs if outputs[n]}}
                for i, e in enumerate(examples)]

    return EvalPlan(examples, described, template, max_new_tokens, measure, sample_rows)


def _examples(conversations: list[Messages | str], recipe: Recipe,
              tokenizer: PreTrainedTokenizerBase) -> tuple[list[_Example], int]:
    """Each row as a prompt (everything before the last answer), its reference, and loss labels."""
    from lorafit.templates import encode_messages, encode_text, render

    max_length = recipe.data.max_length
    examples, dropped = [], 0
    for messages in conversations:
        if isinstance(messages, str):  # format text: a document, scored by its loss only
            encoded = encode_text(tokenizer, messages)
            examples.append(_Example(messages, [], "", encoded.input_ids[:max_length], encoded.labels[:max_length]))
            continue
        if not messages or messages[-1]["role"] != "assistant" or len(messages) < 2:
            dropped += 1
            continue
        prompt = render(tokenizer, messages[:-1], add_generation_prompt=True)
        # Loss on the completion tokens, whatever template.train_on says: that is what "did it learn" means.
        encoded = encode_messages(tokenizer, messages, train_on="completions")
        examples.append(_Example(
            prompt=prompt, prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_length:],
            reference=messages[-1]["content"], input_ids=encoded.input_ids[:max_length],
            labels=encoded.labels[:max_length],
        ))
    return examples, dropped


def _eos_ids(tokenizer: PreTrainedTokenizerBase, model) -> list[int]:
    """Stop on the template's end-of-turn token and on whatever the model's generation config calls eos."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured] if configured is not None else []
    return list(dict.fromkeys(ids))


# ----------------------------------------------------------------------------------------------------
# Measuring


def _score(model, name: str, adapter: adapters.TrainedAdapter | None, examples: list[_Example], tokenizer,
           batch_size: int, max_new_tokens: int, eos_ids: list[int]) -> tuple[Scores, list[str]]:
    """One model's loss on the completions and, when max_new_tokens > 0, its greedy answers and their scores."""
    started = time.perf_counter()
    loss_sum, tokens = _completion_loss(model, examples, tokenizer, batch_size)
    loss = loss_sum / tokens if tokens else None
    predictions = _generate(model, examples, tokenizer, batch_size, max_new_tokens, eos_ids) if max_new_tokens else []
    generation = _generation_scores(predictions, [e.reference for e in examples]) if predictions else {
        "exact_match": None, "normalized_exact_match": None, "rouge_l": None}
    return Scores(
        name=name, adapter=str(adapter.path) if adapter else None, loss=loss,
        perplexity=math.exp(min(loss, 50.0)) if loss is not None else None,  # capped: exp overflows past ~700
        **generation, examples=len(examples), completion_tokens=tokens, seconds=time.perf_counter() - started,
    ), predictions


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _completion_loss(model, examples: list[_Example], tokenizer, batch_size: int) -> tuple[float, int]:
    """Summed next-token loss over the completion tokens, and how many there were."""
    import torch

    from lorafit.loss import summed_next_token_loss

    total, count = 0.0, 0
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch], device=device)
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch], device=device)
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch], device=device)
        batch_total, batch_count = summed_next_token_loss(model, ids, mask, labels)
        total += batch_total
        count += batch_count
    return total, count


def _generate(model, examples: list[_Example], tokenizer, batch_size: int, max_new_tokens: int,
              eos_ids: list[int]) -> list[str]:
    """Greedy completions of each prompt (left-padded batches), decoded without special tokens."""
    import torch
    from transformers import GenerationConfig

    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                              pad_token_id=pad, use_cache=True)
    outputs = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        width = max(len(e.prompt_ids) for e in batch)
        ids = torch.tensor([[pad] * (width - len(e.prompt_ids)) + e.prompt_ids for e in batch], device=device)
        mask = torch.tensor([[0] * (width - len(e.prompt_ids)) + [1] * len(e.prompt_ids) for e in batch], device=device)
        if _prefix_tuning_active(model):
            generated = _greedy_by_forward(model, ids, mask, max_new_tokens, eos_ids, pad)
        else:
            with torch.no_grad():
                generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in generated[:, width:].tolist():
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return outputs


def _prefix_tuning_active(model) -> bool:
    """Whether the model generates through an active prefix-tuning adapter (not under disable_adapter)."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.peft_type == "PREFIX_TUNING" and model.has_active_enabled_adapter)


def _greedy_by_forward(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos_ids: list[int],
                       pad: int) -> torch.Tensor:
    """Greedy decoding with one full forward pass per new token, for prefix-tuning adapters.

    PEFT's generate() loses a prefix adapter's virtual tokens with this transformers version (its tokens equal the
    base model's at batch size 1), while forward() applies them exactly as in training, where the loss is right. So
    each token is the argmax of forward(); position ids follow the attention mask, so left padding does not shift a
    row's positions and the answers do not depend on the batch size. Costs O(n^2) in the answer length, which is
    short in an eval.
    """
    import torch

    stop = torch.tensor(eos_ids, device=ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        token = torch.where(done, torch.full_like(done, pad, dtype=ids.dtype), logits.argmax(-1))
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, (~done).to(mask.dtype)[:, None]], dim=1)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
    return ids


def _generation_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    n = len(references)
    return {
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / n,
        "normalized_exact_match": sum(normalize_answer(p) == normalize_answer(r)
                                      for p, r in zip(predictions, references, strict=True)) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True)) / n,
    }


# ----------------------------------------------------------------------------------------------------
# The report


def _write(result: EvalResult) -> None:
    """Publish report.json, samples.jsonl and the chart together (staged, then moved into place with the eval
    marker): an interrupted eval leaves no half-written report."""
    from lorafit.plots import write_eval_chart

    out_dir = result.report_path.parent
    # eval replaces its own earlier report without asking (overwrite=True), but never another kind of output or a
    # file of the user's that appeared while the models were scored.
    with run_folder.staged_output(out_dir, "eval", where=f"--out {out_dir}", overwrite=True) as staging:
        scores = result.scores  # each task fills its own scores; the chart leaves out those no model has
        warning = write_eval_chart(
            {s.name: s.loss for s in scores},
            {"exact match": [s.exact_match for s in scores],
             "norm. exact match": [s.normalized_exact_match for s in scores], "ROUGE-L": [s.rouge_l for s in scores],
             "accuracy": [s.accuracy for s in scores], "macro-F1": [s.f1 for s in scores],
             **{f"{row.task} {row.metric}": [m.value for m in row.models] for row in result.benchmarks
                if all(m.value is None or 0 <= m.value <= 1 for m in row.models)}},
            staging / run_folder.EVAL_CHART, title=result.recipe, rows=result.examples)
        if warning:
            result.notes.append(warning)
        else:
            result.chart_path = out_dir / run_folder.EVAL_CHART
        report = {key: value for key, value in asdict(result).items() if key != "samples"}
        run_folder.write_json_atomic(staging / result.report_path.name, report)
        lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in result.samples]
        run_folder.write_atomic(staging / result.samples_path.name, "".join(lines))
