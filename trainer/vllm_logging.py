"""vLLM's log level in the trainer's commands: warnings by default, so a run shows its own progress.

vLLM reads ``VLLM_LOGGING_LEVEL`` when it is first imported, and its engine processes inherit it from the
environment; set it before anything imports vLLM. Its INFO lines (thousands in a training run: one per
prefix-cache reset) are one option away.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, get_args

Level = Literal["debug", "info", "warning", "error"]
LEVELS: tuple[str, ...] = get_args(Level)
DEFAULT = "warning"


def set_vllm_log_level(level: str | None) -> str:
    """``level``, else ``$VLLM_LOGGING_LEVEL`` if the user set it, else warnings; returns the level in force."""
    chosen = (level or os.environ.get("VLLM_LOGGING_LEVEL") or DEFAULT).lower()
    if chosen not in LEVELS:
        raise ValueError(f"vLLM log level {chosen!r}: expected one of {', '.join(LEVELS)}")
    os.environ["VLLM_LOGGING_LEVEL"] = chosen.upper()
    if "vllm" in sys.modules:  # already configured: set its logger too
        logging.getLogger("vllm").setLevel(chosen.upper())
    return chosen
