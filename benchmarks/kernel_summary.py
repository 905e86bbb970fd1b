"""The kernel benchmark's findings in one table, derived from its two recorded tables: for each group of rows (an
ISA, or all of them) the smallest, median and largest ratio, and how many rows meet the target.

``python -m benchmarks.kernel_summary`` reads ``benchmarks/results/kernel_cpu_forward.json`` and
``kernel_cpu_backward.json`` and records ``kernel_cpu_summary.json``; ``bench_kernel`` does the same after each
full run. The docs quote these rows, so every figure on the kernel page comes from a file.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

COLUMNS = [
    ("isa", "ISA", ""), ("rows", "rows", ""), ("ratio", "ratio", ""), ("min", "min", ".2f"),
    ("median", "median", ".2f"), ("max", "max", ".2f"), ("target", "target", ""), ("meeting", "meeting it", ""),
]  # fmt: skip

# (rows, which table, row filter, ratio key, target: the smallest ratio that meets it, or None)
GROUPS: list[tuple[str, str, Callable[[dict], bool], str, float | None]] = [
    ("bf16, T >= 512, rows in cache", "forward", lambda r: r["dtype"] == "bfloat16" and r["T"] >= 512
     and r["cache"] == "hot", "vs_vllm", 1.11),
    ("bf16, T >= 512, rows in DRAM", "forward", lambda r: r["dtype"] == "bfloat16" and r["T"] >= 512
     and r["cache"] == "cold", "vs_vllm", 1.11),
    ("bf16, T = 16", "forward", lambda r: r["dtype"] == "bfloat16" and r["T"] == 16, "vs_vllm", 1.0),
    ("fp32, rows in DRAM", "forward", lambda r: r["dtype"] == "float32" and r["cache"] == "cold", "vs_vllm", 1.0),
    ("fp32, rows in DRAM: A/A", "forward", lambda r: r["dtype"] == "float32" and r["cache"] == "cold", "vllm_a_a",
     None),
    ("fp32, rows in DRAM: of ref", "forward", lambda r: r["dtype"] == "float32" and r["cache"] == "cold", "of_ref",
     None),
    ("fp32, rows in cache", "forward", lambda r: r["dtype"] == "float32" and r["cache"] == "hot", "vs_vllm", 1.0),
    ("fp32: a separate add (naive)", "forward", lambda r: r["dtype"] == "float32", "vs_naive", None),
    ("every forward row: A/A", "forward", lambda r: True, "vllm_a_a", None),
    ("backward", "backward", lambda r: True, "vs_compiled", 1.0),
    ("backward", "backward", lambda r: True, "vs_eager", 1.0),
]  # fmt: skip
RATIO_NAMES = {"vs_vllm": "vs vllm", "vllm_a_a": "vllm A/A", "of_ref": "of ref", "vs_naive": "vs naive",
               "vs_compiled": "vs compiled", "vs_eager": "vs eager"}  # fmt: skip


def summary_rows(forward: list[dict], backward: list[dict]) -> list[dict]:
    """First each group over every ISA (row i is group i on any machine: the docs quote these rows by number),
    then each group per ISA, in the tables' order (an ISA without vLLM's op has no rows where it would compare)."""
    tables = {"forward": forward, "backward": backward}
    isas = list(dict.fromkeys(row["isa"] for row in forward))
    rows = []
    for isa in ["all", *isas]:
        for what, table, keep, key, target in GROUPS:
            values = [r[key] for r in tables[table] if (isa == "all" or r["isa"] == isa) and keep(r)]
            values = [v for v in values if v is not None]
            if not values and isa != "all":
                continue
            row = {"isa": isa, "rows": what, "ratio": RATIO_NAMES[key], "min": None, "median": None, "max": None,
                   "target": "", "meeting": ""}  # fmt: skip
            if values:
                row.update(min=min(values), median=statistics.median(values), max=max(values))
            if target is not None:
                row["target"] = f">= {target:.2f}"
                row["meeting"] = f"{sum(v >= target for v in values)} of {len(values)}"
            rows.append(row)
    return rows


def record_summary(forward_name: str = "kernel_cpu_forward", backward_name: str = "kernel_cpu_backward") -> str:
    """Record ``kernel_cpu_summary`` (with the suffix of a variant's names) from the two recorded tables."""
    from benchmarks.results import load, record

    forward, backward = load(forward_name), load(backward_name)
    name = "kernel_cpu_summary" + forward_name[len("kernel_cpu_forward") :]
    title = ("The kernel tables summarised: per group of rows and ISA, the smallest, median and largest ratio "
             f"(above 1, ours is faster) and the rows meeting the target. From {forward['command']}, "
             f"{forward['date']}")  # fmt: skip
    record(name, title, COLUMNS, summary_rows(forward["rows"], backward["rows"]))
    return name


if __name__ == "__main__":
    record_summary()
