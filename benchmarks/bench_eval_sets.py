"""What ``trainer.eval --vectors a,b --include-base`` saves: every setup served as a per-request set of one
engine, against one ``trainer.eval`` (one engine start) per setup, on the real-model fixture.

Both sides run the same command line the user would (``python -m trainer.eval``, the default torch.compile'd
engine), on the same held-out GSM8K problems, greedy, with the same vector files; whole commands are timed
(process start, engine start, generation, scoring), the two sides taken in turn. The table gives the wall time of
each and their ratio, and each setup's score both ways (greedy decoding: the same answers either way).

  python -m trainer.real_model && python -m benchmarks.bench_eval_sets [--sets 2] [--problems 20] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ENGINE = "{gpu_memory_utilization: 0.1, max_model_len: 1024}"


def _eval(fixture: dict, output: Path, problems: int, max_new_tokens: int, *setup: str) -> float:
    command = [sys.executable, "-m", "trainer.eval", "--model", fixture["model"], "--benchmarks",
               f"gsm8k={fixture['gsm8k_heldout']}", "--question-field", "question", "--answer-field", "answer",
               "--limit", str(problems), "--temperature", "0", "--max-new-tokens", str(max_new_tokens),
               "--engine", ENGINE, "--output-dir", str(output), *setup]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def _scores(output: Path) -> dict[str, float]:
    return {row["label"]: row["benchmarks"][0]["mean"] for row in json.loads((output / "results.json").read_text())}


def main(argv: list[str] | None = None) -> int:
    from steering_vllm import SteeringVectors
    from trainer.real_model import build

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_eval_sets", description=__doc__)
    parser.add_argument("--sets", type=int, default=2, help="vector sets evaluated beside the base model")
    parser.add_argument("--problems", type=int, default=20, help="held-out GSM8K problems (greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of both sides (medians)")
    args = parser.parse_args(argv)
    fixture = build()
    config = json.loads((Path(fixture["model"]) / "config.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="bench-eval-sets-"))
    generator = torch.Generator().manual_seed(0)
    paths = {}
    for i in range(args.sets):
        table = torch.randn(config["num_hidden_layers"], config["hidden_size"], generator=generator) * 0.05
        paths[f"set{i}"] = SteeringVectors.from_tensor(table).save(work / f"set{i}.safetensors")
    setups = {"base": [], **{name: ["--vectors", str(path), "--label", name] for name, path in paths.items()}}

    one, many, scores_one, scores_many = [], [], {}, {}
    for round_ in range(args.repeats):
        listed = ",".join(f"{name}={path}" for name, path in paths.items())
        out = work / f"one-{round_}"
        one.append(_eval(fixture, out, args.problems, args.max_new_tokens, "--vectors", listed, "--include-base"))
        scores_one = _scores(out)
        elapsed = 0.0
        for name, setup in setups.items():
            out = work / f"many-{round_}"
            elapsed += _eval(fixture, out, args.problems, args.max_new_tokens, "--label", name, *setup)
        many.append(elapsed)
        scores_many = _scores(out)
    one_s, many_s = statistics.median(one), statistics.median(many)
    from benchmarks.results import load, markdown, record

    title = (f"trainer.eval on SmolLM2-135M-Instruct, {len(setups)} setups (base + {args.sets} random sets), "
             f"{args.problems} held-out GSM8K problems, greedy, up to {args.max_new_tokens} new tokens, "
             f"torch.compile'd engine; wall time of whole commands, medians of {args.repeats}")  # fmt: skip
    rows = [{"setups": len(setups), "one": one_s, "many": many_s, "saving": many_s / one_s,
             "scores": ", ".join(f"{n} {scores_one.get(n, float('nan')):.1f} / {scores_many.get(n, float('nan')):.1f}"
                                 for n in setups)}]  # fmt: skip
    columns = [("setups", "setups", ""), ("one", "one engine, per-request sets (s)", ".1f"),
               ("many", "one engine per setup (s)", ".1f"), ("saving", "saving", ".2f}x"),
               ("scores", "score per setup (one engine / engine per setup)", "")]  # fmt: skip
    record("eval_sets", title, columns, rows)
    print(f"\n{title}\n\n" + markdown(load("eval_sets")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
