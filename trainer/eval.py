"""Evaluate a model, steered or not, on the paper's math benchmarks:
``python -m trainer.eval --model M [--vectors V] --benchmarks math500,aime24,toy=data/test.jsonl``.

Scores are avg@k (the mean correctness of k samples per problem; k = 32 for AIME and AMC, 1, i.e. pass@1,
for the others), as percentages, repeated over ``--seeds`` sampling seeds and reported as mean ± std.
``--temperature 0`` decodes greedily (one sample, one seed: repeats would be identical). Answers are checked
by the trainer's reward code (``trainer.rewards``: Math-Verify on the last ``\\boxed{}``), so an empty or
truncated generation scores 0 rather than failing. Each run adds (or replaces) its row, named ``--label``, in
``OUTPUT/results.json`` and rewrites ``OUTPUT/results.md``: rows are setups, columns benchmarks and their
average, as in the paper's tables.

``--vectors a.safetensors,b=run2/step_200.gguf --include-base`` evaluates several setups in one engine start:
each vector file is a per-request steering set (the base model, the unsteered choice), every setup's samples of
a seed go into one batch with the same per-sample seeds, and each setup gets its own row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from trainer.config import SYSTEM_PROMPT
from trainer.data import Example, load_examples
from trainer.vllm_logging import LEVELS, set_vllm_log_level


@dataclass(frozen=True)
class Benchmark:
    source: str  # Hugging Face dataset name or local file
    split: str
    question_field: str
    answer_field: str
    k: int  # samples per problem: avg@k


# The paper's six; Hugging Face names for users with a network (fields as published there).
BENCHMARKS = {
    "aime24": Benchmark("HuggingFaceH4/aime_2024", "train", "problem", "answer", 32),
    "aime25": Benchmark("math-ai/aime25", "test", "problem", "answer", 32),
    "amc23": Benchmark("math-ai/amc23", "test", "question", "answer", 32),
    "math500": Benchmark("HuggingFaceH4/MATH-500", "test", "problem", "answer", 1),
    "minervamath": Benchmark("math-ai/minervamath", "test", "question", "answer", 1),
    "olympiadbench": Benchmark("math-ai/olympiadbench", "test", "question", "final_answer", 1),
}


def avg_at_k(correct: list[list[bool]]) -> float:
    """Percentage: the mean over problems of the share of their k samples that are correct."""
    if not correct:
        raise ValueError("avg@k of no problems")
    return 100.0 * sum(sum(row) / len(row) for row in correct) / len(correct)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def resolve_benchmark(spec: str, args) -> tuple[str, Benchmark]:
    """``name`` (a known benchmark) or ``name=FILE`` (a local file, fields from --question/--answer-field)."""
    name, _, path = spec.partition("=")
    if path:
        k = BENCHMARKS[name].k if name in BENCHMARKS else 1
        return name, Benchmark(path, "test", args.question_field, args.answer_field, k)
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: known {sorted(BENCHMARKS)}, or give NAME=FILE")
    return name, BENCHMARKS[name]


# ---- generation, possibly over several engines ---------------------------------------------------------


def generate(args, prompts: list[list[int]], k: int, seeds: list[str], choices: list, pool=None) -> list[list[dict]]:
    """k samples per prompt, as {'text', 'truncated', 'tokens'}; prompt i with seed ``seeds[i]`` and steering
    choice ``choices[i]`` (a per-request set's extra_args, or None); sharded over ``pool``'s engines if given."""
    shards = [list(range(i, len(prompts), args.engines)) for i in range(args.engines)]
    jobs = [(_engine_settings(args), [prompts[i] for i in shard], k, [seeds[i] for i in shard],
             [choices[i] for i in shard]) for shard in shards]  # fmt: skip
    results = list(pool.map(_generate_shard, *zip(*jobs, strict=True))) if pool else [_generate_shard(*jobs[0])]
    merged: list = [None] * len(prompts)
    for shard, result in zip(shards, results, strict=True):
        for i, samples in zip(shard, result, strict=True):
            merged[i] = samples
    return merged


def engine_pool(engines: int) -> ProcessPoolExecutor | None:
    """``engines`` worker processes, each claiming one GPU (its own engine, started on first use)."""
    if engines == 1:
        return None
    context = get_context("spawn")
    counter = context.Value("i", 0)
    return ProcessPoolExecutor(engines, mp_context=context, initializer=_claim_device, initargs=(counter,))


def _claim_device(counter) -> None:
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible != "":
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)


_ENGINE = None


def _engine_settings(args) -> dict:
    engine = dict(yaml.safe_load(args.engine) or {}) if args.engine else {}
    vectors = {label: path for label, path in args.setups if path is not None}
    if len(args.setups) > 1:  # one engine serves every setup: each a per-request set, the base model "none"
        engine["additional_config"] = {"steering_sets": vectors, "max_steering_configs": max(1, len(vectors))}
    elif vectors:
        engine["additional_config"] = {"steering_vectors": next(iter(vectors.values()))}
    return {"model": args.model, "dtype": args.dtype, "engine": engine, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_p": args.top_p}  # fmt: skip


def _shutdown_engine() -> None:
    global _ENGINE
    if _ENGINE is not None:
        _ENGINE.shutdown()
        _ENGINE = None


def _generate_shard(settings: dict, prompts, k: int, seeds: list[str], choices: list) -> list[list[dict]]:
    """One engine's share; the engine is started once per process and reused across benchmarks and seeds."""
    global _ENGINE
    if _ENGINE is None:
        from transformers import AutoTokenizer

        from trainer.data import stop_token_ids
        from trainer.rollout import RolloutEngine

        tokenizer = AutoTokenizer.from_pretrained(settings["model"])
        _ENGINE = RolloutEngine(settings["model"], settings["dtype"], 0, stop_token_ids(tokenizer, settings["model"]),
                                settings["engine"])  # fmt: skip
    groups = _ENGINE.generate(prompts, k, settings["temperature"], settings["top_p"], settings["max_new_tokens"],
                              seeds, extra_args=choices)  # fmt: skip
    return [[{"text": s.text, "truncated": s.truncated, "tokens": len(s.token_ids)} for s in g] for g in groups]


# ---- one benchmark, the table --------------------------------------------------------------------------


def evaluate_benchmark(args, name: str, benchmark: Benchmark, prompt, rewards, bar, pool=None) -> dict[str, dict]:
    """{setup label: this benchmark's result}. Every setup's samples of a seed go into one ``generate`` call,
    with the same per-sample seeds (so setups differ by their vectors alone)."""
    examples: list[Example] = load_examples(benchmark.source, benchmark.question_field, benchmark.answer_field,
                                            benchmark.split)  # fmt: skip
    examples = examples[: args.limit] if args.limit else examples
    greedy = args.temperature == 0
    k = 1 if greedy else (args.k or benchmark.k)
    seeds = [0] if greedy else list(range(args.seeds))
    prompts = [prompt(e.question) for e in examples]
    choices = _choices(args.setups)
    scores: dict[str, list[float]] = {label: [] for label, _ in args.setups}
    per_seed: dict[str, list[dict]] = {label: [] for label, _ in args.setups}
    for seed in seeds:
        seed_names = [f"{args.seed_base}:{name}:{seed}:{i}" for i in range(len(prompts))]
        everything = generate(args, prompts * len(choices), k, seed_names * len(choices),
                              [c for c in choices for _ in prompts], pool)  # fmt: skip
        for number, (label, _) in enumerate(args.setups):
            samples = everything[number * len(prompts) : (number + 1) * len(prompts)]
            scores[label].append(_score(args, examples, samples, k, seed, rewards, per_seed[label]))
        bar.update(1)
    rows = {}
    for label, _ in args.setups:
        mean, std = mean_std(scores[label])
        rows[label] = {"benchmark": name, "metric": "pass@1" if k == 1 else f"avg@{k}", "k": k,
                       "problems": len(examples), "mean": mean, "std": std, "seeds": per_seed[label]}  # fmt: skip
    return rows


def _score(args, examples, samples, k: int, seed: int, rewards, per_seed: list[dict]) -> float:
    """avg@k of one setup's samples of one seed; appends that seed's record to ``per_seed``."""
    flat = [s for group in samples for s in group]
    results = rewards.score([s["text"] for s in flat], [e.answer for e in examples for _ in range(k)])
    correct = [[r.status == "correct" for r in results[i * k : (i + 1) * k]] for i in range(len(examples))]
    score = avg_at_k(correct)
    per_seed.append({"seed": seed, "score": score, "pass_at_k": 100.0 * sum(any(row) for row in correct) / len(correct),
                     "truncated": sum(s["truncated"] for s in flat),
                     "statuses": dict(sorted(Counter(r.status for r in results).items())),
                     "samples": _samples(examples, samples, correct) if args.save_samples else None})  # fmt: skip
    return score


def _choices(setups) -> list[dict | None]:
    """Each setup's steering choice: its per-request set (or none, the base model) when one engine serves
    several setups; None (the engine's own vectors) when it serves one."""
    if len(setups) == 1:
        return [None]
    return [{"steering": label if path is not None else "none"} for label, path in setups]


def parse_setups(
    vectors: str | None, label: str | None, model: str, include_base: bool
) -> list[tuple[str, str | None]]:
    """[(label, vectors path or None for the base model)]: ``--vectors`` is one file or a comma-separated list of
    ``[LABEL=]PATH``; labels default to the file's stem (the model's name for the base)."""
    from steering_vllm.config import check_set_name

    entries = [entry.strip() for entry in (vectors or "").split(",") if entry.strip()]
    setups = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        name, path = (name, path) if sep else (Path(entry).stem, entry)
        setups.append((name, str(Path(path).resolve())))
    if len(setups) == 1 and label:
        setups = [(label, setups[0][1])]
    if include_base or not setups:
        setups.insert(0, ("base" if setups else (label or Path(model).name), None))
    if len(setups) > 1:
        labels = [name for name, _ in setups]
        duplicated = sorted({name for name in labels if labels.count(name) > 1})
        if duplicated:
            raise ValueError(f"--vectors: label(s) {duplicated} name more than one setup; give LABEL=PATH")
        for name, path in setups:
            if path is not None:
                check_set_name(name)  # each setup is served as a per-request set of that name
    return setups


def _samples(examples, samples, correct) -> list[dict]:
    return [{"question": e.question, "gold": e.answer, "completions": [s["text"] for s in group], "correct": c}
            for e, group, c in zip(examples, samples, correct, strict=True)]  # fmt: skip


def markdown_table(rows: list[dict]) -> str:
    """Rows: setups; columns: every benchmark any row has, then the average over the row's benchmarks."""
    names = list(dict.fromkeys(b["benchmark"] for row in rows for b in row["benchmarks"]))
    lines = ["| setup | " + " | ".join(names) + " | avg |", "|---" * (len(names) + 2) + "|"]
    for row in rows:
        by_name = {b["benchmark"]: b for b in row["benchmarks"]}
        cells = [_cell(by_name[n]) if n in by_name else "-" for n in names]
        average = statistics.fmean(b["mean"] for b in row["benchmarks"])
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {average:.1f} |")
    return "\n".join(lines) + "\n"


def _cell(result: dict) -> str:
    return f"{result['mean']:.1f} ± {result['std']:.1f}" if len(result["seeds"]) > 1 else f"{result['mean']:.1f}"


def save_row(output_dir: Path, row: dict) -> list[dict]:
    """Add or replace this setup's row in results.json; rewrite results.md. Returns all rows."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in rows if r["label"] != row["label"]] + [row]
    path.write_text(json.dumps(rows, indent=1))
    (output_dir / "results.md").write_text(markdown_table(rows))
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m trainer.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--model", required=True, help="HF name or directory (a family the plugin steers: docs/families.md)"
    )
    parser.add_argument("--vectors", help="steering vectors (any readable format), or a comma-separated list of "
                        "[LABEL=]PATH evaluated side by side in one engine (per-request sets), a row each; "
                        "default: none (the base model)")  # fmt: skip
    parser.add_argument("--include-base", action="store_true",
                        help="also evaluate the base model (a row named 'base') in the same engine")  # fmt: skip
    parser.add_argument("--label", help="the row's name for one setup (default: the vectors' or model's name)")
    parser.add_argument("--benchmarks", default="math500", help=f"comma-separated: {','.join(BENCHMARKS)}, "
                        "or NAME=FILE for a local .jsonl/.json/.parquet (default: math500)")  # fmt: skip
    parser.add_argument("--question-field", default="problem", help="for NAME=FILE benchmarks")
    parser.add_argument("--answer-field", default="answer", help="for NAME=FILE benchmarks")
    parser.add_argument("--k", type=int, help="samples per problem (default: 32 for AIME/AMC, 1 otherwise)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 decodes greedily (default 0.6)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds, reported as mean ± std")
    parser.add_argument("--seed-base", default="eval", help="prefix of the per-sample seeds")
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument("--limit", type=int, help="only the first N problems of each benchmark")
    parser.add_argument("--prompt-template", choices=["auto", "chat", "plain"], default="auto")
    parser.add_argument("--system-prompt", default=SYSTEM_PROMPT)
    parser.add_argument("--plain-template", default="{question}\n" + SYSTEM_PROMPT + "\n")
    parser.add_argument("--reward-fn", default="trainer.rewards:math_verify_reward",
                        help="answer checking, module:function (the trainer's by default)")  # fmt: skip
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--engines", type=int, default=1, help="data-parallel vLLM engines (one per GPU)")
    parser.add_argument("--engine", help="extra vllm.LLM arguments as YAML, e.g. '{max_model_len: 8192}'")
    parser.add_argument("--output-dir", default="eval_results")
    parser.add_argument("--save-samples", action="store_true", help="keep every completion in results.json")
    parser.add_argument("--vllm-log-level", choices=LEVELS,
                        help="vLLM's log level (default: $VLLM_LOGGING_LEVEL, else warning)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.engines < 1 or any(n is not None and n < 1 for n in (args.k, args.limit)):
        parser.error("--seeds, --engines, --k and --limit must be >= 1")
    try:
        args.setups = parse_setups(args.vectors, args.label, args.model, args.include_base)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from trainer.data import PromptBuilder
    from trainer.rewards import RewardPool

    args = parse_args(argv)
    set_vllm_log_level(args.vllm_log_level)
    try:
        benchmarks = [resolve_benchmark(spec.strip(), args) for spec in args.benchmarks.split(",") if spec.strip()]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt = PromptBuilder(tokenizer, args.prompt_template, args.system_prompt, args.plain_template)
    runs = len(benchmarks) * (1 if args.temperature == 0 else args.seeds)
    results: dict[str, list[dict]] = {label: [] for label, _ in args.setups}
    pool = engine_pool(args.engines)
    try:
        with RewardPool(args.reward_fn) as rewards, tqdm(total=runs, desc="eval", unit="run") as bar:
            for name, benchmark in benchmarks:
                for label, result in evaluate_benchmark(args, name, benchmark, prompt, rewards, bar, pool).items():
                    results[label].append(result)
    finally:
        if pool is not None:
            pool.shutdown()
        _shutdown_engine()
    for label, vectors in args.setups:
        row = {"label": label, "model": args.model, "vectors": vectors, "temperature": args.temperature,
               "benchmarks": results[label]}  # fmt: skip
        rows = save_row(Path(args.output_dir), row)
    print(markdown_table(rows))
    print(f"results: {Path(args.output_dir) / 'results.json'}, {Path(args.output_dir) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
