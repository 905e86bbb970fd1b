"""IBM activation-steering ``.svec`` files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from steering_vllm.vectors.foreign.common import as_vector, finish, parse_layers, select
from steering_vllm.vectors.foreign.hints import check_model_hint
from steering_vllm.vectors.formats import RawVectors, SteeringVectorsError


def read(path: Path, num_layers: int | None, *, fmt: str, detected: str | None, **options) -> RawVectors:
    """IBM activation-steering ``.svec`` (github IBM/activation-steering, 52be602, 2025-08-29).

    Written by ``activation_steering/steering_vector.py: SteeringVector.save``: ``json.dump({"model_type":
    model.config.model_type, "directions": {k: v.tolist()}, "explained_variances": {...}})`` (JSON turns the int
    layer keys into strings). Read by ``batched_get_hiddens`` at ``out.hidden_states[layer_id + 1]`` (block
    layer_id's OUTPUT; ``read_representations`` makes negative ids non-negative first, default ids are all of
    ``range(num_hidden_layers)``). Added by ``leash_layer.py: LeashLayer.forward``, which wraps
    ``model.model.layers[layer_id]`` and adds ``behavior_vector`` (``malleable_model.py: MalleableModel.steer``:
    ``behavior_vector_strength * directions[layer_id]`` for each of ``behavior_layer_ids``) to ``hidden_states``
    BEFORE calling the block: block layer_id's INPUT = block layer_id-1's output = our ``layers.{layer_id-1}``.
    ``directions[0]`` would go into block 0's input (the embeddings), which we cannot steer.
    ``layers=`` is IBM's ``behavior_layer_ids``, ``scale=`` its ``behavior_vector_strength``.
    """
    source = str(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SteeringVectorsError(
            f"{source}: not a readable IBM activation-steering .svec (JSON) file ({e})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("directions"), dict):
        raise SteeringVectorsError(f"{source}: expected a JSON object with a 'directions' object (IBM .svec)")
    model_type = data.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise SteeringVectorsError(f"{source}: 'model_type' is {model_type!r}, expected a string")
    check_model_hint(model_type, options.get("expected_model"), source)
    found: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    for key, values in data["directions"].items():
        if not re.fullmatch(r"0|[1-9][0-9]*", str(key)):
            raise SteeringVectorsError(f"{source}: directions[{key!r}]: expected a non-negative layer number")
        name = f"directions[{key!r}]"
        try:
            array = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError):
            raise SteeringVectorsError(f"{source}: {name} is not a list of numbers") from None
        found[int(key)] = as_vector(array, name, source)
        names[int(key)] = name
    if not found:
        raise SteeringVectorsError(f"{source}: 'directions' is empty")
    explicit = parse_layers(options.get("layers"), source) is not None
    theirs = select(found, options.get("layers"), source, "direction")
    if 0 in theirs:
        if bool(theirs[0].any()):
            hint = (
                "you asked for it in layers="
                if explicit
                else "pass layers=[...] (IBM's behavior_layer_ids) without 0 (convert / inspect: --source-layers 1-N)"
            )
            raise SteeringVectorsError(
                f"{source}: directions['0'] is non-zero; IBM adds directions[i] at the INPUT of block i, and the "
                f"input of block 0 (the embeddings) cannot be steered here; {hint}"
            )
        del theirs[0]  # zero: nothing to add
    if not theirs:
        raise SteeringVectorsError(f"{source}: no direction left to steer with (only directions['0'], all zero)")
    provenance = {"source_library": "IBM activation-steering (SteeringVector.save)"}
    if model_type:
        provenance["model_type"] = model_type
    return finish(
        source,
        fmt,
        theirs,
        names,
        lambda i: i - 1,
        "their directions[X] (read at block X's output, added at block X's input) -> our layers.{X-1}",
        num_layers,
        max(found) + 1,
        options,
        None,
        provenance,
    )
