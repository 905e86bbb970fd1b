"""The toy world "boxing": deterministic, disjoint splits, solutions whose arithmetic and answers are right,
Math-Verify crediting exactly the boxed ones."""

import re

from trainer.rewards import math_verify_reward
from trainer.toy.worlds import BOXED_SHARE, world_splits


def test_splits_are_deterministic_and_disjoint():
    train, test = world_splits("boxing", 300, 50, seed=1)
    assert (train, test) == world_splits("boxing", 300, 50, seed=1)
    assert world_splits("boxing", 300, 50, seed=2)[0] != train
    assert not {r["problem"] for r in test} & {r["problem"] for r in train}
    assert len(test) == 50 and len({r["problem"] for r in test}) == 50


def test_every_step_and_answer_is_right():
    train, _ = world_splits("boxing", 500, 0, seed=3)
    for row in train:
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", row["solution"])
        assert len(steps) == 2, row
        for a, op, b, result in steps:
            assert eval(f"{a} {op} {b}") == int(result), row  # small integers from our own generator
        assert steps[-1][3] == row["answer"]
        endings = (f"The answer is \\boxed{{{row['answer']}}}.", f"The answer is {row['answer']}.")
        assert row["solution"].endswith(endings)


def test_boxing_follows_the_share_of_each_kind_and_math_verify_credits_only_boxed():
    train, _ = world_splits("boxing", 3000, 0, seed=4)
    for kind, share in BOXED_SHARE.items():
        rows = [r for r in train if r["kind"] == kind]
        boxed = sum("\\boxed" in r["solution"] for r in rows) / len(rows)
        assert abs(boxed - share) < 0.05, (kind, boxed)
    for row in train[:40]:
        expected = True if "\\boxed" in row["solution"] else "no_boxed"
        assert math_verify_reward(row["solution"], row["answer"]) == expected
