"""Reward functions that misbehave on marker completions, for RewardPool tests (imported by spawned workers)."""

from __future__ import annotations

import os
import sys
import time


def marker_reward(completion: str, gold: str) -> bool | float | str:
    """completion == gold, except: "HANG" sleeps forever, "RAISE" raises, "EXIT" kills the worker, "PID" answers
    the worker's process id (as a float), "STATUS:<s>" answers the string <s>, "FLOAT:<x>" answers float(<x>),
    "IMPORTED:<module>" whether the worker has imported <module>."""
    if completion == "HANG":
        while True:
            time.sleep(60)
    if completion == "RAISE":
        raise RuntimeError("marker says raise")
    if completion == "EXIT":
        os._exit(3)
    if completion == "PID":
        return float(os.getpid())
    if completion.startswith("STATUS:"):
        return completion.removeprefix("STATUS:")
    if completion.startswith("IMPORTED:"):
        return completion.removeprefix("IMPORTED:") in sys.modules
    if completion.startswith("FLOAT:"):
        return float(completion.removeprefix("FLOAT:"))
    return completion == gold


not_callable = 42
