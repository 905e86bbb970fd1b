"""The same steering runs two ways: one ``trainer.rloo`` process per run, and all of them as one sweep (one
engine, one learner): ``python -m benchmarks.reproduce_toy --sweep-engine`` (4 learning rates x 3 seeds).

Reports the wall time of each way (whole processes: start, engine start, evaluation, training), where it goes
(the steps' generate and learn, summed), the peak memory of a way's largest moment (the resident memory of the
trainer and every process it started, sampled), and the held-out table of each way side by side.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from tqdm.auto import tqdm

from benchmarks.results import record
from trainer.curves import read_metrics, read_summary

LRS = "0.025,0.05,0.1,0.2"
# each row's own formats: seconds and GiB, or the ratio row's x
COST_COLUMNS = [
    ("way", "Way", ""),
    ("runs", "Runs", ""),
    ("wall_s", "Wall time (s)", "@time_format"),
    ("generate_s", "generate (s)", "@time_format"),
    ("learn_s", "learn (s)", "@time_format"),
    ("other_s", "other: start, eval, score (s)", "@time_format"),
    ("peak_gib", "Peak memory (GiB)", "@memory_format"),
]
SECONDS_AND_GIB = {"time_format": ".0f", "memory_format": ".2f"}
RATIOS = {"time_format": ".2f}x", "memory_format": ".2f}x"}
HELD_OUT_COLUMNS = [
    ("lr", "lr", ""),
    ("one_at_a_time", "One at a time: held-out (%)", ""),
    ("sweep", "One sweep: held-out (%)", ""),
    ("largest_gap", "Largest per-seed gap (points)", ".1f"),
]


def run_measured(command: list[str], log: Path) -> dict:
    """Run ``command``; its wall time and the peak resident memory of its process tree (sampled every 0.2 s)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        peak = _PeakMemory(process.pid)
        code = process.wait()
        peak.stop()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({code}); see {log}")
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_bytes": peak.bytes}


class _PeakMemory:
    def __init__(self, pid: int):
        self.bytes, self._done = 0, threading.Event()
        self._root = psutil.Process(pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            try:
                tree = [self._root, *self._root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for process in tree:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.bytes = max(self.bytes, total)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def compare(args, train_command) -> None:
    """Train every (lr, seed) of steering one run at a time, then all as one sweep; record both tables."""
    given = any(item.startswith("steering=") for item in args.lr)
    lrs, seeds = args.lrs["steering"] if given else LRS.split(","), args.seeds
    root = args.output / "sweep-engine"
    alone, measured = {}, []
    bar = tqdm(total=len(lrs) * len(seeds) + 1, desc="runs", unit="run")
    for lr in lrs:
        for seed in seeds:
            directory = root / "one-at-a-time" / f"learning_rate={lr},seed={seed}"
            bar.set_postfix_str(f"alone lr={lr} seed={seed}")
            command = train_command(args.config, "steering", lr, seed, directory, args.extra)
            measured.append(_finished_or_run(directory, command))
            alone[(lr, seed)] = directory
            bar.update(1)
    sweep_root = root / "sweep"
    bar.set_postfix_str(f"one sweep of {len(alone)} runs")
    command = [sys.executable, "-m", "trainer.rloo", "--config", args.config, "--trainable", "steering",
               "--output_dir", str(sweep_root), "--sweep", f"learning_rate={','.join(lrs)}",
               "--sweep", f"seed={','.join(map(str, seeds))}", *args.extra]  # fmt: skip
    swept_cost = _finished_or_run(sweep_root, command, marker=sweep_root / "sweep.json")
    bar.update(1)
    bar.close()
    by_values = {(r["learning_rate"], r["seed"]): r["run"] for r in json.loads((sweep_root / "sweep.json").read_text())}
    swept = {(lr, seed): sweep_root / by_values[(float(lr), seed)] for lr in lrs for seed in seeds}

    one = _cost("one run at a time", alone.values(), sum(m["wall_s"] for m in measured),
                max(m["peak_bytes"] for m in measured))  # fmt: skip
    together = _cost("one sweep", [next(iter(swept.values()))], swept_cost["wall_s"], swept_cost["peak_bytes"])
    together["runs"] = one["runs"] = len(alone)
    ratio = {"way": "ratio (one at a time / sweep; memory: sweep / one run)", "runs": "", **RATIOS,
             **{k: one[k] / together[k] for k in ("wall_s", "generate_s", "learn_s", "other_s")},
             "peak_gib": together["peak_gib"] / one["peak_gib"]}  # fmt: skip
    title = (f"{len(alone)} steering runs ({len(lrs)} learning rates x {len(seeds)} seeds) of {args.config}, "
             "whole processes; generate and learn: the steps' spans summed (the sweep's once: its runs share "
             "them); peak memory: a way's largest moment, trainer and engine processes together (one at a time: "
             "the largest single run); the ratio row's memory is the sweep's over one run's")  # fmt: skip
    record(f"toy_sweep_engine_{args.world}", title, COST_COLUMNS, [one, together, ratio])
    rows = [_held_out_row(lr, [alone[(lr, s)] for s in seeds], [swept[(lr, s)] for s in seeds]) for lr in lrs]
    record(f"toy_sweep_engine_{args.world}_held_out",
           f"Held-out greedy accuracy after training, mean ± std over seeds {', '.join(map(str, seeds))}, each way",
           HELD_OUT_COLUMNS, rows)  # fmt: skip
    print(json.dumps({"one_at_a_time": one, "sweep": together, "ratio": ratio}, indent=1))


def _finished_or_run(directory: Path, command: list[str], marker: Path | None = None) -> dict:
    """Measure ``command``, unless a finished run with its measurements is already there."""
    cost_file = directory / "cost.json"
    finished = marker.exists() if marker is not None else "eval_accuracy_after" in read_summary(directory)
    if cost_file.exists() and finished:
        return json.loads(cost_file.read_text())
    cost = run_measured(command, directory / "train.log")
    cost_file.write_text(json.dumps(cost) + "\n")
    return cost


def _cost(way: str, directories, wall_s: float, peak_bytes: int) -> dict:
    spans = {"generate": 0.0, "learn": 0.0}
    for directory in directories:
        for metrics in read_metrics(directory):
            for key in spans:
                spans[key] += metrics["time"][key]
    return {"way": way, **SECONDS_AND_GIB, "wall_s": wall_s, "generate_s": spans["generate"], "learn_s": spans["learn"],
            "other_s": wall_s - spans["generate"] - spans["learn"], "peak_gib": peak_bytes / 2**30}  # fmt: skip


def _held_out_row(lr: str, alone: list[Path], swept: list[Path]) -> dict:
    a = [read_summary(d)["eval_accuracy_after"] for d in alone]
    b = [read_summary(d)["eval_accuracy_after"] for d in swept]
    gap = 100 * max(abs(x - y) for x, y in zip(a, b, strict=True))
    return {"lr": lr, "one_at_a_time": _pm(a), "sweep": _pm(b), "largest_gap": gap, "alone": a, "swept": b}


def _pm(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"
