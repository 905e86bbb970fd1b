"""The toy worlds, deterministic from a seed: which problem kinds (``trainer.toy.problems``) each poses and how
their worked solutions end, and their disjoint train / test splits.

- **boxing**: solutions end either with ``The answer is \\boxed{N}.`` or with ``The answer is N.``; how often each
  kind is boxed is what makes the model pre-trained on them (``trainer.toy.pretrain``) half-know the task: it can
  solve it, but for most kinds it rarely boxes its answer, so Math-Verify rarely credits it, the way the paper's
  base models hold a skill they seldom show.
- **misused**: every solution is boxed, but for two of the three kinds most worked solutions take a wrong,
  plausible path: one operation is ``+`` where it should be ``*`` (``groups`` at the first step, ``shopping`` at
  the second). A model pre-trained on them (``trainer.toy.pretrain --world misused``) boxes its answers and knows
  the right path (it is among its samples), but greedily takes the wrong one: RL has to make it use a skill it
  holds, not fix a format.
- **absent**: a kind the pre-training corpus never shows in any form: ``difference`` ("how many more ... than
  ..."), solved by subtraction, an operation (and token) absent from the misused corpus. Its problems are posed
  to the same base model, so its accuracy there is near zero and RL would have to teach something new. Sharing
  the base model is what lets one world's trained vectors be tested on the other (the paper's Table 4).

``python -m trainer.toy.worlds data --world boxing|misused|absent --output DIR`` writes ``train.jsonl`` and
``test.jsonl`` (fields ``problem``, ``answer``, ``solution``, ``kind``; misused rows also ``path``: ``right`` or
``wrong``), the format the trainer reads. ``answer`` is always the right answer; ``solution`` is what
pre-training sees (train) or, in world misused, the right worked solution (test).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from trainer.toy.problems import difference, groups, sharing, shopping

WORLDS = ("boxing", "misused", "absent")
BOXING_KINDS = {"groups": partial(groups, away=True), "shopping": shopping, "sharing": sharing}
MISUSED_KINDS = {"groups": groups, "shopping": shopping, "sharing": sharing}
# Share of each boxing kind's solutions that box the answer (the rest say "The answer is N.").
BOXED_SHARE = {"groups": 0.7, "shopping": 0.1, "sharing": 0.1}
# Share of each misused kind's pre-training solutions that take the wrong path.
WRONG_SHARE = {"groups": 0.6, "shopping": 0.6, "sharing": 0.0}


def _boxed(steps: list[str], result: int) -> str:
    return " ".join([*steps, f"The answer is \\boxed{{{result}}}."])


def boxing_problem(rng: random.Random) -> dict:
    """A boxing-world problem whose solution is boxed with its kind's ``BOXED_SHARE``."""
    kind = rng.choice(sorted(BOXING_KINDS))
    question, steps, _, answer = BOXING_KINDS[kind](rng)
    ending = f"The answer is \\boxed{{{answer}}}." if rng.random() < BOXED_SHARE[kind] else f"The answer is {answer}."
    return {"problem": question, "answer": str(answer), "solution": " ".join([*steps, ending]), "kind": kind}


def _misused_row(rng: random.Random, kind: str, wrong: bool) -> dict:
    question, steps, result, answer = MISUSED_KINDS[kind](rng, wrong)
    return {"problem": question, "answer": str(answer), "solution": _boxed(steps, result), "kind": kind,
            "path": "wrong" if wrong else "right"}  # fmt: skip


def misused_problem(rng: random.Random) -> dict:
    """A misused-world problem whose solution takes the wrong path with its kind's ``WRONG_SHARE``."""
    kind = rng.choice(sorted(MISUSED_KINDS))
    return _misused_row(rng, kind, rng.random() < WRONG_SHARE[kind])


def right_misused_problem(rng: random.Random) -> dict:
    """The same problems with the right worked solution (the held-out split's)."""
    return _misused_row(rng, rng.choice(sorted(MISUSED_KINDS)), False)


def absent_problem(rng: random.Random) -> dict:
    question, steps, result, answer = difference(rng)
    return {"problem": question, "answer": str(answer), "solution": _boxed(steps, result), "kind": "difference"}


def make_splits(
    problem: Callable[[random.Random], dict],
    train_size: int,
    test_size: int,
    seed: int = 0,
    exclude: set[str] = frozenset(),
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


def world_splits(world: str, train_size: int, test_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and test splits of ``world`` (one of ``WORLDS``), the same for the same arguments."""
    if world == "boxing":
        return make_splits(boxing_problem, train_size, test_size, seed)
    if world == "misused":
        train, _ = make_splits(misused_problem, train_size, 0, seed)
        # The held-out split: right solutions, none of whose questions is in train.
        _, test = make_splits(right_misused_problem, 0, test_size, seed + 1, exclude={r["problem"] for r in train})
        return train, test
    if world == "absent":
        return make_splits(absent_problem, train_size, test_size, seed)
    raise ValueError(f"unknown toy world {world!r}; expected one of {', '.join(WORLDS)}")


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.toy.worlds", description=__doc__,
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
