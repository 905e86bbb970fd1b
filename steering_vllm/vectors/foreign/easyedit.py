"""EasyEdit / EasySteer ``layer_{L}.pt`` files."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from steering_vllm.vectors.foreign.common import as_vector, finish, select, torch_load
from steering_vllm.vectors.formats import RawVectors, SteeringVectorsError

EASYEDIT_FILE = re.compile(r"^layer_(0|[1-9][0-9]*)\.pt$")


def read(path: Path, num_layers: int | None, *, fmt: str, detected: str | None, **options) -> RawVectors:
    """EasyEdit's steering vectors (github zjunlp/EasyEdit, 14cea82).

    Written by ``steer/vector_generators/caa/generate_caa_vectors.py: generate_caa_vectors``
    (``torch.save(vec, os.path.join(steer_vector_output_dir, f"layer_{layer}.pt"))``, ``vec`` the 1-D mean
    difference, in the model's dtype) and ``sae_feature/generate_sae_feature_vectors.py`` (same name, 1-D).
    Read by ``model.get_last_activations(layer)`` = ``BlockOutputWrapper.activations`` = ``output[0]`` of
    ``model.model.layers[layer]`` (``steer/models/model_wrapper.py``): block L's OUTPUT. Added by
    ``steer/vector_appliers/caa/apply_caa.py: apply_caa`` -> ``set_add_activations(layer, multiplier * vector)``
    -> ``BlockOutputWrapper.forward`` adds it to the same block's ``output[0]`` at every position (unless
    ``steer_from_end_position`` is configured at generation time): our ``layers.{L}``. ``scale=`` is
    EasyEdit's ``multipliers``. RePS/SFT/SpLiT also write ``layer_{L}.pt``, but as intervention state dicts:
    those are refused.
    """
    if path.is_dir():
        files = {int(m.group(1)): p for p in path.iterdir() if (m := EASYEDIT_FILE.match(p.name)) and p.is_file()}
        if not files:
            raise SteeringVectorsError(f"{path}: no EasyEdit 'layer_<L>.pt' files in this directory")
    else:
        match = EASYEDIT_FILE.match(path.name)
        if match is None:
            raise SteeringVectorsError(f"{path}: an EasyEdit vector file is named 'layer_<L>.pt'")
        files = {int(match.group(1)): path}
    files = select(files, options.get("layers"), str(path), "layer_<L>.pt file")
    theirs: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    for layer, file in sorted(files.items()):
        value = torch_load(file, str(file))
        if isinstance(value, dict):
            raise SteeringVectorsError(
                f"{file}: holds a dict ({', '.join(map(str, list(value)[:5]))}), not a vector: EasyEdit's RePS / "
                "SFT / SpLiT interventions are not plain additive vectors; only CAA / SAE-feature vectors are read"
            )
        theirs[layer] = as_vector(value, "the tensor", str(file))
        names[layer] = f"'{file.name}'"
    return finish(
        str(path),
        fmt,
        theirs,
        names,
        lambda layer: layer,
        "their layer_X.pt (read at and added to block X's output) -> our layers.{X}",
        num_layers,
        None,
        options,
        None,
        {"source_library": "EasyEdit (steer/vector_generators, layer_{L}.pt)"},
    )
