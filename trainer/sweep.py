"""A sweep's checks and its own outputs: which options its runs must share, and the table and curves of all
its runs (``output_dir/sweep.md``, ``sweep.json``, ``curves.png``)."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from trainer.config import SWEEPABLE, SweepRun, TrainConfig
from trainer.curves import plot_curves, read_metrics

PER_RUN = (*SWEEPABLE, "output_dir")


def check_sweep(configs: list[TrainConfig]) -> None:
    """Refuse runs that cannot share one engine and one learner: anything but the sweepable options differing,
    or a baseline (the sweep trains steering vectors; LoRA and Full-Tune runs train one at a time)."""
    if configs[0].trainable != "steering":
        raise ValueError(f"sweep: trainable {configs[0].trainable!r}; a sweep trains steering vectors (run "
                         "LoRA and Full-Tune baselines one at a time)")  # fmt: skip
    first = dataclasses.asdict(configs[0])
    for config in configs[1:]:
        for key, value in dataclasses.asdict(config).items():
            if key not in PER_RUN and value != first[key]:
                raise ValueError(f"sweep: the runs differ in {key} ({first[key]!r} vs {value!r}), which they must "
                                 f"share; they may differ only in {list(SWEEPABLE)}")  # fmt: skip


def write_sweep_summary(runs: list[SweepRun], summaries: list[dict], last: int = 10) -> Path:
    """The sweep's results table (one row per run: its values, held-out accuracy before and after, the mean
    training reward of the last ``last`` steps) as ``sweep.md`` and ``sweep.json``, and every run's curves in
    one ``curves.png``, in the sweep's ``output_dir``."""
    root = Path(runs[0].config.output_dir).parent
    keys = list(runs[0].overrides)
    rows = []
    for run, summary in zip(runs, summaries, strict=True):
        metrics = read_metrics(run.config.output_dir)
        rows.append({"run": run.name, **run.overrides, "eval_accuracy_before": summary.get("eval_accuracy_before"),
                     "eval_accuracy_after": summary.get("eval_accuracy_after"),
                     "reward_last_steps": statistics.fmean(m["reward_mean"] for m in metrics[-last:]),
                     "output": summary.get("output")})  # fmt: skip
    (root / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    header = [*keys, "held-out before (%)", "held-out after (%)", f"reward, last {last} steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(keys) + "---:|---:|---:|"]
    for row in rows:
        cells = [*(str(row[k]) for k in keys), _percent(row["eval_accuracy_before"]),
                 _percent(row["eval_accuracy_after"]), f"{row['reward_last_steps']:.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    (root / "sweep.md").write_text("\n".join(lines) + "\n")
    plot_curves({run.name: [run.config.output_dir] for run in runs}, root / "curves.png", title=f"Sweep {root}")
    return root / "sweep.md"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"
