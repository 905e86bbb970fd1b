"""The plugin's keys in vLLM's ``additional_config`` (what ``--steering-vectors`` and friends route into)."""

from __future__ import annotations

from typing import Any

VECTORS_KEY = "steering_vectors"
SCALE_KEY = "steering_scale"
KNOWN_KEYS = frozenset({VECTORS_KEY, SCALE_KEY})


def steering_options(additional_config: dict[str, Any] | None) -> tuple[str | None, float]:
    """(vectors path or None, scale) from ``additional_config``; a misspelt ``steering_*`` key is an error."""
    config = additional_config or {}
    unknown = sorted(k for k in config if k.startswith("steering") and k not in KNOWN_KEYS)
    if unknown:
        raise ValueError(f"additional_config: unknown steering option(s) {unknown}; known: {sorted(KNOWN_KEYS)}")
    path = config.get(VECTORS_KEY)
    if path is not None and not isinstance(path, str):
        raise ValueError(f"additional_config[{VECTORS_KEY!r}] must be a path string, got {type(path).__name__}")
    try:
        scale = float(config.get(SCALE_KEY, 1.0))
    except (TypeError, ValueError):
        raise ValueError(f"additional_config[{SCALE_KEY!r}] must be a number, got {config[SCALE_KEY]!r}") from None
    return path, scale
