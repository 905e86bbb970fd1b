"""GGUF control vectors: repeng's and llama.cpp's cvector-generator's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from steering_vllm.vectors.foreign.common import (
    GGUF_UNKNOWN_WRITER,
    LLAMA_CPP_GGUF,
    REPENG_GGUF,
    as_vector,
    finish,
    select,
)
from steering_vllm.vectors.foreign.hints import check_model_hint
from steering_vllm.vectors.formats import GGUF_ARCH, RawVectors, SteeringVectorsError

DIRECTION_NAME = re.compile(r"^direction\.(0|[1-9][0-9]*)$")


def _gguf_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise SteeringVectorsError(f"{path}: not a readable GGUF file ({e})") from None


def _gguf_str(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _gguf_layer_count(reader) -> tuple[str | None, int | None]:
    """The type name and value of ``controlvector.layer_count`` (None, None if absent)."""
    field = reader.get_field(f"{GGUF_ARCH}.layer_count")
    if field is None:
        return None, None
    type_name = field.types[0].name if field.types else None
    if len(field.types) != 1 or type_name == "STRING" or type_name == "ARRAY":
        return type_name, None
    return type_name, int(field.parts[field.data[0]][0])


def detect_writer(path: Path) -> str | None:
    try:
        reader = _gguf_reader(path)
    except SteeringVectorsError:
        return None
    if _gguf_str(reader, "general.architecture") != GGUF_ARCH:
        return None
    return _gguf_writer(reader)


def _gguf_writer(reader) -> str:
    """Who wrote a control-vector GGUF, from the type of ``controlvector.layer_count``.

    repeng (``repeng/extract.py: ControlVector.export_gguf``, every version since 6a5e9ec, 2024-02) and our own
    writer use gguf-py ``add_uint32``: UINT32. llama.cpp's cvector-generator (``tools/cvector-generator/
    cvector-generator.cpp: export_gguf``, also as ``examples/cvector-generator``) uses ``gguf_set_val_i32``:
    INT32. Nothing else differs reliably: both write ``general.architecture = "controlvector"``,
    ``controlvector.model_hint`` (repeng: HF ``config.model_type``; llama.cpp: the model GGUF's
    ``general.architecture``, mostly the same strings) and F32 ``direction.N`` tensors (repeng in its dict
    order, by default descending; llama.cpp ascending 1..n_layer-1), and no ``general.*`` beyond the
    architecture. A missing or other-typed count is not guessed.
    """
    type_name, _ = _gguf_layer_count(reader)
    if type_name == "UINT32":
        return REPENG_GGUF
    if type_name == "INT32":
        return LLAMA_CPP_GGUF
    return GGUF_UNKNOWN_WRITER


def writer_evidence(path: Path) -> str:
    type_name, _ = _gguf_layer_count(_gguf_reader(path))
    if type_name is None:
        return "no controlvector.layer_count"
    return f"controlvector.layer_count is {type_name}, neither repeng's UINT32 nor llama.cpp's INT32"


def read(path: Path, num_layers: int | None, *, fmt: str, detected: str | None, **options) -> RawVectors:
    """A GGUF control vector from repeng or llama.cpp's cvector-generator.

    How llama.cpp applies ``direction.N`` (github ggml-org/llama.cpp): ``common/common.cpp:
    common_control_vector_load_one`` rejects N = 0 and puts direction.N in row N-1 of the buffer that
    ``src/llama-adapter.cpp: llama_adapter_cvec::apply`` copies into ``tensors[N]`` (there is never a tensor for
    layer 0); ``llama_adapter_cvec::apply_to(ctx, cur, il)`` adds ``tensors[il]``, called by each model's graph
    as ``cur = build_cvec(cur, il); cb(cur, "l_out", il);`` after the block's last residual add
    (``src/models/llama.cpp``): direction.N is added to block N's OUTPUT, at every position. Metadata is not read.

    repeng (github vgel/repeng 0ba7196): ``repeng/extract.py: batched_get_hiddens`` reads
    ``out.hidden_states[layer + 1]`` (block ``layer``'s output) and ``ControlVector.export_gguf`` writes it as
    ``direction.{layer}``; ``repeng/control.py: ControlModule.forward`` adds it to ``model.layers[layer]``'s
    output: read and added at block N's output -> our ``layers.{N}``.

    llama.cpp's ``tools/cvector-generator/cvector-generator.cpp``: ``cb_eval`` collects the ``l_out`` tensors
    with ``n_tokens`` rows (the last block's has only the output rows, so n_layer-1 of them, blocks 0..n-2, in
    order), ``mean::run`` / ``PCA::run_pca`` name ``v_final[il]`` ``"direction.%zu", il+1``: direction.N holds
    what was read at block N-1's OUTPUT and llama.cpp adds it at block N's output -- the one-block shift.

    ``gguf_layers="as-applied"`` (default) reproduces llama.cpp for every writer: our ``layers.{N}``.
    ``"as-read"`` puts it where it was read: repeng ``layers.{N}``, llama.cpp ``layers.{N-1}``.
    """
    source = str(path)
    reader = _gguf_reader(path)
    arch = _gguf_str(reader, "general.architecture")
    if arch != GGUF_ARCH:
        raise SteeringVectorsError(
            f"{source}: GGUF architecture is {arch!r}, expected {GGUF_ARCH!r} (a control vector)"
        )
    hint = _gguf_str(reader, f"{GGUF_ARCH}.model_hint")
    check_model_hint(hint, options.get("expected_model"), source)
    count_type, count = _gguf_layer_count(reader)
    found: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    for tensor in reader.tensors:
        match = DIRECTION_NAME.match(tensor.name)
        if match is None:
            raise SteeringVectorsError(f"{source}: unknown tensor name {tensor.name!r} (expected 'direction.<N>')")
        if tensor.tensor_type.name != "F32":
            raise SteeringVectorsError(
                f"{source}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, expected F32"
            )
        n = int(match.group(1))
        if n in found:
            raise SteeringVectorsError(f"{source}: tensor {tensor.name!r} appears twice")
        found[n] = as_vector(np.array(tensor.data), f"tensor {tensor.name!r}", source)
        names[n] = f"tensor {tensor.name!r}"
    if not found:
        raise SteeringVectorsError(f"{source}: no 'direction.<N>' tensors")
    theirs = select(found, options.get("layers"), source, "direction tensor")
    provenance = {"writer_evidence": f"controlvector.layer_count type {count_type or 'absent'}"}
    if detected != fmt:
        provenance["writer"] = f"given as fmt={fmt!r} (detected {detected!r})"
    if hint:
        provenance["model_hint"] = hint
    mode = options.get("gguf_layers", "as-applied")
    if mode not in ("as-applied", "as-read"):
        raise SteeringVectorsError(f"{source}: gguf_layers={mode!r}; expected 'as-applied' or 'as-read'")
    provenance["source_library"] = {
        REPENG_GGUF: "repeng (ControlVector.export_gguf) or steering-vllm",
        LLAMA_CPP_GGUF: "llama.cpp cvector-generator",
        GGUF_UNKNOWN_WRITER: "unknown (the metadata does not tell)",
    }[fmt]
    provenance["gguf_layers"] = mode
    if mode == "as-applied":
        mapping = "their direction.X (llama.cpp adds it at block X's output) -> our layers.{X}"
        return finish(
            source, fmt, theirs, names, lambda n: n, mapping, num_layers, None, options, hint or None, provenance
        )
    if fmt == GGUF_UNKNOWN_WRITER:
        raise SteeringVectorsError(
            f"{source}: gguf_layers='as-read' needs the file's writer, which its metadata does not tell "
            f"({writer_evidence(path)}): repeng's ControlVector.export_gguf numbers direction.N by the block "
            f"it was read at, llama.cpp's cvector-generator by the block after it. Pass fmt={REPENG_GGUF!r} or "
            f"fmt={LLAMA_CPP_GGUF!r} (--format) to say which wrote it"
        )
    if fmt == REPENG_GGUF:
        mapping = "their direction.X (read at and added to block X's output) -> our layers.{X}"
        return finish(
            source, fmt, theirs, names, lambda n: n, mapping, num_layers, None, options, hint or None, provenance
        )
    if 0 in theirs:
        raise SteeringVectorsError(
            f"{source}: tensor 'direction.0': cvector-generator never writes it and llama.cpp refuses it "
            f'("invalid (zero) direction tensor layer index"); if repeng wrote this file, pass fmt={REPENG_GGUF!r}'
        )
    # cvector-generator writes n_layer - 1 directions and says so in layer_count: the model has count + 1 blocks.
    own = count + 1 if count is not None and count > 0 else None
    mapping = "their direction.X (read at block X-1's output; llama.cpp adds it at block X's) -> our layers.{X-1}"
    return finish(
        source, fmt, theirs, names, lambda n: n - 1, mapping, num_layers, own, options, hint or None, provenance
    )
