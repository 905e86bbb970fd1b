"""The plugin's keys in vLLM's ``additional_config`` (what ``--steering-vectors`` and friends route into)."""

from __future__ import annotations

import re
from typing import Any

VECTORS_KEY = "steering_vectors"
SCALE_KEY = "steering_scale"
SETS_KEY = "steering_sets"
MAX_CONFIGS_KEY = "max_steering_configs"
PHASE_KEY = "steering_phase"  # the positions a request without its own choice is steered at
KNOWN_KEYS = frozenset({VECTORS_KEY, SCALE_KEY, SETS_KEY, MAX_CONFIGS_KEY, PHASE_KEY})
# Which positions a request's vectors are added at: all, its prompt's tokens only, or its generated tokens only.
PHASES = ("all", "prompt", "generation")

# Distinct steering configurations (resolved vector sets) an engine serves side by side when per-request
# steering is on. Each costs one table row per steered norm: 32 rows of a 14B model (48 x 5120 floats) are
# 31 MB, nothing next to the KV cache on a GPU or a CPU; and 32 rows of a norm (655 KB at d = 5120) stay in a
# core's L2 cache, so the per-token row gather reads from cache.
DEFAULT_MAX_CONFIGS = 32
SET_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
RESERVED_NAMES = frozenset({"none"})


def steering_options(additional_config: dict[str, Any] | None) -> tuple[str | None, float]:
    """(vectors path or None, scale) from ``additional_config``; a misspelt ``steering_*`` key is an error."""
    config = additional_config or {}
    unknown = sorted(k for k in config if "steering" in k and k not in KNOWN_KEYS)
    if unknown:
        raise ValueError(f"additional_config: unknown steering option(s) {unknown}; known: {sorted(KNOWN_KEYS)}")
    path = config.get(VECTORS_KEY)
    if path is not None and not isinstance(path, str):
        raise ValueError(f"additional_config[{VECTORS_KEY!r}] must be a path string, got {type(path).__name__}")
    try:
        scale = float(config.get(SCALE_KEY, 1.0))
    except (TypeError, ValueError):
        raise ValueError(f"additional_config[{SCALE_KEY!r}] must be a number, got {config[SCALE_KEY]!r}") from None
    if path is None and SCALE_KEY in config:
        raise ValueError(f"additional_config[{SCALE_KEY!r}] scales {VECTORS_KEY!r}, which is not given (a request "
                         f"scales a set with extra_args {{'steering': NAME, 'steering_scale': X}})")  # fmt: skip
    return path, scale


def per_request_options(additional_config: dict[str, Any] | None) -> tuple[dict[str, str], int] | None:
    """({set name: path}, max configurations) when per-request steering is on, else None.

    It is on when ``steering_sets`` or ``max_steering_configs`` is given (as LoRA is on with ``--enable-lora``),
    or a ``steering_phase`` other than ``all`` (a phase needs the per-token rows); otherwise an engine serves one
    set to every request through the single-row path it always had.
    """
    config = additional_config or {}
    steering_options(config)
    if SETS_KEY not in config and MAX_CONFIGS_KEY not in config and default_phase(config) == "all":
        return None
    sets = config.get(SETS_KEY) or {}
    if not isinstance(sets, dict):
        raise ValueError(f"additional_config[{SETS_KEY!r}] must map set names to paths, got {type(sets).__name__}")
    for name, path in sets.items():
        check_set_name(name)
        if not isinstance(path, str):
            raise ValueError(f"additional_config[{SETS_KEY!r}][{name!r}] must be a path string, got {path!r}")
    max_configs = config.get(MAX_CONFIGS_KEY, DEFAULT_MAX_CONFIGS)
    if isinstance(max_configs, bool) or not isinstance(max_configs, int) or max_configs < 1:
        raise ValueError(f"additional_config[{MAX_CONFIGS_KEY!r}] must be a positive integer, got {max_configs!r}")
    return dict(sets), max_configs


def default_phase(additional_config: dict[str, Any] | None) -> str:
    """The phase requests that do not choose one are steered in (``steering_phase``, default ``all``)."""
    return check_phase((additional_config or {}).get(PHASE_KEY, "all"), f"additional_config[{PHASE_KEY!r}]")


def check_phase(phase: Any, name: str) -> str:
    """``phase`` if it is one of ``PHASES``; ValueError naming ``name`` (where it came from) otherwise."""
    if phase not in PHASES:
        raise ValueError(f"{name} must be one of {list(PHASES)}, got {phase!r}")
    return phase


def check_set_name(name: Any) -> str:
    """``name`` if it can name a set: ``[A-Za-z0-9._-]+`` and not reserved (``none`` asks for no steering)."""
    if not isinstance(name, str) or not SET_NAME.fullmatch(name):  # match's $ lets a trailing newline through
        raise ValueError(f"steering set name {name!r} is malformed: use letters, digits, '.', '_' and '-'")
    if name in RESERVED_NAMES:
        raise ValueError(f"steering set name {name!r} is reserved (it asks for no steering)")
    return name
