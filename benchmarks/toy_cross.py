"""The paper's Table 4 at toy scale: the base model and trained runs of two toy worlds that share one base model,
each scored by ``trainer.eval`` on both worlds' held-out splits (greedy, every problem, samples kept), and what
their completions show (``benchmarks/toy_analysis``). ``benchmarks/reproduce_toy --cross`` runs it.

Every steering run and the base model are per-request sets of one engine (one ``trainer.eval`` call); each
fine-tuned model needs an engine of its own. The base model is also sampled 8 times at T=1 per problem: what RL
can amplify is what those samples hold.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.results import markdown, record
from benchmarks.toy_analysis import behaviour, kinds_of, mean_behaviour, pass_at_k, samples_of

SAMPLES = 8  # the base model's samples per problem at T=1
BASE, SAMPLED = "base", f"base.T1.k{SAMPLES}"
ENGINE = "{gpu_memory_utilization: 0.05, max_model_len: 512}"
EVAL_OPTIONS = ["--max-new-tokens", "64", "--save-samples", "--engine", ENGINE]


def cross_world(model: str, tests: dict[str, str], runs: dict[str, dict[str, list[Path]]], names: dict[str, str],
                output: Path, name: str) -> str:  # fmt: skip
    """Evaluate, record ``NAME`` (the cross table), ``toy_behaviour_WORLD`` per tested world and ``toy_sampling``;
    returns the cross table. ``runs``: {training world: {method: [run directories]}}, where a run directory holds
    ``steering_vectors.safetensors`` (method ``steering``) or a fine-tuned ``model/``."""
    groups: dict[str, list[str]] = {"Base": [BASE]}
    steering, models = [], []
    for world, by_method in runs.items():
        for method, directories in by_method.items():
            for directory in directories:
                label = f"{method}.{world}.{directory.name}"  # a per-request set's name: no ',' or '='
                groups.setdefault(f"{names[method]}, trained on {world}", []).append(label)
                if method == "steering":
                    steering.append((label, directory / "steering_vectors.safetensors"))
                else:
                    models.append((label, directory / "model"))
    vectors = ["--vectors", ",".join(f"{label}={path}" for label, path in steering)] if steering else []
    calls = [([BASE, *(label for label, _ in steering)], ["--model", model, "--include-base", *vectors]),
             *[([label], ["--model", str(path), "--label", label]) for label, path in models]]  # fmt: skip
    calls = [(labels, [*options, "--temperature", "0"]) for labels, options in calls]
    sampled = ["--temperature", "1", "--k", str(SAMPLES), "--seeds", "1"]
    calls.append(([SAMPLED], ["--model", model, "--label", SAMPLED, *sampled]))
    benchmarks = ",".join(f"{world}={path}" for world, path in tests.items())
    for labels, options in tqdm(calls, desc="cross-world evaluations", unit="engine"):
        evaluate(labels, [*options, "--benchmarks", benchmarks, *EVAL_OPTIONS], output)
    results = {r["label"]: r for r in json.loads((output / "results.json").read_text())}
    table = cross_rows(groups, results, list(tests))
    columns = [("trained", "Trained", "")] + [(f"on_{w}", f"tested on {w}", "") for w in tests]
    path = record(
        name, "Held-out greedy accuracy (%) by trainer.eval, mean ± std over the reported seeds", columns, table
    )
    kinds = {world: kinds_of(path) for world, path in tests.items()}
    for world in tests:
        record_behaviour(world, groups, results, kinds[world])
    record_sampling(results, kinds)
    return markdown(json.loads(path.read_text()))


def evaluate(labels: list[str], options: list[str], output: Path) -> None:
    """One ``trainer.eval`` call; skipped when ``output/results.json`` already holds every label."""
    results = output / "results.json"
    if results.exists() and set(labels) <= {r["label"] for r in json.loads(results.read_text())}:
        return
    command = [sys.executable, "-m", "trainer.eval", *options, "--output-dir", str(output)]
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "eval.log", "a") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed; see {output / 'eval.log'}")


def cross_rows(groups: dict[str, list[str]], results: dict[str, dict], worlds: list[str]) -> list[dict]:
    """Per group (a method and its training world, or Base): mean ± std over its runs on each world's split."""
    rows = []
    for group, labels in groups.items():
        scores = [{b["benchmark"]: b["mean"] for b in results[label]["benchmarks"]} for label in labels]
        row = {"trained": group, "runs": labels}
        for world in worlds:
            values = [s[world] for s in scores]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            row |= {f"on_{world}": f"{statistics.fmean(values):.1f} ± {std:.1f}",
                    f"on_{world}_mean": statistics.fmean(values), f"on_{world}_runs": values}  # fmt: skip
        rows.append(row)
    return rows


def record_behaviour(world: str, groups: dict[str, list[str]], results: dict, kinds: dict[str, str]) -> None:
    """``toy_behaviour_WORLD``: each group's greedy completions on ``world``'s split, kind by kind, means over its
    runs."""
    rows = []
    for group, labels in groups.items():
        found = mean_behaviour([behaviour(samples_of(results[label], world), kinds) for label in labels])
        rows += [{"trained": group, "kind": kind, **numbers} for kind, numbers in found.items()]
    columns = [("trained", "Trained", ""), ("kind", "Kind", ""), ("accuracy", "accuracy (%)", ".1f"),
               ("operation", "writes its kind's operation (%)", ".1f"), ("wrong_steps", "wrong steps (%)", ".1f"),
               ("single_digit", "boxes one digit (%)", ".1f")]  # fmt: skip
    title = (f"Greedy completions on world {world}'s held-out split, mean over the runs: accuracy; completions that "
             "write the kind's operation (groups, shopping: '*'; sharing: '/'; difference: '-'); worked steps "
             "'a op b = r' whose r is wrong; boxed answers that are one digit")  # fmt: skip
    record(f"toy_behaviour_{world}", title, columns, rows)


def record_sampling(results: dict, kinds: dict[str, dict[str, str]]) -> None:
    """``toy_sampling``: per world and kind, the base model's greedy accuracy and its mean@8 and pass@8 at T=1."""
    rows = []
    for world, by_question in kinds.items():
        greedy = behaviour(samples_of(results[BASE], world), by_question)
        sampled = pass_at_k(samples_of(results[SAMPLED], world), by_question)
        for kind, numbers in sampled.items():
            rows.append({"world": world, "kind": kind, "greedy": greedy[kind]["accuracy"], "mean": numbers["mean"],
                         "pass": numbers["pass"]})  # fmt: skip
    columns = [("world", "World", ""), ("kind", "Kind", ""), ("greedy", "greedy (%)", ".1f"),
               ("mean", f"mean@{SAMPLES} at T=1 (%)", ".1f"),
               ("pass", f"pass@{SAMPLES} at T=1 (%)", ".1f")]  # fmt: skip
    record(
        "toy_sampling",
        f"The base model on each world's held-out split: greedy, and {SAMPLES} samples at T=1",
        columns,
        rows,
    )
