"""hotwire-vllm ``.pt`` vector files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from steering_vllm.vectors.foreign.common import finish, parse_layers, select, torch_load
from steering_vllm.vectors.foreign.hints import check_model_hint
from steering_vllm.vectors.formats import RawVectors, SteeringVectorsError


def read(path: Path, num_layers: int | None, *, fmt: str, detected: str | None, **options) -> RawVectors:
    """hotwire-vllm vectors (github moudrkat/hotwire-vllm 2d73fc4).

    ``hotwire/_state.py: SteerState.load_store`` reads each ``{id}.pt`` of ``$HOTWIRE_VECTORS`` (or one file)
    with ``torch.load``; a dict yields its first tensor value; the tensor is ``(n_layers, hidden)`` or
    ``(hidden,)``. ``SteerState.slot_for`` takes row ``t[layer]`` (or the 1-D tensor) for a request spec
    ``{"id", "layer", "scale"}``, and ``hotwire/_patch.py: _steered_forward`` adds ``scale * row`` to the
    ``hidden_states`` output of the decoder layer whose module name ends in ``.{layer}`` (vLLM keeps the
    residual split, so this is block ``layer``'s output): our ``layers.{layer}``. The table's rows are read at
    ``out.hidden_states[1:]`` (block outputs) by hidden-directions (``extract/refusal.py``), its usual maker.
    The file does not say which layer(s) to steer -- each request names one -- so ``layers=`` is required
    (``"all"`` takes every row of a table); ``scale=`` is the spec's scale. A brainscope ``manifest.json`` next
    to the file supplies the model and calibration notes.
    """
    directory = path if path.is_dir() else path.parent
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".pt")
        vector_id = options.get("vector_id")
        if vector_id is None:
            if len(files) != 1:
                raise SteeringVectorsError(
                    f"{path}: a hotwire vector directory with {len(files)} vectors "
                    f"({', '.join(p.stem for p in files[:8])}); pass vector_id=<id> (--vector-id) to choose one"
                )
            file = files[0]
        else:
            file = path / f"{vector_id}.pt"
            if not file.is_file():
                raise SteeringVectorsError(
                    f"{path}: no vector {vector_id!r} (has {', '.join(p.stem for p in files) or 'none'})"
                )
    else:
        file = path
        if options.get("vector_id") not in (None, path.stem):
            raise SteeringVectorsError(f"{path}: vector_id={options['vector_id']!r} names another file")
    source = str(file)
    value = torch_load(file, source)
    name = "the tensor"
    if isinstance(value, dict):
        tensors = [(k, v) for k, v in value.items() if isinstance(v, torch.Tensor)]
        if not tensors:
            raise SteeringVectorsError(f"{source}: a dict with no tensor value (keys {list(value)[:8]})")
        key, value = tensors[0]  # hotwire takes the first tensor value
        name = f"[{key!r}]"
    if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise SteeringVectorsError(
            f"{source}: {name} is {shape}, expected a float tensor [n_layers, hidden] or [hidden]"
        )
    manifest = _hotwire_manifest(directory, file)
    model = manifest.get("model") if isinstance(manifest.get("model"), str) else None
    check_model_hint(model, options.get("expected_model"), source)
    layers = options.get("layers")
    if layers is None:
        calibrated = manifest.get("calibrated") if isinstance(manifest.get("calibrated"), dict) else {}
        note = f" (its manifest says it was calibrated at layer {calibrated['layer']})" if "layer" in calibrated else ""
        raise SteeringVectorsError(
            f"{source}: hotwire applies one row per request spec {{'id', 'layer', 'scale'}}, so the file does not "
            f"say which layer(s) to steer{note}; pass layers=[L, ...] (and scale=)"
            + (", or layers='all' for every row" if value.dim() == 2 else "")
            + " (convert / inspect: --source-layers, --source-scale)"
        )
    if value.dim() == 2:
        if num_layers is not None and value.shape[0] != num_layers:
            raise SteeringVectorsError(
                f"{source}: {name} has {value.shape[0]} rows (n_layers), expected num_layers={num_layers}"
            )
        found = {row: value[row].to(torch.float32).clone() for row in range(value.shape[0])}
        names = {row: f"{name} row {row}" for row in found}
        own = int(value.shape[0])
    else:
        chosen = parse_layers(layers, source)
        if chosen is None:
            raise SteeringVectorsError(f"{source}: {name} is a single [hidden] vector; layers='all' needs a table")
        vector = value.to(torch.float32)
        found = {layer: vector.clone() for layer in chosen}
        names = {layer: f"{name} (for layer {layer})" for layer in chosen}
        own = None
    if any(layer < 0 for layer in found):
        raise SteeringVectorsError(f"{source}: layers={sorted(found)}: layer numbers must be ≥ 0")
    theirs = select(found, layers, source, "row")
    provenance = {"source_library": "hotwire-vllm ($HOTWIRE_VECTORS .pt)", "vector_id": file.stem}
    regime = manifest.get("calibration_regime")
    if isinstance(regime, dict) and regime.get("decode_only_recommended"):
        provenance["note"] = "manifest recommends decode_only (generated tokens only); steered at every position"
    return finish(
        source,
        fmt,
        theirs,
        names,
        lambda layer: layer,
        "their row / spec layer X (added to block X's output) -> our layers.{X}",
        num_layers,
        own,
        options,
        model,
        provenance,
    )


def _hotwire_manifest(directory: Path, file: Path) -> dict:
    """The brainscope ``export_hotwire`` manifest entry for ``file`` (github moudrkat/brainscope
    ``brainscope/export_hotwire.py: export``), or ``{}``."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    entries = data.get("vectors") if isinstance(data, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("file") == file.name:
            return entry
    return {}
