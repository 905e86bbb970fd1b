"""Training curves: reward and held-out accuracy against step, for one run or groups of runs (seeds).

``python -m trainer.curves RUN_DIR [RUN_DIR ...] [-o curves.png]`` plots runs side by side;
``LABEL=DIR1,DIR2,...`` groups seeds under one label (their mean, with the min-max band). ``trainer.rloo``
writes ``curves.png`` into its output directory at the end of a run.

Reads a run's ``metrics.jsonl`` (reward every step, ``eval_accuracy`` at eval steps) and ``summary.json``
(held-out accuracy before and after training).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

SUMMARY_FILE = "summary.json"


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a trainer.rloo output directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summary(run_dir) -> dict:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run_curves(run_dir) -> dict:
    """``steps``/``reward`` every step; ``eval_steps``/``eval_accuracy`` at step 0, each eval step and the end."""
    records = read_metrics(run_dir)
    summary = read_summary(run_dir)
    evals = {r["step"]: r["eval_accuracy"] for r in records if "eval_accuracy" in r}
    if "eval_accuracy_before" in summary:
        evals[0] = summary["eval_accuracy_before"]
    if "eval_accuracy_after" in summary and records:
        evals[records[-1]["step"]] = summary["eval_accuracy_after"]
    eval_steps = sorted(evals)
    return {
        "steps": [r["step"] for r in records],
        "reward": [r["reward_mean"] for r in records],
        "eval_steps": eval_steps,
        "eval_accuracy": [evals[s] for s in eval_steps],
    }


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (the first points average what there is)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (sums[index] - sums[start]) / (index - start)


def _stack(runs: list[dict], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps every run of the group has, and the runs' values there (rows: runs)."""
    common = sorted(set.intersection(*(set(run[x]) for run in runs)))
    rows = [[dict(zip(run[x], run[y], strict=True))[s] for s in common] for run in runs]
    return np.array(common), np.array(rows, dtype=np.float64).reshape(len(runs), len(common))


def plot_curves(groups: dict[str, list], path, smooth: int = 5, title: str | None = None) -> Path:
    """One line per label (mean over its runs, min-max band when there are several): reward, then accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (reward_ax, eval_ax) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    colors = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for color, (label, run_dirs) in zip(colors, groups.items(), strict=False):
        runs = [run_curves(d) for d in run_dirs]
        steps, rewards = _stack(runs, "steps", "reward")
        mean = rewards.mean(axis=0)
        reward_ax.plot(steps, mean, color=color, alpha=0.25, linewidth=0.8)
        reward_ax.plot(steps, moving_average(mean, smooth), color=color, label=label)
        if len(runs) > 1:
            smoothed = np.stack([moving_average(r, smooth) for r in rewards])
            reward_ax.fill_between(steps, smoothed.min(axis=0), smoothed.max(axis=0), color=color, alpha=0.15)
        steps, accuracy = _stack(runs, "eval_steps", "eval_accuracy")
        if len(steps):
            eval_ax.plot(steps, 100 * accuracy.mean(axis=0), marker="o", color=color, label=label)
            if len(runs) > 1:
                eval_ax.fill_between(steps, 100 * accuracy.min(axis=0), 100 * accuracy.max(axis=0), color=color,
                                     alpha=0.15)  # fmt: skip
    reward_ax.set(xlabel="step", ylabel="mean reward", title=f"Training reward (moving average of {smooth})")
    eval_ax.set(xlabel="step", ylabel="accuracy (%)", title="Held-out accuracy (greedy)", ylim=(0, 100))
    for ax in (reward_ax, eval_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _parse_groups(items: list[str]) -> dict[str, list[str]]:
    """RUN_DIR or LABEL=DIR1,DIR2,... A sweep's run folders hold '=' and ',' (``lr=0.1,seed=0``): an item that is a
    folder is one run, and a comma joins two pieces where together they name a folder."""
    groups = {}
    for item in items:
        if Path(item).is_dir() or "=" not in item:
            groups[Path(item).name] = [item]
            continue
        label, _, listed = item.partition("=")
        pieces, dirs = [p for p in listed.split(",") if p], []
        while pieces:
            longest = next((n for n in range(len(pieces), 0, -1) if Path(",".join(pieces[:n])).is_dir()), 1)
            dirs.append(",".join(pieces[:longest]))
            del pieces[:longest]
        groups[label] = dirs
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR, or LABEL=DIR1,DIR2 to average seeds")
    parser.add_argument("-o", "--output", default="curves.png")
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window for the reward (steps)")
    parser.add_argument("--title")
    args = parser.parse_args(argv)
    try:
        path = plot_curves(_parse_groups(args.runs), args.output, args.smooth, args.title)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
