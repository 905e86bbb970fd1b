"""pyvene / pyreft ``IntervenableModel.save`` directories holding additive interventions."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from steering_vllm.vectors.foreign.common import as_vector, finish, select, torch_load
from steering_vllm.vectors.formats import RawVectors, SteeringVectorsError

_PYVENE_FIELDS = (
    "layer component unit max_number_of_units low_rank_dimension intervention_type intervention subspace_partition "
    "group_key intervention_link_key moe_key source_representation hidden_source_representation latent_dim"
).split()
_PYVENE_ADDITIVE = {
    "<class 'pyvene.models.interventions.AdditionIntervention'>": 1.0,
    "<class 'pyvene.models.interventions.SubtractionIntervention'>": -1.0,
}


def read(path: Path, num_layers: int | None, *, fmt: str, detected: str | None, **options) -> RawVectors:
    """A directory written by pyvene ``IntervenableModel.save`` (github stanfordnlp/pyvene 9e33390, v0.1.8;
    pyreft's ``ReftModel`` inherits it, github stanfordnlp/pyreft dafd099).

    ``pyvene/models/intervenable_base.py: IntervenableModel.save`` writes ``config.json`` (``IntervenableConfig.
    save_pretrained``: ``representations`` as lists, ``intervention_types`` as ``str(type(intervention))``,
    ``intervention_dimensions``, ``intervention_constant_sources``, ``sorted_keys``) and, for each trainable or
    constant-source intervention, ``intkey_{key}.bin`` = ``torch.save(intervention.state_dict())`` with
    ``key = f"layer_{layer}_comp_{component}_unit_{unit}_nunit_{max_number_of_units}#{n}"``
    (``_get_representation_key``). ``block_output`` of layer L is the output hook of ``model.layers[L]``
    (``pyvene/models/llama/modelings_intervenable_llama.py``; ``h[L]`` for GPT-2); ``AdditionIntervention.
    forward`` does ``base[..., :interchange_dim] += source_representation`` there, at every position when
    ``unit_locations`` is None (``_broadcast_unit_locations``): our ``layers.{L}``. Positions are chosen at call
    time and are not in the file; we apply at every position. Everything else (a source taken from another
    run, LoReFT and the other pyreft interventions, rotations, low-rank, masks, other components or units)
    is refused, saying why.
    """
    source = str(path)
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise SteeringVectorsError(
            f"{source}: expected a directory with pyvene's config.json; a directory of intkey_*.bin alone (from "
            "save_intervention / ReftTrainer.save_model) does not say where the interventions go: re-save it "
            "with IntervenableModel.save"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SteeringVectorsError(f"{config_file}: not readable JSON ({e})") from None
    if "intervenable_representations" in config:
        raise SteeringVectorsError(f"{config_file}: a pre-0.1 pyvene config; re-save it with pyvene >= 0.1")
    representations = config.get("representations")
    types = config.get("intervention_types")
    if not isinstance(representations, list) or not isinstance(types, list) or len(types) != len(representations):
        raise SteeringVectorsError(
            f"{config_file}: expected lists 'representations' and 'intervention_types' of the same length"
        )
    constant = config.get("intervention_constant_sources") or [None] * len(types)
    dims = config.get("intervention_dimensions") or [None] * len(types)
    counter: dict[str, int] = {}
    found: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    for i, (rep, type_name) in enumerate(zip(representations, types, strict=True)):
        if isinstance(rep, list):
            if len(rep) > len(_PYVENE_FIELDS):
                raise SteeringVectorsError(f"{config_file}: representations[{i}] has {len(rep)} fields, expected ≤14")
            rep = dict(zip(_PYVENE_FIELDS[: len(rep)], rep, strict=True))
        if not isinstance(rep, dict):
            raise SteeringVectorsError(f"{config_file}: representations[{i}] is {rep!r}, expected a list or object")
        layer, component = rep.get("layer", 0), rep.get("component", "block_output")
        unit, units = rep.get("unit", "pos"), rep.get("max_number_of_units", 1)
        proposal = (
            f"comp_{str(component).replace('.', '_')}_unit_{str(unit).replace('.', '_')}_nunit_{units}"
            if "." in str(component)
            else f"layer_{layer}_comp_{component}_unit_{str(unit).replace('.', '_')}_nunit_{units}"
        )
        counter[proposal] = counter.get(proposal, -1) + 1
        key = f"{proposal}#{counter[proposal]}"
        what = f"intervention {key!r} ({type_name})"
        sign = _PYVENE_ADDITIVE.get(type_name)
        if sign is None:
            short = str(type_name).rsplit(".", 1)[-1].rstrip("'>")
            raise SteeringVectorsError(
                f"{source}: {what} is not a plain additive vector: {short} computes its edit from the hidden "
                "state (rotation / low-rank / learned projection, e.g. LoReFT h + R^T(Wh + b - Rh)) or replaces "
                "it; only pyvene AdditionIntervention / SubtractionIntervention with a saved constant source can "
                "be converted"
            )
        if component != "block_output":
            raise SteeringVectorsError(
                f"{source}: {what} is on component {component!r}; only 'block_output' (a decoder block's "
                "output) maps to our layers"
            )
        if unit != "pos":
            raise SteeringVectorsError(
                f"{source}: {what} has unit {unit!r}; only 'pos' (every position of the residual stream) is read"
            )
        if not isinstance(layer, int) or layer < 0:
            raise SteeringVectorsError(f"{source}: {what} has layer {layer!r}, expected a block index ≥ 0")
        binary = path / f"intkey_{key}.bin"
        if constant[i] is False or not binary.is_file():
            raise SteeringVectorsError(
                f"{source}: {what} has no saved constant source ({binary.name} "
                f"{'missing' if not binary.is_file() else 'not a constant source'}): its source comes from "
                "another forward pass at call time, so there is no vector to read"
            )
        state = torch_load(binary, str(binary))
        if not isinstance(state, dict) or "source_representation" not in state:
            raise SteeringVectorsError(f"{binary}: expected a state dict with 'source_representation'")
        vector = as_vector(state["source_representation"], f"{key}: 'source_representation'", source)
        dim = dims[i] if i < len(dims) else None
        if isinstance(dim, list):
            raise SteeringVectorsError(f"{source}: {what} has interchange dims {dim}, expected one integer")
        if dim is not None and int(dim) < vector.shape[0]:
            vector[int(dim) :] = 0.0  # pyvene adds source[..., :interchange_dim] only
        vector = vector * sign
        if layer in found:  # two interventions on one block: pyvene applies both; the sum is the same edit
            found[layer] = found[layer] + vector
            names[layer] += f" + {key!r}"
        else:
            found[layer], names[layer] = vector, f"{key!r}: 'source_representation'"
    if not found:
        raise SteeringVectorsError(f"{config_file}: no interventions")
    theirs = select(found, options.get("layers"), source, "intervention")
    provenance = {
        "source_library": "pyvene (IntervenableModel.save)",
        "positions": "every position (pyvene's unit_locations are chosen at call time, not saved)",
    }
    model_class = config.get("model_type")
    if isinstance(model_class, str) and model_class:
        provenance["model_class"] = model_class
    return finish(
        source,
        fmt,
        theirs,
        names,
        lambda layer: layer,
        "their layer X block_output (added to block X's output) -> our layers.{X}",
        num_layers,
        None,
        options,
        None,
        provenance,
    )
