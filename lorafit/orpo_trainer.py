"""The trainer of task orpo: TRL's experimental ORPOTrainer with lorafit's NaN/inf guard, fed lorafit's token ids.

ORPO (Hong et al. 2024) needs no reference model: its loss is the chosen answers' negative log-likelihood plus
beta (the paper's lambda) x an odds-ratio term that pushes the chosen answer's odds above the rejected one's. TRL
keeps it under `trl.experimental`, so it lives in its own module: only task orpo imports it, and a TRL release
that moves or drops it breaks `task: orpo` alone, never SFT, DPO or KTO (lorafit/training_loop.py).

Two things TRL's ORPOTrainer does its own way, kept as TRL does them or replaced at a documented point:
- It tokenizes rendered text itself, adding a BOS and an EOS the chat template may not produce. lorafit hands it
  the pairs' token ids as the data lint measured them (lorafit/preference_data.py) and `tokenize_row`, the
  trainer's per-row tokenization hook, lays them out: ORPO trains on exactly the tokens DPO and `lorafit eval` score.
- Its NLL term covers the prompt tokens as well as the chosen answer (TRL's choice, following the paper's reference
  code: huggingface/trl#1516, #2527), while the odds-ratio term and the logged rewards use the answers only, each
  the mean log-probability per answer token. That is kept: changing it would mean rewriting TRL's forward pass.

Import this module inside the function that trains, like lorafit/training_loop.py.
"""

from __future__ import annotations

from trl.import_utils import suppress_experimental_warning

from lorafit.distributed import TrainableOnlyCheckpoints
from lorafit.training_loop import NonFiniteGuard

# trl.experimental warns on first import that its APIs may change without notice. lorafit bounds the TRL versions it
# supports (pyproject.toml) and its tests cover this trainer, so the notice would only alarm `task: orpo` users about
# something they cannot act on. TRL's own context manager silences that one warning category, for this import only
# (TRL imports trl.experimental.utils the same way itself, in trl/models/utils.py).
with suppress_experimental_warning():
    from trl.experimental.orpo import ORPOConfig
    from trl.experimental.orpo import ORPOTrainer as _TRLORPOTrainer

__all__ = ["ORPOConfig", "ORPOTrainer"]


class ORPOTrainer(NonFiniteGuard, TrainableOnlyCheckpoints, _TRLORPOTrainer):
    """TRL's ORPOTrainer with the NaN/inf guard, reading `prompt_ids` / `chosen_ids` / `rejected_ids` rows.

    There is no reference model, so nothing like lorafit.training_loop.AdapterReference: the PEFT model is trained alone.
    """

    def tokenize_row(self, feature, model=None) -> dict[str, list[int]]:
        """One pair as ORPO's features: prompt + answer ids, attention masks, and labels masking the prompt.

        The ids are already truncated to data.max_length by the lint (answers cut, as TRL would cut them).
        """
        prompt = list(feature["prompt_ids"])
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            ids = prompt + list(feature[f"{side}_ids"])
            row[f"{side}_input_ids"] = ids
            row[f"{side}_attention_mask"] = [1] * len(ids)
            row[f"{side}_labels"] = [-100] * len(prompt) + ids[len(prompt):]
        return row

    def _track_num_input_tokens(self, inputs):
        # ORPO's batches keep chosen and rejected under their own keys and have no `input_ids`, so the Trainer's
        # token count (metrics.json tokens_seen, tokens/s) finds nothing and warns at every step. Both rows go
        # through the model, as in DPO, whose batch concatenates them: count them the same way, with the Trainer's
        # own counting (padding excluded, summed over processes). A private method, the one place the Trainer
        # counts; tests/test_preference.py checks ORPO's tokens_seen, so a rename upstream shows.
        import torch

        sides = [side for side in ("chosen", "rejected") if f"{side}_input_ids" in inputs]
        if not sides:
            return super()._track_num_input_tokens(inputs)
        return super()._track_num_input_tokens({
            "input_ids": torch.cat([inputs[f"{side}_input_ids"].flatten() for side in sides]),
            "attention_mask": torch.cat([inputs[f"{side}_attention_mask"].flatten() for side in sides])})
