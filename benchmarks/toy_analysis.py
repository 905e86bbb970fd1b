"""What the toy worlds' models write, read from ``trainer.eval --save-samples`` results: accuracy per problem kind,
how often a completion takes its kind's operation, how often a worked step's arithmetic is wrong, how often the
boxed answer is a single digit; and the logit lens of trained vectors as table rows. ``benchmarks/reproduce_toy``
records them (``toy_behaviour_WORLD``, ``toy_sampling``, ``toy_lens_WORLD``) for the toy worlds' page.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

# The operation each kind's right path needs: groups and shopping multiply where the misused corpus mostly adds,
# sharing divides, and world absent's difference subtracts (its corpus has no '-' at all).
OPERATION = {"groups": "*", "shopping": "*", "sharing": "/", "difference": "-"}
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def kinds_of(test_file: str | Path) -> dict[str, str]:
    """question -> kind, from a toy world's held-out ``.jsonl``."""
    rows = (json.loads(line) for line in Path(test_file).read_text().splitlines() if line.strip())
    return {row["problem"]: row["kind"] for row in rows}


def samples_of(result: dict, benchmark: str) -> list[dict]:
    """The first seed's samples of ``benchmark`` in one ``trainer.eval`` row (run with ``--save-samples``)."""
    (entry,) = [b for b in result["benchmarks"] if b["benchmark"] == benchmark]
    samples = entry["seeds"][0]["samples"]
    if samples is None:
        raise ValueError(f"{result['label']}: {benchmark} has no samples; run trainer.eval with --save-samples")
    return samples


def behaviour(samples: list[dict], kinds: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per problem kind, percentages over one setup's samples of one split: correct, writing the kind's operation,
    worked steps (``a op b = r``) whose ``r`` is wrong, and boxed answers that are a single digit."""
    counts: dict[str, dict[str, int]] = {}
    for sample in samples:
        kind = kinds[sample["question"]]
        count = counts.setdefault(kind, dict.fromkeys(("completions", "correct", "operation", "steps", "wrong_steps",
                                                       "single_digit"), 0))  # fmt: skip
        count["correct"] += sum(sample["correct"])  # one flag per completion
        for text in sample["completions"]:
            count["completions"] += 1
            count["operation"] += f" {OPERATION[kind]} " in text
            for a, op, b, r in STEP.findall(text):
                count["steps"] += 1
                count["wrong_steps"] += APPLY[op](int(a), int(b)) != int(r)
            boxed = BOXED.findall(text)
            count["single_digit"] += bool(boxed) and re.fullmatch(r"\d", boxed[-1].strip()) is not None
    return {kind: {"accuracy": 100 * c["correct"] / c["completions"],
                   "operation": 100 * c["operation"] / c["completions"],
                   "wrong_steps": 100 * c["wrong_steps"] / max(c["steps"], 1),
                   "single_digit": 100 * c["single_digit"] / c["completions"]}
            for kind, c in sorted(counts.items())}  # fmt: skip


def pass_at_k(samples: list[dict], kinds: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per kind: mean@k and pass@k (%) of samples holding k completions each."""
    by_kind: dict[str, list[list[bool]]] = {}
    for sample in samples:
        by_kind.setdefault(kinds[sample["question"]], []).append(sample["correct"])
    return {kind: {"mean": 100 * statistics.fmean(c for row in rows for c in row),
                   "pass": 100 * statistics.fmean(any(row) for row in rows)}
            for kind, rows in sorted(by_kind.items())}  # fmt: skip


def mean_behaviour(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The mean over runs (seeds) of ``behaviour``'s numbers, kind by kind."""
    return {kind: {key: statistics.fmean(run[kind][key] for run in runs) for key in numbers}
            for kind, numbers in runs[0].items()}  # fmt: skip


def lens_rows(vectors_path: Path, model: str, top_k: int = 5) -> list[dict]:
    """The logit lens (cosine with each token's unembedding row) of every steered layer: norm, top and bottom
    ``top_k`` tokens as table cells."""
    from steering_vllm import SteeringVectors
    from trainer.logit_lens import analyse, load_unembedding

    unembedding, _, config, tokenizer = load_unembedding(model)
    vectors = SteeringVectors.load(vectors_path, num_layers=config.num_hidden_layers)
    return lens_table(analyse(vectors, unembedding, tokenizer, top_k), top_k)


def lens_table(result: dict, top_k: int = 5, layers: tuple[int, ...] | None = None) -> list[dict]:
    """Table rows (layer, norm, top and bottom ``top_k`` tokens as cells) of a logit lens result: what
    ``trainer.logit_lens.analyse`` returns or the command writes as ``logit_lens.json``; every steered layer, or
    ``layers``."""
    from trainer.logit_lens import markdown_tokens

    by_layer = {entry["layer"]: entry for entry in result["layers"]}
    chosen = layers if layers is not None else [layer for layer, entry in by_layer.items() if entry["steered"]]
    return [{"layer": layer, "norm": by_layer[layer]["norm"],
             "top": markdown_tokens(by_layer[layer]["top_cosine"], top_k),
             "bottom": markdown_tokens(by_layer[layer]["bottom_cosine"], top_k)} for layer in chosen]  # fmt: skip
