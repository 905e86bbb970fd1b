"""The toy worlds "misused" and "absent": deterministic, disjoint splits; misused solutions all boxed, their wrong
path in the stated share of each kind with arithmetic that is right for the path taken; the absent world's
operation nowhere in the misused corpus; the shipped fixtures (all three worlds') are what the generators write."""

import itertools
import json
import re
from pathlib import Path

import pytest

from trainer.rewards import math_verify_reward
from trainer.toy.worlds import WRONG_SHARE, world_splits, write_jsonl

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")
RIGHT_OPERATIONS = {"groups": ["*", "+"], "shopping": ["+", "*"], "sharing": ["/", "+"], "difference": ["-"]}


@pytest.mark.parametrize("world", ["misused", "absent"])
def test_splits_are_deterministic_and_disjoint(world):
    train, test = world_splits(world, 400, 60, seed=1)
    assert (train, test) == world_splits(world, 400, 60, seed=1)
    assert world_splits(world, 400, 60, seed=2)[0] != train
    assert not {r["problem"] for r in test} & {r["problem"] for r in train}
    assert len(test) == 60 and len({r["problem"] for r in test}) == 60


def _steps(row: dict) -> list[tuple[str, str, str, str]]:
    steps = STEP.findall(row["solution"])
    for a, op, b, result in steps:
        assert eval(f"{a} {op} {b}") == int(result), row  # small integers from our own generator
    return steps


def test_misused_paths_follow_their_share_and_only_the_right_path_earns_the_reward():
    train, test = world_splits("misused", 3000, 200, seed=4)
    for kind, share in WRONG_SHARE.items():
        rows = [r for r in train if r["kind"] == kind]
        wrong = sum(r["path"] == "wrong" for r in rows) / len(rows)
        assert abs(wrong - share) < 0.05, (kind, wrong)
    assert all(r["path"] == "right" for r in test)  # the held-out split shows the right solutions
    rewarded = {"right": 0, "wrong": 0}
    for row in train + test:
        steps = _steps(row)
        operations = [op for _, op, _, _ in steps]
        if row["path"] == "right":
            assert operations == RIGHT_OPERATIONS[row["kind"]] and steps[-1][3] == row["answer"], row
        else:  # one operation is + where the right path has *
            right = RIGHT_OPERATIONS[row["kind"]]
            differs = [i for i, pair in enumerate(zip(operations, right, strict=True)) if pair[0] != pair[1]]
            assert len(differs) == 1 and operations[differs[0]] == "+", row
        assert row["solution"].endswith(f"The answer is \\boxed{{{steps[-1][3]}}}.")  # every solution boxed
        rewarded[row["path"]] += math_verify_reward(row["solution"], row["answer"]) is True
    right_rows = sum(r["path"] == "right" for r in train + test)
    assert rewarded["right"] == right_rows
    assert rewarded["wrong"] < 0.02 * (len(train) + len(test) - right_rows)  # only where both paths coincide


def test_the_absent_operation_is_nowhere_in_the_misused_corpus():
    misused, _ = world_splits("misused", 3000, 0, seed=5)
    assert not any("-" in r["problem"] + r["solution"] or " than " in r["problem"] for r in misused)
    train, test = world_splits("absent", 300, 50, seed=5)
    for row in train + test:
        assert [op for _, op, _, _ in _steps(row)] == ["-"] and 1 <= int(row["answer"]) <= 9, row
        assert math_verify_reward(row["solution"], row["answer"]) is True


def _first_difference(written: bytes, shipped: bytes) -> str:
    pairs = enumerate(itertools.zip_longest(written.splitlines(), shipped.splitlines()), 1)
    line, (ours, theirs) = next((line, pair) for line, pair in pairs if pair[0] != pair[1])
    return f"line {line}: the generator writes {ours!r}, the fixture has {theirs!r}"


@pytest.mark.parametrize("world", ["boxing", "misused", "absent"])
def test_the_shipped_fixtures_are_the_generators_output_byte_for_byte(world, tmp_path):
    """A change to a kind's draws, their order or its wording shows here. Boxing's fixture is toy-model, whose
    pretrain.json names no world (boxing is the default)."""
    fixture = FIXTURES / ("toy-model" if world == "boxing" else f"toy-{world}")
    record = json.loads((fixture / "world.json" if world == "absent" else fixture / "pretrain.json").read_text())
    assert record.get("world", "boxing") == world
    train, test = world_splits(world, record["train_size"], record["test_size"], record["seed"])
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        write_jsonl(rows, tmp_path / name)
        written, shipped = (tmp_path / name).read_bytes(), (fixture / "data" / name).read_bytes()
        if written != shipped:
            pytest.fail(f"{fixture.name}/data/{name}, {_first_difference(written, shipped)}")
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}


def test_the_absent_world_poses_its_problems_to_the_misused_worlds_model():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (FIXTURES / "toy-absent" / name).resolve() == (FIXTURES / "toy-misused" / name).resolve()
