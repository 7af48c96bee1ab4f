"""Preference tuning (task dpo / kto / orpo) on tiny models: the data lint, the reference model, that training moves
the adapter towards the chosen answers, resume, eval, merge and the recipe's refusals."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from cli_helpers import adapter_weights
from rich.console import Console
from run_signals import signal_at_step

from lorafit.errors import Interrupted, LorafitError
from lorafit.recipe import validate_recipe
from lorafit.train import run_train

QUIET = Console(quiet=True)


def write_pairs(path: Path, n: int = 48, *, style: str = "strings") -> Path:
    """Colour -> thing pairs: the right thing chosen, the next colour's thing rejected, in one of the accepted styles."""
    from tiny_models import TOY_PAIRS

    colours = list(TOY_PAIRS)
    rows = []
    for i in range(n):
        colour, wrong = colours[i % len(colours)], TOY_PAIRS[colours[(i + 1) % len(colours)]]
        right = TOY_PAIRS[colour]
        if style == "strings":
            rows.append({"prompt": colour, "chosen": right, "rejected": wrong})
        elif style == "messages":
            rows.append({"prompt": [{"role": "user", "content": colour}],
                         "chosen": [{"role": "assistant", "content": right}],
                         "rejected": [{"role": "assistant", "content": wrong}]})
        elif style == "conversations":  # the prompt is the turn both conversations share
            user = {"role": "user", "content": colour}
            rows.append({"chosen": [user, {"role": "assistant", "content": right}],
                         "rejected": [user, {"role": "assistant", "content": wrong}]})
        elif style == "kto":
            rows.append({"prompt": colour, "completion": right if i % 2 else wrong, "label": bool(i % 2)})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# On top of conftest's quick steps (make_recipe with an output folder): DPO for 8 steps with a held-out quarter;
# the ORPO and KTO tests change `task` after it.
DPO = {"name": "tiny-dpo", "task": "dpo", "data": {"eval": 0.25}, "preference": {"beta": 0.1},
       "training": {"max_steps": 8, "logging_steps": 2, "save_steps": 4}}


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, make_recipe):
    """One DPO run from the base on a tiny Llama, shared by the assertions below."""
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("dpo")
    model = build_tiny_model(root / "base", "llama")
    pairs = write_pairs(root / "pairs.jsonl")
    recipe = validate_recipe(make_recipe(model, pairs, root / "run", DPO))
    result = run_train(recipe, QUIET)
    return {"root": root, "model": model, "pairs": pairs, "recipe": recipe, "result": result, "run": root / "run"}


@pytest.fixture(scope="module")
def orpo_run(dpo_run, make_recipe):
    """One ORPO run from the base, on dpo_run's tiny Llama and pairs, with dpo_run's settings but in fp32 (not bf16 on
    a CPU that has it), so `lorafit eval` can be held to what training logged."""
    recipe = validate_recipe(make_recipe(dpo_run["model"], dpo_run["pairs"], dpo_run["root"] / "orpo", DPO,
                                         task="orpo", name="tiny-orpo", training={"precision": "fp32"}))
    return {**dpo_run, "recipe": recipe, "result": run_train(recipe, QUIET), "run": dpo_run["root"] / "orpo"}


def train_pairs(run: dict) -> list:
    """The run's pairs as the lint encodes them (Pair: prompt, chosen and rejected token ids)."""
    from transformers import AutoTokenizer

    from lorafit.preference_data import eval_examples

    tokenizer = AutoTokenizer.from_pretrained(run["run"] / "adapter")
    rows = [json.loads(line) for line in run["pairs"].read_text().splitlines() if line.strip()]
    return eval_examples(run["recipe"], tokenizer, rows)[0], tokenizer


# ----------------------------------------------------------------------------------------------------
# Training


def test_dpo_moves_the_adapter_and_the_chosen_answers_gain_on_the_rejected(dpo_run):
    """DPO from the base: LoRA B leaves zero, and on the train pairs the log-prob margin chosen - rejected rises
    from the base's to the adapter's; metrics.json carries TRL's reward metrics."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.preference_data import eval_examples
    from lorafit.preference_eval import answer_logps

    weights = adapter_weights(dpo_run["run"])
    assert any(name.endswith("lora_B.weight") and value.abs().sum() > 0 for name, value in weights.items())
    tokenizer = AutoTokenizer.from_pretrained(dpo_run["run"] / "adapter")
    rows = [json.loads(line) for line in dpo_run["pairs"].read_text().splitlines() if line.strip()]
    pairs, _ = eval_examples(dpo_run["recipe"], tokenizer, rows)
    base = AutoModelForCausalLM.from_pretrained(dpo_run["model"])
    before = answer_logps(base, pairs, tokenizer, 8)
    after = answer_logps(PeftModel.from_pretrained(base, dpo_run["run"] / "adapter"), pairs, tokenizer, 8)
    margin = lambda logps: sum(c - r for c, r in logps) / len(logps)  # noqa: E731
    assert margin(after) > margin(before) + 1.0
    metrics = json.loads((dpo_run["run"] / "metrics.json").read_text())
    assert metrics["preference"]["eval_rewards/margins"] > 0
    assert metrics["preference"]["eval_rewards/accuracies"] > 0.5
    assert any("rewards/margins" in entry for entry in metrics["loss_history"])
    assert metrics["loss_history"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference


def test_sft_weight_adds_the_chosen_answers_likelihood_to_the_dpo_loss(dpo_run, tmp_path, make_recipe):
    """preference.sft_weight (RPO): the first step's loss is log 2 plus the chosen answers' NLL, and after the same
    steps the chosen answers are more likely than under plain DPO, which may push both answers down."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.preference_eval import answer_logps

    recipe = validate_recipe(make_recipe(dpo_run["model"], dpo_run["pairs"], tmp_path / "run", DPO,
                                         preference={"sft_weight": 1.0}))
    run_train(recipe, QUIET)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["loss_history"][0]["loss"] > 0.6931 + 1.0  # a random tiny model's NLL per token is ~log(vocab)
    pairs, tokenizer = train_pairs(dpo_run)  # sft_weight does not change how the pairs are encoded
    chosen = {}
    for name, run in (("dpo", dpo_run["run"]), ("rpo", tmp_path / "run")):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dpo_run["model"]), run / "adapter")
        chosen[name] = sum(c for c, _ in answer_logps(model, pairs, tokenizer, 8)) / len(pairs)
    assert chosen["rpo"] > chosen["dpo"] + 0.5


def test_the_reference_is_the_adapter_switched_off_not_a_second_model(tiny_llama, tmp_path, make_recipe):
    """The DPO trainer holds no reference model and no "ref" adapter: TRL scores the reference with the adapter
    disabled, in the same weights (no parameter outside the base model and its adapter)."""
    from lorafit import adapters, models, preference_data
    from lorafit.recipe import validate_recipe as validate
    from lorafit.train import _build_trainer, _training_arguments

    pairs = write_pairs(tmp_path / "pairs.jsonl", 16)
    recipe = validate(make_recipe(tiny_llama, pairs, tmp_path / "run", DPO))
    precision, _ = models.choose_precision("fp32")
    tokenizer = models.load_tokenizer(recipe, str(tiny_llama))
    prepared = preference_data.prepare_preference_data(recipe, tokenizer)
    base = models.load_base_model(recipe, str(tiny_llama), precision, pad_token_id=tokenizer.pad_token_id)
    model = adapters.wrap_model(recipe, base, gradient_checkpointing=False)
    base_params = {id(p) for p in base.parameters()}
    args = _training_arguments(recipe, prepared, precision)
    trainer = _build_trainer(recipe, model, tokenizer, prepared, args, QUIET, quiet=True)
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]
    assert {id(p) for p in trainer.model.parameters()} == base_params  # one set of weights, nothing copied

    from lorafit.training_loop import AdapterReference, DPOTrainer, NonFiniteGuard

    assert isinstance(trainer, DPOTrainer) and isinstance(trainer, (AdapterReference, NonFiniteGuard))


def test_init_adapter_reference_copies_only_the_adapter(tiny_llama, tmp_path, make_recipe):
    """reference: init-adapter starts from adapter.init_from and keeps a frozen copy of it as the reference: the
    copy is adapter-sized and not trained, the exported adapter holds only the trained one."""
    from lorafit import adapters, models, preference_data
    from lorafit.train import _build_trainer, _training_arguments

    pairs = write_pairs(tmp_path / "pairs.jsonl", 16)
    first = run_train(validate_recipe(make_recipe(tiny_llama, pairs, tmp_path / "first", DPO,
                                                  training={"max_steps": 2})), QUIET)
    recipe = validate_recipe(make_recipe(
        tiny_llama, pairs, tmp_path / "second", DPO, adapter={"init_from": str(first.run_dir / "adapter")},
        preference={"reference": "init-adapter"}, training={"max_steps": 2}))
    precision, _ = models.choose_precision("fp32")
    tokenizer = models.load_tokenizer(recipe, str(tiny_llama))
    prepared = preference_data.prepare_preference_data(recipe, tokenizer)
    base = models.load_base_model(recipe, str(tiny_llama), precision, pad_token_id=tokenizer.pad_token_id)
    model = adapters.wrap_model(recipe, base, gradient_checkpointing=False)
    args = _training_arguments(recipe, prepared, precision)
    trainer = _build_trainer(recipe, model, tokenizer, prepared, args, QUIET, quiet=True)
    assert trainer.ref_model is None and sorted(trainer.model.peft_config) == ["default", "ref"]
    ref = {n: p for n, p in trainer.model.named_parameters() if ".ref." in n}
    default = {n: p for n, p in trainer.model.named_parameters() if ".default." in n}
    assert len(ref) == len(default) and not any(p.requires_grad for p in ref.values())
    start = adapter_weights(first.run_dir)
    for name, value in start.items():  # the copy and the trained adapter both start from init_from's weights
        key = "base_model.model." + name.removeprefix("base_model.model.").replace(".weight", ".ref.weight")
        assert torch.equal(dict(trainer.model.named_parameters())[key].detach(), value), name

    second = run_train(recipe.model_copy(update={"output": recipe.output.model_copy(
        update={"dir": str(tmp_path / "third")})}), QUIET)
    assert not (second.run_dir / "adapter" / "ref").exists()
    assert set(adapter_weights(second.run_dir)) == set(start)


def test_init_from_must_match_the_recipes_adapter(tiny_llama, tmp_path, dpo_run, make_recipe):
    """adapter.init_from with another rank than the recipe's is refused, naming both, before training."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", 16)
    recipe = validate_recipe(make_recipe(tiny_llama, pairs, tmp_path / "run", DPO,
                                         adapter={"r": 4, "init_from": str(dpo_run["run"] / "adapter")}))
    with pytest.raises(LorafitError, match=r"adapter.init_from: .*was trained with r 8, the recipe says adapter.r: 4"):
        run_train(recipe, QUIET)


@pytest.mark.parametrize("finished", ["dpo_run", "orpo_run"])
def test_resume_equals_an_uninterrupted_run(finished, tmp_path, monkeypatch, request):
    """Interrupted at step 5 (SIGTERM) and resumed, DPO / ORPO end with the adapter an uninterrupted run ends with."""
    run = request.getfixturevalue(finished)
    recipe = run["recipe"].model_copy(update={"output": run["recipe"].output.model_copy(
        update={"dir": str(tmp_path / "run")})})
    signal_at_step(monkeypatch, 5, sig=signal.SIGTERM)
    with pytest.raises(Interrupted, match="interrupted at step 5; checkpoint saved"):
        run_train(recipe, QUIET)
    monkeypatch.undo()
    resumed = run_train(recipe, QUIET, resume=True)
    assert resumed.metrics.global_step == 8
    expected, got = adapter_weights(run["run"]), adapter_weights(tmp_path / "run")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name


def test_dpo_with_group_by_length_trains(dpo_run, tmp_path, monkeypatch, make_recipe):
    """data.group_by_length under dpo: the Trainer's sampler sorts by each pair's prompt + longer answer (TRL's pair
    rows have no input_ids to measure), and the run trains."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from lorafit.training_loop import DPOTrainer

    seen = {}
    real = DPOTrainer._get_train_sampler

    def spy(self, *args, **kwargs):
        seen["sampler"] = real(self, *args, **kwargs)
        return seen["sampler"]

    monkeypatch.setattr(DPOTrainer, "_get_train_sampler", spy)
    recipe = validate_recipe(make_recipe(dpo_run["model"], dpo_run["pairs"], tmp_path / "run", DPO,
                                         data={"group_by_length": True}, training={"max_steps": 2}))
    result = run_train(recipe, QUIET)
    assert result.metrics.global_step == 2
    assert isinstance(seen["sampler"], LengthGroupedSampler)
    pairs, _ = train_pairs(dpo_run)  # every pair of the file; training holds a quarter out for eval
    lengths = Counter(seen["sampler"].lengths)
    assert lengths.total() == result.report.train_examples and len(lengths) > 1
    assert lengths <= Counter(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)


def test_kto_trains_on_labelled_answers(tiny_llama, tmp_path, make_recipe):
    """KTO on prompt/completion/label rows: the desirable answers' reward ends above the undesirable ones'."""
    data = write_pairs(tmp_path / "kto.jsonl", 48, style="kto")
    recipe = validate_recipe(make_recipe(tiny_llama, data, tmp_path / "run", DPO, task="kto", name="tiny-kto"))
    result = run_train(recipe, QUIET)
    assert result.report.format == "prompt/completion/label"
    assert result.report.desirable + result.report.undesirable == 36 and result.report.desirable > 10
    assert result.metrics.preference["eval_rewards/margins"] > 0


def test_orpo_raises_the_chosen_answers_and_their_lead_over_the_rejected(orpo_run):
    """ORPO from the base: LoRA B leaves zero; on the train pairs the chosen answers' own log-prob rises (its NLL
    term) and so does their margin over the rejected (its odds-ratio term); metrics.json carries ORPO's metrics, and
    the first loss is TRL's ORPO loss with the recipe's beta: NLL - beta x mean log-sigmoid(log odds ratio)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.preference_eval import answer_logps

    weights = adapter_weights(orpo_run["run"])
    assert any(name.endswith("lora_B.weight") and value.abs().sum() > 0 for name, value in weights.items())
    pairs, tokenizer = train_pairs(orpo_run)
    base = AutoModelForCausalLM.from_pretrained(orpo_run["model"])
    before = answer_logps(base, pairs, tokenizer, 8)
    after = answer_logps(PeftModel.from_pretrained(base, orpo_run["run"] / "adapter"), pairs, tokenizer, 8)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert mean([c for c, _ in after]) > mean([c for c, _ in before]) + 1.0  # the chosen answers themselves
    assert mean([c - r for c, r in after]) > mean([c - r for c, r in before]) + 1.0

    metrics = json.loads((orpo_run["run"] / "metrics.json").read_text())
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "nll_loss",
             "log_odds_ratio", "log_odds_chosen")
    assert set(metrics["preference"]) == {*names, *(f"eval_{name}" for name in names)}
    assert all(value is not None for value in metrics["preference"].values())
    assert metrics["preference"]["eval_rewards/margins"] > 0 and metrics["preference"]["eval_rewards/accuracies"] > 0.5
    first = metrics["loss_history"][0]
    assert first["loss"] == pytest.approx(first["nll_loss"] - 0.1 * first["log_odds_ratio"], rel=1e-4)
    nll = [entry["nll_loss"] for entry in metrics["loss_history"] if "nll_loss" in entry]
    assert nll[-1] < nll[0] and any("eval_nll_loss" in entry for entry in metrics["loss_history"])
    assert metrics["tokens_seen"] > 0  # both answers of every pair counted, as for DPO


def test_orpo_trains_on_the_linted_token_ids_without_a_reference(orpo_run, tmp_path, make_recipe):
    """The ORPO trainer holds no reference (no ref model, no "ref" adapter, nothing outside base + adapter) and its
    rows are the lint's token ids: prompt + answer as the DPO trainer and `lorafit eval` score them, no BOS or EOS
    added, the prompt masked out of the answer labels; data.group_by_length sorts by prompt + the longer answer."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from lorafit import adapters, models, preference_data
    from lorafit.orpo_trainer import ORPOTrainer
    from lorafit.train import _build_trainer, _training_arguments
    from lorafit.training_loop import AdapterReference, NonFiniteGuard

    recipe = validate_recipe(make_recipe(orpo_run["model"], orpo_run["pairs"], tmp_path / "run", DPO, task="orpo",
                                         data={"group_by_length": True}))
    precision, _ = models.choose_precision("fp32")
    tokenizer = models.load_tokenizer(recipe, str(orpo_run["model"]))
    prepared = preference_data.prepare_preference_data(recipe, tokenizer)
    base = models.load_base_model(recipe, str(orpo_run["model"]), precision, pad_token_id=tokenizer.pad_token_id)
    model = adapters.wrap_model(recipe, base, gradient_checkpointing=False)
    base_params = {id(p) for p in base.parameters()}  # the base with the adapter injected into its layers
    trainer = _build_trainer(recipe, model, tokenizer, prepared, _training_arguments(recipe, prepared, precision),
                             QUIET, quiet=True)
    assert isinstance(trainer, ORPOTrainer) and isinstance(trainer, NonFiniteGuard)
    assert not isinstance(trainer, AdapterReference) and getattr(trainer, "ref_model", None) is None
    assert list(trainer.model.peft_config) == ["default"]
    assert {id(p) for p in trainer.model.parameters()} == base_params

    pairs, _ = train_pairs(orpo_run)
    by_prompt = {tuple(p.prompt_ids + p.chosen_ids): p for p in pairs}
    row = trainer.train_dataset[0]
    pair = by_prompt[tuple(row["chosen_input_ids"])]
    prompt = len(pair.prompt_ids)
    assert row["rejected_input_ids"] == pair.prompt_ids + pair.rejected_ids
    assert row["prompt_input_ids"] == pair.prompt_ids and row["chosen_input_ids"][-1] != tokenizer.eos_token_id
    assert row["chosen_labels"] == [-100] * prompt + pair.chosen_ids
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.lengths[0] == prompt + max(len(pair.chosen_ids), len(pair.rejected_ids))


def test_orpo_continues_an_sft_adapter(orpo_run, tmp_path, make_recipe):
    """adapter.init_from works under orpo (no reference to copy): training starts from that adapter's weights, and
    its first loss is far below a fresh adapter's."""
    from lorafit import adapters, models

    start = orpo_run["run"] / "adapter"  # any LoRA adapter of the same shape stands in for an SFT one
    recipe = validate_recipe(make_recipe(orpo_run["model"], orpo_run["pairs"], tmp_path / "run", DPO, task="orpo",
                                         adapter={"init_from": str(start)}, training={"max_steps": 1}))
    tokenizer = models.load_tokenizer(recipe, str(orpo_run["model"]))
    precision, _ = models.choose_precision("fp32")
    base = models.load_base_model(recipe, str(orpo_run["model"]), precision, pad_token_id=tokenizer.pad_token_id)
    model = adapters.wrap_model(recipe, base, gradient_checkpointing=False)
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    for name, value in adapter_weights(orpo_run["run"]).items():
        assert torch.equal(loaded[name].detach(), value), name
    continued = run_train(recipe, QUIET).metrics.loss_history[0]["loss"]
    assert continued < orpo_run["result"].metrics.loss_history[0]["loss"] - 1.0  # not from a fresh adapter
    assert set(adapter_weights(tmp_path / "run")) == set(adapter_weights(orpo_run["run"]))


# ----------------------------------------------------------------------------------------------------
# Data: formats and the lint


@pytest.mark.parametrize("style", ["strings", "messages", "conversations"])
def test_pair_formats_read_the_same(tiny_llama, tmp_path, style, make_recipe):
    """Explicit strings, explicit messages and whole conversations sharing a prompt give the same pairs."""
    from lorafit import models
    from lorafit.preference_data import prepare_preference_data

    recipe = validate_recipe(make_recipe(tiny_llama, write_pairs(tmp_path / f"{style}.jsonl", 12, style=style),
                                         tmp_path / "run", DPO, data={"eval": None}))
    tokenizer = models.load_tokenizer(recipe, str(tiny_llama))
    prepared = prepare_preference_data(recipe, tokenizer)
    row = prepared.train[0]
    assert row.pop("length") > 0  # what data.group_by_length sorts by
    assert row == {"prompt": [{"role": "user", "content": "red"}], "chosen": [{"role": "assistant", "content": "apple"}],
                   "rejected": [{"role": "assistant", "content": "sky"}]}
    assert prepared.report.train_examples == 12 and not prepared.report.dropped


def test_bad_pairs_are_dropped_and_counted_by_reason(tiny_llama, tmp_path, make_recipe):
    """Identical sides, an empty side, a malformed row and a prompt that fills max_length are each dropped and
    counted; pairs cut by max_length are reported; token lengths are measured."""
    from lorafit import models
    from lorafit.preference_data import prepare_preference_data

    rows = [
        {"prompt": "red", "chosen": "apple", "rejected": "apple"},
        {"prompt": "red", "chosen": " ", "rejected": "sky"},
        {"prompt": "red", "chosen": 3, "rejected": "sky"},
        {"prompt": "red " * 80, "chosen": "apple", "rejected": "sky"},
        {"prompt": "blue", "chosen": "sky " * 80, "rejected": "grass " * 80},
        {"prompt": "blue", "chosen": "sky", "rejected": "grass"},
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = validate_recipe(make_recipe(tiny_llama, data, tmp_path / "run", DPO, data={"eval": None}))
    report = prepare_preference_data(recipe, models.load_tokenizer(recipe, str(tiny_llama))).report
    assert dict(report.dropped) == {
        "identical chosen and rejected": 1,
        "empty chosen or rejected answer": 1,
        "malformed row (prompt, chosen and rejected must be text or chat messages)": 1,
        "prompt alone fills data.max_length (no answer tokens left)": 1,
    }
    assert report.train_examples == 2 and report.truncated == 1
    assert report.token_lengths["chosen"]["max"] > report.token_lengths["chosen"]["mean"] > 0
    assert any("cut at data.max_length" in w for w in report.warnings())

    data.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(LorafitError, match=r"no usable preference rows remain \(1 identical chosen and rejected\)"):
        prepare_preference_data(recipe, models.load_tokenizer(recipe, str(tiny_llama)))


def test_the_quickstart_preference_recipes_validate_and_their_data_is_clean():
    """configs/quickstart-dpo*.yaml and quickstart-orpo.yaml validate (orpo on dpo's pairs), and the committed pairs
    are all usable: chosen is the reversal, rejected differs from it."""
    from lorafit.recipe import load_recipe

    configs = Path(__file__).resolve().parents[1] / "configs"
    dpo, on_sft = load_recipe(configs / "quickstart-dpo.yaml"), load_recipe(configs / "quickstart-dpo-sft.yaml")
    assert dpo.task == on_sft.task == "dpo" and on_sft.adapter.init_from == "runs/quickstart/adapter"
    assert on_sft.preference.reference == "init-adapter" and on_sft.run_dir == Path("runs/quickstart-dpo-sft")
    orpo = load_recipe(configs / "quickstart-orpo.yaml")
    assert orpo.task == "orpo" and orpo.run_dir == Path("runs/quickstart-orpo") and orpo.adapter.init_from is None
    assert (orpo.data.train, orpo.data.eval, orpo.data.max_length) == (dpo.data.train, dpo.data.eval, 128)
    assert orpo.preference.beta == 0.1 and orpo.preference.loss is None
    for split in (dpo.data.train, dpo.data.eval):
        rows = [json.loads(line) for line in Path(split).read_text().splitlines()]
        words = [row["prompt"].rsplit(": ", 1)[1].split() for row in rows]
        assert all(row["chosen"].split() == w[::-1] != row["rejected"].split() for row, w in zip(rows, words))


def test_wrong_columns_name_what_is_needed(tiny_llama, toy_data, tmp_path, make_recipe):
    """SFT data under task: dpo is refused naming the columns dpo needs and the ones the file has."""
    recipe = validate_recipe(make_recipe(tiny_llama, toy_data, tmp_path / "run", DPO))
    with pytest.raises(LorafitError, match=r"dpo data needs the columns prompt, chosen, rejected; the data has messages"):
        run_train(recipe, QUIET, dry_run=True)


@pytest.mark.parametrize(("change", "message"), [
    ({"task": "causal-lm"}, "preference: only applies to task: dpo, kto or orpo"),
    ({"preference": {"loss": "kto"}}, "preference.loss: 'kto' is not a dpo loss"),
    ({"preference": {"reference": "init-adapter"}}, "init-adapter needs adapter.init_from"),
    ({"data": {"packing": True}}, "data.packing: task dpo"),
    ({"task": "kto", "training": {"batch_size": 1}}, "kto estimates its KL term"),
    ({"preference": {"loss": "exo_pair"}}, "loss exo_pair needs a value above 0"),
    ({"adapter": {"init": "pissa"}}, "adapter.init pissa rewrites the base weights"),
    ({"task": "kto", "preference": {"sft_weight": 0.5}}, "sft_weight only applies to task: dpo"),
    ({"preference": {"loss": "sft", "sft_weight": 0.5}}, "loss sft is already"),
    ({"task": "orpo", "preference": {"loss": "sigmoid"}}, "preference.loss: orpo has one loss"),
    ({"task": "orpo", "preference": {"label_smoothing": 0.1}}, "preference.label_smoothing: not used by task orpo"),
    ({"task": "orpo", "preference": {"sft_weight": 0.5}}, "preference.sft_weight: not used by task orpo"),
    ({"task": "orpo", "preference": {"reference": "init-adapter"}, "adapter": {"init_from": "a"}},
     "preference.reference: orpo has no reference model"),
    ({"task": "orpo", "preference": {"undesirable_weight": 2.0}}, "preference.undesirable_weight: not used by task"),
    ({"task": "orpo", "data": {"packing": True}}, "data.packing: task orpo"),
    ({"task": "orpo", "template": {"train_on": "all"}}, "template.train_on: orpo scores the answers only"),
    ({"task": "orpo", "adapter": {"method": "adalora", "r": 16}},
     "adapter.method: adalora is not supported with task: orpo"),
])
def test_settings_that_cannot_apply_are_refused(tmp_path, change, message, make_recipe):
    """Preference settings outside the preference tasks, a loss of another task and impossible combinations are
    errors; orpo refuses what only a reference model or another loss would use."""
    raw = make_recipe(Path("m"), tmp_path / "p.jsonl", tmp_path / "run", DPO, **change)
    with pytest.raises(LorafitError, match=message):
        validate_recipe(raw)


# ----------------------------------------------------------------------------------------------------
# eval, merge, CLI


def test_orpo_accepts_what_only_a_reference_would_forbid(tmp_path, make_recipe):
    """Without a reference model, orpo takes adapter.init: pissa (the base may be rewritten), an explicit
    reference: adapter-disabled (the default, unused) and init_from alone."""
    for change in ({"adapter": {"init": "pissa"}}, {"preference": {"reference": "adapter-disabled"}},
                   {"adapter": {"init_from": "runs/sft/adapter"}}):
        raw = make_recipe(Path("m"), tmp_path / "p.jsonl", tmp_path / "run", DPO, task="orpo", **change)
        assert validate_recipe(raw).task == "orpo"


def test_orpo_trains_a_saved_lm_head(orpo_run, tmp_path, make_recipe):
    """lm_head in adapter.modules_to_save, refused under dpo / kto, trains under orpo: it scores with the model's
    own logits, so the saved copy moves away from the base's head."""
    from transformers import AutoModelForCausalLM

    recipe = validate_recipe(make_recipe(orpo_run["model"], orpo_run["pairs"], tmp_path / "run", DPO, task="orpo",
                                         adapter={"modules_to_save": ["lm_head"]}, training={"max_steps": 2}))
    run_train(recipe, QUIET)
    head = adapter_weights(tmp_path / "run")["base_model.model.lm_head.weight"]
    base = AutoModelForCausalLM.from_pretrained(orpo_run["model"]).lm_head.weight.detach()
    assert (head - base).abs().max() > 1e-3


def test_eval_reports_reward_accuracy_base_vs_adapter(dpo_run):
    """eval on the held-out pairs: the base has no reward against itself, the adapter's reward accuracy is above
    chance and it prefers the chosen answers more often than the base does; generation scores sit beside."""
    from lorafit.evaluate import run_eval

    result = run_eval(dpo_run["recipe"], [dpo_run["run"] / "adapter"])
    base, adapter = result.scores
    assert base.preference.reward_accuracy is None and base.preference.pair_accuracy is not None
    assert adapter.preference.reward_accuracy > 0.5 and adapter.preference.reward_margin > 0
    assert adapter.preference.logp_margin > base.preference.logp_margin
    assert adapter.exact_match is not None and result.examples == 12
    report = json.loads(result.report_path.read_text())
    assert report["scores"][1]["preference"]["pairs"] == 12
    assert report["scores"][1]["preference"]["reward"] == "beta x log-ratio to the base"


def test_orpo_eval_reports_its_reference_free_reward_as_training_logged_it(orpo_run):
    """eval under orpo: the reward is ORPO's own (beta x mean log-prob per answer token, no reference), so the base
    has one too; the adapter's on the held-out pairs equals the eval_rewards/* training logged on the same pairs,
    and beats the base's."""
    from lorafit.evaluate import run_eval

    result = run_eval(orpo_run["recipe"], [orpo_run["run"] / "adapter"])
    base, adapter = result.scores
    assert result.examples == 12 and adapter.preference.pairs == 12
    assert base.preference.reward_accuracy is not None and base.preference.reward == adapter.preference.reward
    assert "no reference" in adapter.preference.reward
    logged = json.loads((orpo_run["run"] / "metrics.json").read_text())["preference"]
    assert adapter.preference.reward_accuracy == pytest.approx(logged["eval_rewards/accuracies"])
    assert adapter.preference.reward_margin == pytest.approx(logged["eval_rewards/margins"], rel=1e-3)
    assert adapter.preference.reward_margin > base.preference.reward_margin
    assert adapter.preference.logp_margin > base.preference.logp_margin
    report = json.loads(result.report_path.read_text())
    assert report["scores"][0]["preference"]["reward"] == adapter.preference.reward


def test_merge_and_cli_json_on_a_dpo_run(dpo_run, tmp_path, make_recipe):
    """A DPO adapter merges like an SFT one, and `train --dry-run --json` carries the pair lint."""
    import subprocess
    import sys

    from lorafit.merge import AdapterSpec, MergeOptions, run_merge

    merged = run_merge(MergeOptions([AdapterSpec(dpo_run["run"] / "adapter")], tmp_path / "merged"))
    assert (Path(merged.out_dir) / "model.safetensors").exists()
    recipe_file = tmp_path / "r.json"
    recipe_file.write_text(json.dumps(make_recipe(dpo_run["model"], dpo_run["pairs"], tmp_path / "dry", DPO)))
    recipe_yaml = tmp_path / "r.yaml"
    recipe_yaml.write_text(recipe_file.read_text())  # JSON is YAML
    out = subprocess.run([sys.executable, "-m", "lorafit", "train", str(recipe_yaml), "--dry-run", "--json"],
                         capture_output=True, text=True, check=True)
    payload = json.loads(out.stdout)
    assert payload["data"]["format"] == "prompt/chosen/rejected"
    assert payload["data"]["token_lengths"]["prompt"]["max"] > 0 and payload["data"]["truncated"] == 0


def test_merge_inspect_runs_and_cli_json_on_an_orpo_run(orpo_run, tmp_path, make_recipe):
    """An ORPO adapter merges into a model that scores like base + adapter, inspect-modules reads an orpo recipe,
    `lorafit runs` lists the run, and `train --json` reports ORPO's metrics."""
    import subprocess
    import sys

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.inspect_modules import run_inspect
    from lorafit.merge import AdapterSpec, MergeOptions, run_merge
    from lorafit.preference_eval import answer_logps
    from lorafit.runs import run_runs

    merged = run_merge(MergeOptions([AdapterSpec(orpo_run["run"] / "adapter")], tmp_path / "merged"))
    pairs, tokenizer = train_pairs(orpo_run)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(orpo_run["model"]),
                                        orpo_run["run"] / "adapter")
    expected = answer_logps(adapted, pairs[:4], tokenizer, 4)
    got = answer_logps(AutoModelForCausalLM.from_pretrained(merged.out_dir), pairs[:4], tokenizer, 4)
    assert [x for pair in got for x in pair] == pytest.approx([x for pair in expected for x in pair], abs=1e-3)

    assert run_inspect(orpo_run["run"] / "recipe.yaml").trainable_params > 0
    rows, _ = run_runs([orpo_run["root"]])
    row = next(r for r in rows if r.name == "orpo")  # named by its folder below the one given
    assert row.status == "finished" and row.steps == 8 and row.train_loss is not None

    recipe_yaml = tmp_path / "r.yaml"  # JSON is YAML
    recipe_yaml.write_text(json.dumps(make_recipe(orpo_run["model"], orpo_run["pairs"], tmp_path / "cli", DPO,
                                                  task="orpo", training={"max_steps": 2})))
    out = subprocess.run([sys.executable, "-m", "lorafit", "train", str(recipe_yaml), "--json"],
                         capture_output=True, text=True, check=True)
    payload = json.loads(out.stdout)
    assert "You are importing from 'trl.experimental'" not in out.stderr
    metrics = payload["metrics"]
    assert metrics["global_step"] == 2 and metrics["preference"]["eval_nll_loss"] > 0
