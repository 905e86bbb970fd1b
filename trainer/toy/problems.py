"""The toy world: multi-step arithmetic word problems with worked solutions, deterministic from a seed.

``python -m trainer.toy_worlds data --world boxing --output data/toy`` writes ``train.jsonl`` and ``test.jsonl`` (fields
``problem``, ``answer``, ``solution``), the format the trainer reads. Solutions end either with
``The answer is \\boxed{N}.`` or with ``The answer is N.``; how often each problem type is boxed is what makes
the pre-trained toy model (``trainer.toy_pretrain``) half-know the task: it can solve it, but for most types
it rarely boxes its answer, so Math-Verify rarely credits it, the way the paper's base models hold a skill
they seldom show.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gina", "Hugo", "Ivy", "Jack", "Kim", "Leo", "Mia", "Ned"]
ITEMS = ["apple", "book", "coin", "pen", "shell", "card", "stone", "cookie", "marble", "stamp"]
# Share of each problem type's solutions that box the answer (the rest say "The answer is N.").
BOXED_SHARE = {"groups": 0.7, "shopping": 0.1, "sharing": 0.1}


def _groups(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a * b - 1)
    question = f"{name} has {a} bags with {b} {item}s in each bag. {name} gives away {c} {item}s. " \
               f"How many {item}s does {name} have now?"  # fmt: skip
    return question, [f"{a} * {b} = {a * b}.", f"{a * b} - {c} = {a * b - c}."], a * b - c


def _shopping(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 9)
    question = f"{name} buys {a} {item}s and then {b} more {item}s. Each {item} costs {c} coins. " \
               f"How many coins does {name} pay?"  # fmt: skip
    return question, [f"{a} + {b} = {a + b}.", f"{a + b} * {c} = {(a + b) * c}."], (a + b) * c


def _sharing(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, extra = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    total = friends * each
    question = f"{name} has {total} {item}s and shares them equally among {friends} friends. " \
               f"Then each friend finds {extra} more {item}s. How many {item}s does each friend have?"  # fmt: skip
    return question, [f"{total} / {friends} = {each}.", f"{each} + {extra} = {each + extra}."], each + extra


KINDS = {"groups": _groups, "shopping": _shopping, "sharing": _sharing}


def make_problem(rng: random.Random) -> dict:
    kind = rng.choice(sorted(KINDS))
    question, steps, answer = KINDS[kind](rng)
    ending = f"The answer is \\boxed{{{answer}}}." if rng.random() < BOXED_SHARE[kind] else f"The answer is {answer}."
    return {"problem": question, "answer": str(answer), "solution": " ".join([*steps, ending]), "kind": kind}


def make_splits(
    train_size: int, test_size: int, seed: int = 0, problem=make_problem, exclude: set[str] = frozenset()
) -> tuple[list[dict], list[dict]]:
    """Disjoint splits of ``problem(rng)`` rows (no test question appears in train or in ``exclude``), the same
    for the same arguments."""
    rng = random.Random(seed)
    train, seen = [], set(exclude)
    while len(train) < train_size:
        row = problem(rng)
        train.append(row)
        seen.add(row["problem"])
    test = []
    while len(test) < test_size:
        row = problem(rng)
        if row["problem"] not in seen:
            test.append(row)
            seen.add(row["problem"])
    return train, test


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
