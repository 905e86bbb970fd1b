"""trainer/rewards.py: boxed-answer extraction, the Math-Verify reward, and the killable worker pool."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.rewards import STATUSES, RewardPool, Score, last_boxed, math_verify_reward

MARKER_FN = "slow_rewards:marker_reward"  # tests/helpers/slow_rewards.py, on sys.path through conftest


# -- last_boxed ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2}, finally \\boxed{3}", "3"),
        ("\\boxed{\\boxed{1}+1}", "\\boxed{1}+1"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),
        ("the answer is \\boxed 5 apples", "5"),
        ("$\\boxed 5$", "5"),
        ("\\fbox{42}", "42"),
        ("\\boxed {7}", "7"),
        ("\\boxed{1} and then \\boxed{\\frac{1}{2}", None),
        ("\\boxed", None),
        ("no box here, 42", None),
        ("\\boxedanswer{3}", None),
        ("", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# -- math_verify_reward --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("so $\\boxed{0.5}$", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{72.0}", "72"),
        ("\\boxed{72}", 72),
        ("\\boxed{1,000}", "1000"),
        ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}"),
        ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
        ("\\boxed{(1, 2]}", "(1,2]"),
        ("\\boxed{x = 5}", "x=5"),
        ("first \\boxed{3}, no wait: \\boxed{4}", "4"),
        ("\\boxed{72}", "$72$"),
        ("\\boxed{18.90}", "\\$18.90"),  # MATH's currency: an escaped dollar is not a delimiter
        ("\\boxed{\\$18.90}", "\\$18.90"),
        ("\\boxed{1000}", "\\$1,\\!000"),
    ],
)
def test_equivalent_forms_are_correct(completion, gold):
    assert math_verify_reward(completion, gold) is True


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("\\boxed{71}", "72"),
        ("\\boxed{4}, no wait: \\boxed{3}", "4"),
        ("\\boxed{2}", "2\\sqrt{3}"),  # a plain parse of the gold would read 2
        ("\\boxed{(1, 2)}", "(1,2]"),
    ],
)
def test_wrong_answers_are_false(completion, gold):
    assert math_verify_reward(completion, gold) is False


@pytest.mark.parametrize(
    ("completion", "gold", "status"),
    [
        ("the answer is 72", "72", "no_boxed"),
        ("", "72", "no_boxed"),
        (None, "72", "no_boxed"),
        ("\\boxed{\\frac{1}{2}", "0.5", "no_boxed"),
        ("\\boxed{@@@}", "72", "parse_failure"),
        ("\\boxed{}", "72", "parse_failure"),
        ("\\boxed{72}", "", "gold_parse_failure"),
        ("\\boxed{72}", None, "gold_parse_failure"),
        ("\\boxed{72}", "\\frac{", "gold_parse_failure"),
    ],
)
def test_failure_statuses(completion, gold, status):
    assert math_verify_reward(completion, gold) == status


# -- RewardPool with Math-Verify -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def math_pool():
    with RewardPool(mode="binary", workers=2, timeout_s=30.0) as pool:
        yield pool


def test_binary_and_signed_rewards():
    completions = ["\\boxed{0.5}", "\\boxed{3}", "no box", "\\boxed{72}"]
    golds = ["\\frac{1}{2}", "4", "1", ""]
    statuses = ["correct", "wrong", "no_boxed", "gold_parse_failure"]
    for mode, rewards in (("binary", [1.0, 0.0, 0.0, 0.0]), ("signed", [1.0, -1.0, -1.0, -1.0])):
        with RewardPool(mode=mode, workers=2) as pool:
            assert pool.score(completions, golds) == [Score(r, s) for r, s in zip(rewards, statuses, strict=True)]


def test_order_is_preserved_across_workers_and_counts_accumulate(math_pool):
    golds = [str(i) for i in range(40)]
    completions = [f"\\boxed{{{i if i % 3 else i + 1}}}" for i in range(40)]
    before = math_pool.counts.copy()
    scores = math_pool.score(completions, golds)
    assert [s.status for s in scores] == ["wrong" if i % 3 == 0 else "correct" for i in range(40)]
    assert math_pool.counts - before == {"correct": 26, "wrong": 14}


def test_garbage_is_scored_not_crashed(math_pool):
    scores = math_pool.score(["", None, 123, "\\boxed{", "\\boxed{}" * 1000, "x" * 100_000], ["1"] * 6)
    assert [s.status for s in scores] == ["no_boxed"] * 4 + ["parse_failure", "no_boxed"]
    assert all(s.reward == 0.0 for s in scores)
    assert math_pool.score([], []) == []


def test_mismatched_lengths_raise(math_pool):
    with pytest.raises(ValueError, match="2 completions but 1 golds"):
        math_pool.score(["a", "b"], ["a"])


# -- RewardPool failure handling -----------------------------------------------------------------------------------


def worker_pid(pool: RewardPool) -> float:
    """The process id of a worker (with one worker: the worker), asked through the marker function."""
    return pool.score(["PID"], [""])[0].reward


def test_hang_becomes_timeout_and_others_are_scored():
    timeout_s = 1.0
    with RewardPool(MARKER_FN, workers=2, timeout_s=timeout_s) as pool:
        pool.score(["warm"], ["warm"])  # waits for a worker to start: startup is not part of the timed call
        start = time.monotonic()
        scores = pool.score(["a", "HANG", "b", "c", "d"], ["a", "", "x", "c", "d"])
        elapsed = time.monotonic() - start
        assert [s.status for s in scores] == ["correct", "timeout", "wrong", "correct", "correct"]
        assert scores[1].reward == 0.0
        assert timeout_s <= elapsed < timeout_s + 3.0
        assert pool.score(["e", "f"], ["e", ""]) == [Score(1.0, "correct"), Score(0.0, "wrong")]
        assert pool.counts == {"correct": 5, "wrong": 2, "timeout": 1}


def test_workers_do_not_run_the_parents_main_module_again(tmp_path):
    """``python -m trainer.rloo`` spawns the workers: they must not import torch, the op and the learner again."""
    (tmp_path / "heavy_main.py").write_text(
        "import torch  # what trainer.rloo's imports would cost each worker\n"
        "from trainer.rewards import RewardPool\n"
        "if __name__ == '__main__':\n"
        f"    with RewardPool({MARKER_FN!r}, workers=1) as pool:\n"
        "        print([s.status for s in pool.score(['IMPORTED:torch', 'IMPORTED:slow_rewards'], ['', ''])])\n"
    )
    helpers = Path(__file__).resolve().parents[1] / "helpers"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(helpers), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "heavy_main"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "['wrong', 'correct']"  # no torch; the reward function's module


def test_timed_out_worker_is_replaced():
    with RewardPool(MARKER_FN, mode="signed", workers=1, timeout_s=1.0) as pool:
        pid = worker_pid(pool)
        assert pool.score(["HANG", "a"], ["", "a"]) == [Score(-1.0, "timeout"), Score(1.0, "correct")]
        assert worker_pid(pool) != pid


def test_exception_is_error_and_worker_survives():
    with RewardPool(MARKER_FN, workers=1, timeout_s=5.0) as pool:
        pid = worker_pid(pool)
        assert pool.score(["RAISE", "a"], ["", "a"]) == [Score(0.0, "error"), Score(1.0, "correct")]
        assert worker_pid(pool) == pid


def test_dead_worker_is_error_and_replaced():
    with RewardPool(MARKER_FN, workers=1, timeout_s=5.0) as pool:
        pid = worker_pid(pool)
        assert pool.score(["EXIT", "a"], ["", "a"]) == [Score(0.0, "error"), Score(1.0, "correct")]
        assert worker_pid(pool) != pid
        assert pool.counts["error"] == 1


def test_custom_results_are_interpreted():
    with RewardPool(MARKER_FN, mode="signed", workers=1) as pool:
        completions = ["FLOAT:1", "FLOAT:0.25", "FLOAT:nan", "STATUS:correct", "STATUS:no_boxed", "STATUS:bogus"]
        assert pool.score(completions, [""] * 6) == [
            Score(1.0, "correct"),
            Score(0.25, "wrong"),
            Score(-1.0, "error"),
            Score(1.0, "correct"),
            Score(-1.0, "no_boxed"),
            Score(-1.0, "error"),
        ]


def test_each_task_scores_under_its_own_mode():
    """A sweep's runs may differ in reward mode: one call, each task's failures and successes in its mode, timeouts
    and worker deaths included."""
    with RewardPool(MARKER_FN, mode="binary", workers=1, timeout_s=1.0) as pool:
        completions = ["STATUS:correct", "STATUS:no_boxed", "FLOAT:0.25", "HANG", "EXIT", "STATUS:correct"]
        modes = ["signed", "signed", "signed", "signed", "signed", "binary"]
        assert pool.score(completions, [""] * 6, modes) == [
            Score(1.0, "correct"),
            Score(-1.0, "no_boxed"),
            Score(0.25, "wrong"),
            Score(-1.0, "timeout"),
            Score(-1.0, "error"),
            Score(1.0, "correct"),
        ]
        assert pool.score(["STATUS:wrong"], [""]) == [Score(0.0, "wrong")]  # no modes: the pool's
        with pytest.raises(ValueError, match="modes"):
            pool.score(["a"], ["a"], ["unsigned"])


def test_close_is_idempotent_and_score_after_close_raises():
    pool = RewardPool(MARKER_FN, workers=1)
    processes = [worker.process for worker in pool._workers]
    pool.close()
    pool.close()
    assert not any(process.is_alive() for process in processes)
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(["a"], ["a"])


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz:fn", "'no_such_module_xyz:fn' cannot be imported"),
        ("slow_rewards:missing", "'slow_rewards:missing' cannot be imported"),
        ("slow_rewards:not_callable", "'slow_rewards:not_callable' is not callable"),
        ("slow_rewards.marker_reward", "'slow_rewards.marker_reward' is not an import path"),
    ],
)
def test_bad_reward_fn_path_raises(path, message):
    with pytest.raises(ValueError, match=message):
        RewardPool(path)


def test_bad_mode_raises():
    with pytest.raises(ValueError, match="'ternary'"):
        RewardPool(MARKER_FN, mode="ternary")


def test_statuses_are_the_public_list():
    assert STATUSES == ("correct", "wrong", "no_boxed", "parse_failure", "gold_parse_failure", "timeout", "error")


def test_interrupted_call_leaves_no_stale_answers():
    """A score() call interrupted while a worker is busy: the next call must not receive that worker's answer."""
    with RewardPool(MARKER_FN, workers=1, timeout_s=5.0) as pool:
        pool.score(["warm"], ["warm"])
        pool._dispatch(collections.deque([0]), ["a"], ["a"])  # what an interrupted call leaves behind
        assert pool.score(["b"], ["x"]) == [Score(0.0, "wrong")]
