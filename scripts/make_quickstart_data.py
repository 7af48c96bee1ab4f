"""Generate the lorafit quickstart dataset: "reverse the order of 4 words".

The base model (SmolLM2-135M-Instruct) fails this task; a LoRA learns it in ~60 steps.

Writes, in chat ``messages`` jsonl format::

    configs/data/reverse_words/train.jsonl   (600 rows)
    configs/data/reverse_words/eval.jsonl    (50 rows)

Each row::

    {"messages": [
        {"role": "user", "content": "Reverse the order of these words: apple river stone cloud"},
        {"role": "assistant", "content": "cloud stone river apple"}]}

Every row uses 4 distinct words from a built-in list of 200 short lowercase nouns. The output is
deterministic for a given ``--seed`` and no eval row shares its *set* of words with any train row
(so eval never contains a train combination, in any order).

Regenerate with (stdlib only)::

    python scripts/make_quickstart_data.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PROMPT_PREFIX = "Reverse the order of these words: "
WORDS_PER_ROW = 4

NOUNS = """
ant apple arm axe baby bag ball band bank bat bath bay bean bear bed bee bell belt bike bin bird
boat body bone book boot bowl box boy bread brick bridge brush bug bun bus cake camp cap car card
cart cat cave chair chalk cheese chest child cliff clock cloud coat coin corn cow crab crow cup
deer desk dish dog doll door dress drum duck dust egg eye face fan farm fern fire fish flag floor
flower foot fork fox frog game gate gift girl glass goat gold grass hair hand hat heart hen hill
hook horse house hut ice ink jam jar jet key king kite lake lamp leaf leg lion lip lock log map
milk moon mouse mouth mud nail neck nest net nose nut oil owl page pan park pear pen pig pin pipe
plane plant plate pond pot queen rain ring river road rock roof room rope rose sail salt sand seed
sheep shelf ship shirt shoe shop sink skirt sky snake snow sock song soup spoon star stick stone
storm sun table tail tea tent tiger toe tooth town toy train tree truck wall watch water whale
wheel wind window wing wolf
""".split()

assert len(NOUNS) == 200, len(NOUNS)
assert len(set(NOUNS)) == len(NOUNS), "duplicate nouns"
assert all(w.isalpha() and w.islower() and len(w) <= 6 for w in NOUNS)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "configs" / "data" / "reverse_words"


def make_row(words: list[str]) -> dict:
    return {
        "messages": [
            {"role": "user", "content": PROMPT_PREFIX + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]
    }


def sample_rows(n: int, rng: random.Random, used: set[frozenset[str]]) -> list[list[str]]:
    """``n`` ordered 4-word lists whose word sets are not in ``used`` (``used`` is updated)."""
    rows: list[list[str]] = []
    while len(rows) < n:
        words = rng.sample(NOUNS, WORDS_PER_ROW)
        key = frozenset(words)
        if key in used:
            continue
        used.add(key)
        rows.append(words)
    return rows


def write_jsonl(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for words in rows:
            f.write(json.dumps(make_row(words)) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-eval", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    used: set[frozenset[str]] = set()
    # Eval is drawn first, then train avoids every eval word set: disjoint by construction.
    eval_rows = sample_rows(args.n_eval, rng, used)
    train_rows = sample_rows(args.n_train, rng, used)

    write_jsonl(args.out_dir / "train.jsonl", train_rows)
    write_jsonl(args.out_dir / "eval.jsonl", eval_rows)
    print(f"wrote {len(train_rows)} train / {len(eval_rows)} eval rows to {args.out_dir}")


if __name__ == "__main__":
    main()
