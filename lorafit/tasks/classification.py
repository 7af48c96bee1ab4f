"""Task sequence-classification: learn to predict a label column from a text column; the classifier head is trained.

Rows are the text (and optional text_pair) and label columns, read and tokenized by lorafit/data.py without a prompt
template; the plain transformers Trainer (with lorafit's guards) trains the adapter and the new head. Eval reports
loss (mean cross-entropy over the classes), accuracy, macro-F1, per-class counts and each model's predicted label.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.errors import LorafitError
from lorafit.tasks.base import Task, last_logged

if TYPE_CHECKING:
    from lorafit import adapters, data
    from lorafit.evaluate import EvalInputs, EvalPlan, Scores
    from lorafit.recipe import Recipe

CLASSIFICATION = "sequence-classification"


class SequenceClassification(Task):
    """A classifier head over data.labels on a (usually decoder) model, with the adapter."""

    name = CLASSIFICATION
    summary = ("sequence-classification: learn to predict a label column from a text column; the classifier head is "
               "trained fully.")
    peft_task_type = "SEQ_CLS"
    classifier = True
    generates = False
    sections = frozenset({"data.labels"})

    def check_recipe(self, recipe: Recipe) -> None:
        from lorafit.recipe import TemplateSection

        # Settings that would silently do nothing for a classifier are refused, each naming its key.
        section = recipe.data
        if section.packing:
            raise ValueError("data.packing: sequence-classification has one label per row and cannot pack rows; "
                             "set packing: false (data.group_by_length batches similar lengths for speed)")
        if section.format != "auto":
            raise ValueError("data.format: only applies to task: causal-lm; sequence-classification reads the text "
                             "and label columns (rename yours with data.fields)")
        unknown = sorted(set(section.fields) - {"text", "text_pair", "label"})
        if unknown:
            raise ValueError(f"data.fields: {', '.join(unknown)} is not a sequence-classification column; "
                             "map text, text_pair (optional) and label to your column names")
        changed = [key for key in TemplateSection.model_fields
                   if getattr(recipe.template, key) != getattr(TemplateSection(), key)]
        if changed:
            raise ValueError(f"{', '.join(f'template.{key}' for key in changed)}: sequence-classification feeds the text column to the model as "
                             "it is, without a prompt template; remove the template section")

    def prepare_data(self, recipe: Recipe, tokenizer, *, allow_code: bool = False):
        from lorafit import data

        return data.prepare_classification_data(recipe, tokenizer)

    def trainer_classes(self, recipe: Recipe) -> tuple[type, type, dict[str, Any]]:
        from transformers import TrainingArguments

        from lorafit import training_loop

        return TrainingArguments, training_loop.ClassifierTrainer, {}

    def trainer_options(self, recipe: Recipe, tokenizer, prepared) -> dict[str, Any]:
        from transformers import DataCollatorWithPadding

        # Rows are padded per batch; each evaluation also logs eval_accuracy and eval_f1; AdaLoRA's schedule
        # (lorafit/adalora.py) is inert for the other methods.
        return {"data_collator": DataCollatorWithPadding(tokenizer), "compute_metrics": _classification_metrics,
                "adapter": recipe.adapter}

    def metric_fields(self, recipe: Recipe, history: list[dict], report) -> dict[str, Any]:
        # One label per row, not tokens: no supervised token share.
        return {"supervised_token_share": None, "labels": list(recipe.data.labels),
                "label_counts": report.label_counts, "eval_accuracy": last_logged(history, "eval_accuracy"),
                "eval_f1": last_logged(history, "eval_f1")}

    def eval_labels(self, recipe: Recipe, trained: list, config, notes: list[str]) -> list[str]:
        labels = _class_labels(recipe, trained)
        notes.append(_base_head_note(config, labels, recipe.training.seed))
        return labels

    def eval_plan(self, inputs: EvalInputs) -> EvalPlan:
        from lorafit.evaluate import EvalPlan

        if inputs.max_new_tokens is not None:
            inputs.notes.append("--max-new-tokens does not apply to a classifier (nothing is generated); ignored")
        examples, described = _labelled_examples(inputs.recipe, inputs.labels, inputs.data_file, inputs.samples,
                                                 inputs.tokenizer, inputs.notes)

        def measure(model, name, adapter):
            return _classify(model, name, adapter, examples, inputs.labels, inputs.tokenizer, inputs.batch_size)

        def sample_rows(outputs: dict[str, list]) -> list[dict[str, Any]]:
            labels = inputs.labels
            return [{"text": e.text, **({"text_pair": e.text_pair} if e.text_pair is not None else {}),
                     "reference": labels[e.label], **{n: labels[ids[i]] for n, ids in outputs.items()}}
                    for i, e in enumerate(examples)]

        return EvalPlan(examples, described, template="none", max_new_tokens=0, measure=measure,
                        sample_rows=sample_rows)

    def card_description(self, recipe: Recipe) -> str:
        labels = recipe.data.labels or []
        return f" with a classifier head over {len(labels)} classes ({', '.join(labels)})"


TASK = SequenceClassification()


def _classification_metrics(prediction) -> dict[str, float]:
    """The Trainer's compute_metrics for a classifier: accuracy and macro-F1 of the argmax class."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return classification_scores(logits.argmax(-1).tolist(), prediction.label_ids.tolist())




def _labelled_examples(recipe: Recipe, labels: list[str], data_file: str | Path | None, samples: int | None,
                       tokenizer, notes: list[str]) -> tuple[list[data.LabelledText], str]:
    """The labelled eval rows, read and tokenized as training read them, and where they came from."""
    from lorafit import data

    rows = data.eval_rows(recipe, data_file, labels=labels, limit=samples)
    examples, empty = data.encode_labelled(rows.labelled, recipe.data, tokenizer)
    if empty:
        notes.append(f"skipped {empty} row(s) with an empty or missing text")
    if not examples:
        raise LorafitError("no usable eval rows", where=rows.described, hint="rows need a text and a label")
    return examples, rows.described


def classification_scores(predicted: list[int], references: list[int]) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean F1 over the classes that occur in the references or the predictions)."""
    pairs = list(zip(predicted, references, strict=True))
    f1 = []
    for label in sorted(set(predicted) | set(references)):
        true_positive = sum(p == r == label for p, r in pairs)
        wrong = sum((p == label) != (r == label) for p, r in pairs)  # false positives + false negatives
        f1.append(2 * true_positive / (2 * true_positive + wrong))
    return {"accuracy": sum(p == r for p, r in pairs) / len(pairs) if pairs else 0.0,
            "f1": sum(f1) / len(f1) if f1 else 0.0}


def _class_labels(recipe: Recipe, trained: list[adapters.TrainedAdapter]) -> list[str]:
    """The classes in head order: the recipe's data.labels, else the ones the adapters' runs recorded, else the data's.

    Every adapter must have been trained on the same classes in the same order: a head's outputs mean nothing
    under other names.
    """
    from lorafit import data

    recorded = [(a, list(a.recipe.data.labels)) for a in trained
                if a.recipe is not None and a.recipe.task == CLASSIFICATION and a.recipe.data.labels]
    labels = list(recipe.data.labels or (recorded[0][1] if recorded else data.class_labels(recipe)))
    for adapter, own in recorded:
        if own != labels:
            raise LorafitError(f"was trained on the classes {own}, but this evaluation uses {labels}",
                               where=f"adapter: {adapter.path}", hint="evaluate with the run's own recipe.yaml, or "
                               "list the same classes in the same order in data.labels")
    return labels


def _base_head_note(config, labels: list[str], seed: int) -> str:
    """What 'base' means for a classifier: usually a head that has never been trained."""
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in architectures) and config.num_labels == len(labels):
        return ("base: the checkpoint's own classifier head, not trained on these classes by lorafit; adapters "
                "replace it with the head they trained")
    return (f"base: a newly initialised classifier head (seed {seed}, the one training started from): it was never "
            "trained, so expect chance-level scores, give or take what a random projection happens to separate; "
            "the adapters carry the heads they trained")


def _classify(model, name: str, adapter: adapters.TrainedAdapter | None, examples: list[data.LabelledText],
              labels: list[str], tokenizer, batch_size: int) -> tuple[Scores, list[int]]:
    """One classifier's mean cross-entropy, accuracy, macro-F1 and per-class counts; also its predicted class ids."""
    import torch
    import torch.nn.functional as F

    started = time.perf_counter()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loss_sum, predicted = 0.0, []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        width = max(len(e.input_ids) for e in batch)
        # Right padding, as in training; decoder classifiers read the last token that is not padding.
        inputs = {
            "input_ids": torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch], device=device),
            "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch],
                                           device=device),
        }
        if any(e.token_type_ids for e in batch):
            inputs["token_type_ids"] = torch.tensor(
                [(e.token_type_ids or [0] * len(e.input_ids)) + [0] * (width - len(e.input_ids)) for e in batch],
                device=device)
        with torch.no_grad():
            logits = model(**inputs).logits.float()
        target = torch.tensor([e.label for e in batch], device=device)
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        predicted += logits.argmax(-1).tolist()
    references = [e.label for e in examples]
    per_class = {label: {"rows": references.count(i), "predicted": predicted.count(i),
                         "correct": sum(p == r == i for p, r in zip(predicted, references, strict=True))}
                 for i, label in enumerate(labels)}
    from lorafit.evaluate import Scores

    return Scores(
        name=name, adapter=str(adapter.path) if adapter else None, loss=loss_sum / len(examples), perplexity=None,
        exact_match=None, normalized_exact_match=None, rouge_l=None, examples=len(examples), completion_tokens=None,
        seconds=time.perf_counter() - started, **classification_scores(predicted, references), per_class=per_class,
    ), predicted


