"""What command 1 does: train the toy model's steering vectors with ``configs/toy.yaml``, then score them.

Runs the README's command 1 as a user would (``python -m trainer.rloo --config configs/toy.yaml``, into a fresh
output directory; the whole command timed), reads where its steps spent their time (``metrics.jsonl``: medians of
the steps after the first, which also starts the reward workers) and its own held-out evaluation (the first 200
problems, before and after), then scores the base model and the trained vectors on all 500 held-out problems in
one ``trainer.eval`` (greedy, one engine, a per-request set each), with Math-Verify's statuses (correct, wrong,
no boxed answer) and how many answers end with the right number, boxed or not (the skill, whatever the form).
On a CPU with AVX-512 the base model is scored once more on the AVX2 code paths (``scripts/as_avx2_cpu.sh``):
fp32 sums round differently there, and a near tie can flip a greedy token. Last, the logit lens of the trained
vectors (``python -m trainer.logit_lens``, top 5): its table is recorded from the command's JSON, its figures stay
in the work directory.

  python -m benchmarks.quick_start
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.commands import run_command

ROOT = Path(__file__).resolve().parent.parent
TOY_MODEL = ROOT / "fixtures" / "toy-model"
HELD_OUT = TOY_MODEL / "data" / "test.jsonl"
PHASES = ("generate", "score", "learn", "sync")


def step_phases(metrics: list[dict]) -> dict[str, float]:
    """Median seconds of each phase and of the whole step over the steps after the first."""
    steps = [m for m in metrics if "time" in m][1:]
    phases = {name: statistics.median(m["time"].get(name, 0.0) for m in steps) for name in PHASES}
    phases["step"] = statistics.median(sum(m["time"].get(name, 0.0) for name in PHASES) for m in steps)
    return phases


def eval_rows(results: list[dict]) -> dict[str, dict]:
    """{label: {accuracy, correct, wrong, unboxed, number_right, problems}} from ``trainer.eval``'s results.json
    (``number_right``: answers whose last number is the gold one, boxed or not)."""
    from benchmarks.real_premise import sample_counts

    rows = {}
    for row in results:
        benchmark = row["benchmarks"][0]
        seed = benchmark["seeds"][0]
        statuses = seed["statuses"]
        correct = statuses.get("correct", 0)
        rows[row["label"]] = {"accuracy": benchmark["mean"], "correct": correct,
                              "unboxed": statuses.get("no_boxed", 0), "problems": benchmark["problems"],
                              "wrong": benchmark["problems"] - correct - statuses.get("no_boxed", 0),
                              "number_right": sample_counts(seed["samples"] or [])["last_number_right"],
                              "statuses": statuses}  # fmt: skip
    return rows


def _eval_command(output: Path) -> list[str]:
    return [sys.executable, "-m", "trainer.eval", "--model", str(TOY_MODEL), "--benchmarks", f"toy={HELD_OUT}",
            "--temperature", "0", "--max-new-tokens", "64", "--save-samples", "--output-dir", str(output)]  # fmt: skip


def _has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    import argparse

    from benchmarks.results import load, markdown, record
    from benchmarks.toy_analysis import lens_table
    from trainer.curves import read_metrics, read_summary

    parser = argparse.ArgumentParser(prog="python -m benchmarks.quick_start", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="quick-start-"))
    run_dir = work / "toy"
    print(f"[1/3] command 1 into {run_dir}", flush=True)
    train_s = run_command([sys.executable, "-m", "trainer.rloo", "--config", "configs/toy.yaml", "--output_dir",
                    str(run_dir)], work / "train.log")  # fmt: skip
    metrics, summary = read_metrics(run_dir), read_summary(run_dir)
    gaps = [m["logprob_gap"] for m in metrics if "logprob_gap" in m]

    print("[2/3] trainer.eval: the base model and the trained vectors on every held-out problem", flush=True)
    vectors = run_dir / "steering_vectors.safetensors"
    eval_command = [*_eval_command(work / "eval"), "--vectors", f"steering={vectors}", "--include-base"]
    eval_s = run_command(eval_command, work / "eval.log")
    evaluated = eval_rows(json.loads((work / "eval" / "results.json").read_text()))
    rows = [{"setup": "base model", "isa": "this CPU's", **evaluated["base"]},
            {"setup": "+ command 1's steering vectors", "isa": "this CPU's", **evaluated["steering"]}]  # fmt: skip
    if _has_avx512():
        print("[3/3] trainer.eval: the base model again, on the AVX2 code paths", flush=True)
        avx2 = [str(ROOT / "scripts" / "as_avx2_cpu.sh"), *_eval_command(work / "avx2")]
        run_command(avx2, work / "avx2.log")
        base = eval_rows(json.loads((work / "avx2" / "results.json").read_text()))
        rows.append({"setup": "base model", "isa": "AVX2 (scripts/as_avx2_cpu.sh)", **next(iter(base.values()))})
    print("[lens] the logit lens of the trained vectors", flush=True)
    run_command([sys.executable, "-m", "trainer.logit_lens", str(vectors), "--model", str(TOY_MODEL), "--top-k", "5",
          "--output-dir", str(work / "lens")], work / "lens.log")  # fmt: skip
    lens_columns = [("layer", "layer", ""), ("norm", "norm", ".4f"), ("top", "top 5 by cosine", ""),
                    ("bottom", "bottom 5 by cosine", "")]  # fmt: skip
    record("quick_start_lens", "Logit lens of command 1's vectors: cosine with each token's unembedding row",
           lens_columns, lens_table(json.loads((work / "lens" / "logit_lens.json").read_text())))  # fmt: skip
    print(f"logit lens figures: {work / 'lens'}", flush=True)
    phases = step_phases(metrics)
    steps = {"train_s": train_s, "eval_s": eval_s, "steps": len(metrics), **phases,
             **{f"{name}_share": 100.0 * phases[name] / phases["step"] for name in PHASES},
             "gap_min": min(gaps), "gap_max": max(gaps), "before": 100.0 * summary["eval_accuracy_before"],
             "after": 100.0 * summary["eval_accuracy_after"]}  # fmt: skip
    title = ("Command 1 (`trainer.rloo --config configs/toy.yaml`), then the base model and its trained vectors on "
             "all held-out problems (`trainer.eval`, greedy, one engine)")  # fmt: skip
    columns = [("setup", "setup", ""), ("isa", "code paths", ""), ("accuracy", "held-out accuracy (%)", ".1f"),
               ("correct", "correct", ""), ("wrong", "wrong", ""), ("unboxed", "no boxed answer", ""),
               ("number_right", "last number right, boxed or not", ""),
               ("problems", "problems", "")]  # fmt: skip
    record("quick_start", title, columns, rows)
    step_columns = [("train_s", "command 1 (s)", ".0f"), ("steps", "steps", ""),
                    *[(name, f"{name} (s)", ".3f") for name in PHASES], ("step", "step (s)", ".2f"),
                    ("gap_max", "largest logprob_gap", ".1e"), ("before", "own held-out eval before (%)", ".1f"),
                    ("after", "after (%)", ".1f")]  # fmt: skip
    record("quick_start_steps", "Command 1's steps: median seconds of each phase over the steps after the first",
           step_columns, [steps])  # fmt: skip
    print("\n" + markdown(load("quick_start")) + "\n" + markdown(load("quick_start_steps")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
