"""The model a foreign file says it was made for, checked against the one it is used with."""

from __future__ import annotations

import re
from collections.abc import Iterable

from steering_vllm.vectors.formats import SteeringVectorsError


def check_model_hint(hint: str | None, expected: str | Iterable[str] | None, source: str) -> None:
    """Refuse a file whose model hint matches none of ``expected`` (names or types, e.g. ``"llama"``).

    repeng writes HF ``config.model_type`` (``"llama"``, ``"qwen2"``), llama.cpp the GGUF architecture
    (``"llama"``, ``"qwen2"``, ``"gptneox"``), IBM activation-steering ``model_type``, our writer the model name
    or path; so the comparison ignores case, ``-`` and ``_``, and a path's directories. An empty hint checks
    nothing (our writer leaves it empty when the model is unknown).
    """
    if expected is None or not hint:
        return
    wanted = [expected] if isinstance(expected, str) else list(expected)
    if not wanted:
        return
    if _key(hint) not in {_key(w) for w in wanted}:
        raise SteeringVectorsError(
            f"{source}: the file was made for model {hint!r} (its model hint), expected "
            f"{' or '.join(repr(w) for w in wanted)}; pass the model it was made for (or leave expected_model "
            "out to skip the check)"
        )


def is_hf_model_type(hint: str) -> bool:
    """Whether ``hint`` names a transformers model type (``"llama"``, ``"qwen2"``), compared as ``check_model_hint``
    compares names; a path (our writer's model name) is no type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return "/" not in hint and _key(hint) in {_key(model_type) for model_type in CONFIG_MAPPING_NAMES}


def _key(name: str) -> str:
    """A model name or type as compared: the last part of a path, without case, ``-``, ``_`` or spaces."""
    return re.sub(r"[-_\s]", "", name.strip().rstrip("/").rsplit("/", 1)[-1]).lower()
