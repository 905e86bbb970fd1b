"""Toy worlds where the paper's claim could fail, deterministic from a seed (``trainer.toy`` is the first, "boxing").

- **misused**: every solution is boxed, but for two of the three problem kinds most worked solutions take a
  wrong, plausible path: one operation is ``+`` where it should be ``*`` (``groups`` at the first step,
  ``shopping`` at the second). A model pre-trained on them (``trainer.toy_pretrain --world misused``) boxes its
  answers and knows the right path (it is among its samples), but greedily takes the wrong one: RL has to make it
  use a skill it holds, not fix a format.
- **absent**: a kind the pre-training corpus never shows in any form: ``difference`` ("how many more ... than
  ..."), solved by subtraction, an operation (and token) absent from the misused corpus. Its problems are posed
  to the same base model, so its accuracy there is near zero and RL would have to teach something new. Sharing
  the base model is what lets one world's trained vectors be tested on the other (the paper's Table 4).

``python -m trainer.toy_worlds data --world boxing|misused|absent --output DIR`` writes ``train.jsonl`` and
``test.jsonl`` (fields ``problem``, ``answer``, ``solution``, ``kind``; misused rows also ``path``: ``right`` or
``wrong``). ``answer`` is always the right answer; ``solution`` is what pre-training sees (train) or the right
worked solution (test).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from trainer.toy import ITEMS, NAMES, make_splits, write_jsonl

# Share of each misused kind's pre-training solutions that take the wrong path.
WRONG_SHARE = {"groups": 0.6, "shopping": 0.6, "sharing": 0.0}


def _boxed(steps: list[str], answer: int) -> str:
    return " ".join([*steps, f"The answer is \\boxed{{{answer}}}."])


def _groups(rng: random.Random, wrong: bool) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    question = f"{name} has {a} bags with {b} {item}s in each bag. {name} finds {c} more {item}s. " \
               f"How many {item}s does {name} have now?"  # fmt: skip
    first = a + b if wrong else a * b
    steps = [f"{a} {'+' if wrong else '*'} {b} = {first}.", f"{first} + {c} = {first + c}."]
    return question, _boxed(steps, first + c), a * b + c


def _shopping(rng: random.Random, wrong: bool) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 9)
    question = f"{name} buys {a} {item}s and then {b} more {item}s. Each {item} costs {c} coins. " \
               f"How many coins does {name} pay?"  # fmt: skip
    total = a + b + c if wrong else (a + b) * c
    steps = [f"{a} + {b} = {a + b}.", f"{a + b} {'+' if wrong else '*'} {c} = {total}."]
    return question, _boxed(steps, total), (a + b) * c


def _sharing(rng: random.Random, wrong: bool) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, extra = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    question = f"{name} has {friends * each} {item}s and shares them equally among {friends} friends. " \
               f"Then each friend finds {extra} more {item}s. How many {item}s does each friend have?"  # fmt: skip
    steps = [f"{friends * each} / {friends} = {each}.", f"{each} + {extra} = {each + extra}."]
    return question, _boxed(steps, each + extra), each + extra


MISUSED_KINDS = {"groups": _groups, "shopping": _shopping, "sharing": _sharing}


def _misused_row(rng: random.Random, kind: str, wrong: bool) -> dict:
    question, solution, answer = MISUSED_KINDS[kind](rng, wrong)
    return {"problem": question, "answer": str(answer), "solution": solution, "kind": kind,
            "path": "wrong" if wrong else "right"}  # fmt: skip


def misused_problem(rng: random.Random) -> dict:
    """A misused-world problem whose solution takes the wrong path with its kind's ``WRONG_SHARE``."""
    kind = rng.choice(sorted(MISUSED_KINDS))
    return _misused_row(rng, kind, rng.random() < WRONG_SHARE[kind])


def right_misused_problem(rng: random.Random) -> dict:
    """The same problems with the right worked solution (the held-out split's)."""
    return _misused_row(rng, rng.choice(sorted(MISUSED_KINDS)), False)


def absent_problem(rng: random.Random) -> dict:
    first, second, item = *rng.sample(NAMES, 2), rng.choice(ITEMS)
    b, difference = rng.randint(2, 30), rng.randint(1, 9)
    a = b + difference
    question = f"{first} has {a} {item}s and {second} has {b} {item}s. " \
               f"How many more {item}s does {first} have than {second}?"  # fmt: skip
    return {"problem": question, "answer": str(difference), "solution": _boxed([f"{a} - {b} = {difference}."],
            difference), "kind": "difference"}  # fmt: skip


WORLDS = ("boxing", "misused", "absent")


def world_splits(world: str, train_size: int, test_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and test splits of ``world`` (one of ``WORLDS``), the same for the same arguments."""
    if world == "boxing":
        return make_splits(train_size, test_size, seed)
    if world == "misused":
        train, _ = make_splits(train_size, 0, seed, misused_problem)
        # The held-out split: right solutions, none of whose questions is in train.
        _, test = make_splits(0, test_size, seed + 1, right_misused_problem, exclude={r["problem"] for r in train})
        return train, test
    if world == "absent":
        return make_splits(train_size, test_size, seed, absent_problem)
    raise ValueError(f"unknown toy world {world!r}; expected one of {', '.join(WORLDS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.toy_worlds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write train.jsonl and test.jsonl")
    data.add_argument("--world", choices=WORLDS, required=True)
    data.add_argument("--output", required=True)
    data.add_argument("--train-size", type=int, default=20000)
    data.add_argument("--test-size", type=int, default=500)
    data.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, test = world_splits(args.world, args.train_size, args.test_size, args.seed)
    write_jsonl(train, Path(args.output) / "train.jsonl")
    write_jsonl(test, Path(args.output) / "test.jsonl")
    print(f"wrote {len(train)} train and {len(test)} test problems of world {args.world} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
