"""What the foreign readers share: the format names, their options, and the checks and mapping every reader ends
with (``finish``)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from steering_vllm.vectors.formats import RawVectors, SteeringVectorsError

IBM_SVEC = "ibm-svec"
EASYEDIT = "easyedit"
PYVENE = "pyvene"
HOTWIRE = "hotwire"
REPENG_GGUF = "repeng-gguf"
LLAMA_CPP_GGUF = "llama-cpp-gguf"
GGUF_UNKNOWN_WRITER = "gguf-control-vector"  # detected only: a GGUF whose writer its metadata does not tell
FORMATS = (IBM_SVEC, EASYEDIT, PYVENE, HOTWIRE, REPENG_GGUF, LLAMA_CPP_GGUF)

COMMON_OPTIONS = frozenset({"layers", "scale", "hidden_size"})
OPTIONS = {
    IBM_SVEC: COMMON_OPTIONS | {"expected_model"},
    EASYEDIT: COMMON_OPTIONS,
    PYVENE: COMMON_OPTIONS,
    HOTWIRE: COMMON_OPTIONS | {"expected_model", "vector_id"},
    REPENG_GGUF: COMMON_OPTIONS | {"expected_model", "gguf_layers"},
    LLAMA_CPP_GGUF: COMMON_OPTIONS | {"expected_model", "gguf_layers"},
    GGUF_UNKNOWN_WRITER: COMMON_OPTIONS | {"expected_model", "gguf_layers"},
}


def json_keys(path: Path) -> set[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def torch_load(path: Path, source: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise SteeringVectorsError(f"{source}: not a torch file readable with weights_only=True ({e})") from None


def as_vector(value, name: str, source: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.array(value))
    if not isinstance(value, torch.Tensor):
        raise SteeringVectorsError(f"{source}: {name} is a {type(value).__name__}, expected a 1-D float tensor")
    if value.dim() != 1:
        raise SteeringVectorsError(f"{source}: {name} has shape {tuple(value.shape)}, expected 1-D [hidden_size]")
    if not value.is_floating_point():
        raise SteeringVectorsError(f"{source}: {name} has dtype {value.dtype}, expected a float tensor")
    return value.detach().to(torch.float32).clone()


def parse_layers(layers, source: str) -> list[int] | None:
    """``layers=`` as a list of ints, None for "every layer in the file"."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return None
    if isinstance(layers, int):
        layers = [layers]
    try:
        chosen = [int(layer) for layer in layers]
    except (TypeError, ValueError):
        raise SteeringVectorsError(f"{source}: layers={layers!r}: expected layer numbers or 'all'") from None
    if len(set(chosen)) != len(chosen):
        raise SteeringVectorsError(f"{source}: layers={chosen}: a layer is named twice")
    return chosen


def select(found: dict[int, torch.Tensor], layers, source: str, what: str) -> dict[int, torch.Tensor]:
    chosen = parse_layers(layers, source)
    if chosen is None:
        return dict(found)
    missing = [layer for layer in chosen if layer not in found]
    if missing:
        raise SteeringVectorsError(
            f"{source}: layers={chosen}: the file has no {what} for layer(s) {missing} (it has {sorted(found)})"
        )
    return {layer: found[layer] for layer in chosen}


def check_lengths(named: dict[str, torch.Tensor], hidden_size: int | None, source: str) -> int:
    """The common length of the named vectors; refuses the first one that disagrees (or ``hidden_size``)."""
    expected = hidden_size
    first = "hidden_size option"
    for name, vector in named.items():
        length = int(vector.shape[0])
        if expected is None:
            expected, first = length, name
        elif length != expected:
            raise SteeringVectorsError(
                f"{source}: {name} has {length} elements, expected {expected} (from {first}): hidden sizes disagree"
            )
    if expected is None:
        raise SteeringVectorsError(f"{source}: no vectors to read")
    return int(expected)


def scale_option(options: dict, source: str) -> float:
    scale = options.get("scale", 1.0)
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise SteeringVectorsError(f"{source}: scale={scale!r}: expected a number") from None
    if not np.isfinite(value):
        raise SteeringVectorsError(f"{source}: scale={scale!r}: expected a finite number")
    return value


def finish(
    source: str,
    fmt: str,
    theirs: dict[int, torch.Tensor],
    names: dict[int, str],
    to_ours: Callable[[int], int],
    mapping: str,
    num_layers: int | None,
    own_num_layers: int | None,
    options: dict,
    model: str | None,
    provenance: dict[str, str],
) -> RawVectors:
    """Check lengths, map their layer ids to ours, check the range, scale; the ``RawVectors``."""
    hidden_size = check_lengths({names[t]: v for t, v in sorted(theirs.items())}, options.get("hidden_size"), source)
    scale = scale_option(options, source)
    ours: dict[int, torch.Tensor] = {}
    for their, vector in sorted(theirs.items()):
        layer = to_ours(their)
        if layer in ours:
            raise SteeringVectorsError(f"{source}: {names[their]} maps to layers.{layer}, which is already taken")
        ours[layer] = vector * scale if scale != 1.0 else vector
    needed = max(ours) + 1 if ours else 1
    total = num_layers if num_layers is not None else max(own_num_layers or 0, needed)
    for their in sorted(theirs):
        layer = to_ours(their)
        if layer >= total:
            raise SteeringVectorsError(
                f"{source}: {names[their]} maps to layers.{layer}, out of range for num_layers={total}"
            )
    prov = {"format": fmt, "source_file": source, "layer_mapping": mapping}
    prov.update(provenance)
    prov["layers_read"] = ",".join(str(t) for t in sorted(theirs))
    if scale != 1.0:
        prov["scale"] = repr(scale)
    return RawVectors(ours, total, hidden_size, model, source, prov)
