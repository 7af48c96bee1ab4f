"""Charts: valid PNG files that show something (pixels checked), and a chart that cannot be drawn is a warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorafit.plots import write_eval_chart, write_loss_chart, write_runs_chart

# matplotlib's default color cycle: C0 (train loss), C1 (eval loss), C2 (learning rate)
C0, C1, C2 = (31, 119, 180), (255, 127, 14), (44, 160, 44)


def pixels(path: Path) -> np.ndarray:
    """The PNG as an RGB array; fails unless the file is a real PNG."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def share_of(rgb: np.ndarray, color: tuple[int, int, int], tolerance: int = 30) -> float:
    """The share of pixels close to `color`."""
    return float((np.abs(rgb.astype(int) - np.array(color)).sum(axis=-1) < tolerance).mean())


def history(steps: int = 20) -> list[dict]:
    entries = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-3 * (1 - s / (steps + 1))} for s in range(1, steps + 1)]
    entries += [{"step": 10, "eval_loss": 0.9}, {"step": 20, "eval_loss": 0.5}]
    return sorted(entries, key=lambda e: e["step"])


def test_an_rl_run_gets_a_reward_panel_between_loss_and_learning_rate(tmp_path):
    """loss.png of a grpo / rloo run: the weighted reward (C3) and each reward's mean (C4...) in a middle panel; a run
    without rewards keeps the two-panel chart."""
    rl = [{**entry, "reward": 0.05 * entry["step"], "rewards/exact_match/mean": 0.02 * entry["step"]}
          for entry in history() if "loss" in entry]
    plain, with_rewards = tmp_path / "plain.png", tmp_path / "rl.png"
    assert write_loss_chart(history(), plain, title="sft") is None
    assert write_loss_chart(rl, with_rewards, title="grpo") is None
    rgb = pixels(with_rewards)
    assert rgb.shape[0] > pixels(plain).shape[0]
    middle = rgb[rgb.shape[0] * 3 // 7: rgb.shape[0] * 5 // 7]
    assert share_of(middle, (214, 39, 40)) > 0.0005  # C3: the weighted reward
    assert share_of(middle, (214, 39, 40)) > share_of(rgb[: rgb.shape[0] * 3 // 7], (214, 39, 40))


def test_loss_chart_draws_train_loss_eval_loss_and_learning_rate(tmp_path):
    """loss.png: a real PNG with the train loss (C0), eval loss (C1) and learning rate (C2) curves on it."""
    path = tmp_path / "loss.png"
    assert write_loss_chart(history(), path, title="demo") is None
    rgb = pixels(path)
    assert rgb.shape[0] > 300 and rgb.shape[1] > 500
    assert share_of(rgb, (255, 255, 255)) < 0.97  # not blank
    for color in (C0, C1, C2):
        assert share_of(rgb, color) > 0.0005, color
    top, bottom = rgb[: rgb.shape[0] * 2 // 3], rgb[rgb.shape[0] * 2 // 3:]
    assert share_of(top, C0) > share_of(bottom, C0)  # losses above, the learning rate below
    assert share_of(bottom, C2) > share_of(top, C2)


def test_eval_chart_shows_base_and_each_adapter(tmp_path):
    """scores.png: one colored bar group per model (base C0, two adapters C1 and C2); a score no model has is left
    out."""
    matches = [0.1, 0.8, 0.4]
    path = tmp_path / "scores.png"
    assert write_eval_chart({"base": 3.0, "a": 1.0, "b": 2.0},
                            {"exact match": matches, "ROUGE-L": matches, "accuracy": [None, None, None]}, path,
                            title="demo", rows=10) is None
    rgb = pixels(path)
    shares = [share_of(rgb, color) for color in (C0, C1, C2)]
    assert all(share > 0.005 for share in shares), shares
    assert shares[1] > shares[2]  # adapter a scores twice b's exact match: its bars are taller


def test_runs_chart_draws_one_color_per_run(tmp_path):
    """lorafit runs --plot: every run's loss curve in its own color; runs without any loss are left out."""
    runs = [("a", history()), ("b", [{"step": s, "loss": 4.0 / s} for s in range(1, 8)]), ("c", [])]
    path = tmp_path / "runs.png"
    assert write_runs_chart(runs, path) is None
    rgb = pixels(path)
    assert share_of(rgb, C0) > 0.001 and share_of(rgb, C1) > 0.001
    assert share_of(rgb, C2) < 0.0002  # a third run with no logged loss draws nothing


@pytest.mark.parametrize("case", ["no losses", "unwritable"])
def test_a_chart_that_cannot_be_drawn_is_a_warning(tmp_path, case):
    """No loss logged, or a path that cannot be written: a warning naming the file, nothing raised, no file."""
    if case == "no losses":
        path = tmp_path / "loss.png"
        warning = write_loss_chart([{"step": 1, "learning_rate": 1e-3}], path, title="x")
        assert warning == "warning: loss.png not drawn: no loss was logged"
    else:
        (tmp_path / "file").write_text("a file where a folder should be")
        path = tmp_path / "file" / "loss.png"
        warning = write_loss_chart(history(), path, title="x")
        assert warning.startswith("warning: loss.png not drawn: ")
    assert not path.exists()
    assert write_runs_chart([], tmp_path / "none.png").startswith("warning: ")
