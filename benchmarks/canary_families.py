"""Engine and learner agree on every family, in both precisions: the trainer's canary per family and dtype.

``logprob_gap`` is the mean absolute difference between the engine's and the learner's logprobs of the sampled
tokens (see the training page). For each steered family, this trains the test suite's tiny random checkpoint
(``tests/helpers/tiny_models.py``: random norm weights and biases) with ``python -m trainer.rloo`` for a few
steps (4 prompts x 4 samples, up to 48 new tokens, a shaped reward so that every step has a gradient, eager
engine), engine and learner in float32 and then both in bfloat16, and records the smallest and largest gap.
Step 1 is served with zero vectors, so a gap there is the two stacks' own kernels, not the steering.

  python -m benchmarks.canary_families [--steps 3] [--families qwen2,llama]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.commands import run_command

HELPERS = Path(__file__).resolve().parent.parent / "tests" / "helpers"
DTYPES = ("float32", "bfloat16")


def trainer_config(model: Path, output: Path, data: Path, dtype: str, steps: int) -> dict:
    return {"model": str(model), "output_dir": str(output), "train_data": str(data), "steps": steps,
            "prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 48, "learning_rate": 0.05,
            "warmup_steps": 1, "dtype": dtype, "reward_fn": "shaped_rewards:digit_share", "reward_workers": 1,
            "engine": {"enforce_eager": True, "gpu_memory_utilization": 0.05, "max_model_len": 512}}  # fmt: skip


def gaps(run_dir: Path) -> list[float]:
    """The canary of every step of a trainer run, in order."""
    from trainer.curves import read_metrics

    return [metrics["logprob_gap"] for metrics in read_metrics(run_dir)]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.results import load, markdown, record

    sys.path.insert(0, str(HELPERS))
    from tiny_models import FAMILIES, build_tiny_model

    parser = argparse.ArgumentParser(prog="python -m benchmarks.canary_families", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {list(FAMILIES)}")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"--families: unknown {unknown}; known: {list(FAMILIES)}")
    work = Path(tempfile.mkdtemp(prefix="canary-families-"))
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a in range(10) for b in range(10)))  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}  # the shaped reward
    rows = []
    for number, family in enumerate(families, 1):
        model = build_tiny_model(work / f"model-{family}", family)
        row = {"family": family}
        for dtype in DTYPES:
            print(f"[{number}/{len(families)}] {family}, {dtype}", flush=True)
            output = work / f"run-{family}-{dtype}"
            config = work / f"{family}-{dtype}.yaml"
            config.write_text(yaml.safe_dump(trainer_config(model, output, data, dtype, args.steps)))
            run_command([sys.executable, "-m", "trainer.rloo", "--config", str(config)], work / f"{family}-{dtype}.log",
                        env)  # fmt: skip
            found = gaps(output)
            row.update({f"{dtype}_first": found[0], f"{dtype}_min": min(found), f"{dtype}_max": max(found),
                        f"{dtype}_steps": found})  # fmt: skip
        rows.append(row)
    columns = [("family", "family", ""), ("float32_min", "fp32: smallest gap", ".1e"),
               ("float32_max", "fp32: largest gap", ".1e"), ("bfloat16_first", "bf16: step 1 (zero vectors)", ".1e"),
               ("bfloat16_min", "bf16: smallest gap", ".1e"), ("bfloat16_max", "bf16: largest gap", ".1e")]  # fmt: skip
    title = (f"The trainer's canary (logprob_gap) over {args.steps} steps of 16 samples on each family's tiny "
             "checkpoint, engine (eager) and learner in one dtype")  # fmt: skip
    record("canary_families", title, columns, rows)
    print("\n" + markdown(load("canary_families")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
