"""Generate the quickstart preference data set: the word-reversal task with a plausible wrong answer rejected.

Reads the quickstart SFT data (configs/data/reverse_words/, written by scripts/make_quickstart_data.py) and
writes, in explicit prompt/chosen/rejected jsonl::

    configs/data/reverse_prefs/train.jsonl   (one pair per SFT train row, 600)
    configs/data/reverse_prefs/eval.jsonl    (one pair per SFT eval row, 50; no word set shared with train)

Each row::

    {"prompt": "Reverse the order of these words: lamp cheese bee nose",
     "chosen": "nose bee cheese lamp",
     "rejected": "nose cheese bee lamp"}

The rejected answer is the kind of mistake a model makes on this task, chosen per row by a seeded RNG, so a
preference can only be learned by reading the order of all four words:

- echo:    the words in their original order (what an untrained model tends to answer);
- swap:    the right answer with two neighbouring words swapped;
- rotate:  the last word moved to the front, the rest kept in place.

Deterministic for a given --seed. Regenerate with (stdlib only)::

    python scripts/make_preference_data.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE = REPO_ROOT / "configs" / "data" / "reverse_words"
DEFAULT_OUT = REPO_ROOT / "configs" / "data" / "reverse_prefs"
PROMPT_PREFIX = "Reverse the order of these words: "


def wrong_answer(words: list[str], rng: random.Random) -> str:
    """A plausible wrong reversal of `words`; never the right one."""
    right = words[::-1]
    kind = rng.choice(("echo", "swap", "rotate"))
    if kind == "echo":
        wrong = list(words)
    elif kind == "swap":
        i = rng.randrange(len(right) - 1)
        wrong = right[:i] + [right[i + 1], right[i]] + right[i + 2:]
    else:
        wrong = [words[-1], *words[:-1]]
    if wrong == right:  # a rotation of a palindromic order; fall back to a swap
        wrong = right[1:2] + right[:1] + right[2:]
    return " ".join(wrong)


def make_pairs(source: Path, rng: random.Random) -> list[dict[str, str]]:
    """One pair per SFT row of `source`: its prompt, its answer chosen, a wrong answer rejected."""
    pairs = []
    for line in source.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        prompt, answer = messages[0]["content"], messages[1]["content"]
        words = prompt.removeprefix(PROMPT_PREFIX).split()
        assert answer == " ".join(words[::-1]), line
        pairs.append({"prompt": prompt, "chosen": answer, "rejected": wrong_answer(words, rng)})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        pairs = make_pairs(SOURCE / f"{split}.jsonl", rng)
        text = "".join(json.dumps(pair) + "\n" for pair in pairs)
        (args.out / f"{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"wrote {len(pairs)} pairs to {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
