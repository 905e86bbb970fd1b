"""Reading and writing steering vectors in every format DESIGN.md §4 names.

- ``.safetensors`` in our format (``layers.{l}`` + metadata), the contract;
- an HF checkpoint (file or directory) whose ``model.layers.{l}.mlp.down_proj.bias`` tensors hold the
  vectors, as the paper's code saves them;
- the paper code's ``.npy`` of shape [L, d];
- llama.cpp / repeng GGUF control vectors: ``direction.{n}`` is added to the output of block n (0-based),
  so it is our ``layers.{n}``; llama.cpp has no slot for block 0, so a vector on layer 0 cannot be written.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from steering_vllm.vectors import SteeringVectors, SteeringVectorsError

_HF_BIAS = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.down_proj\.bias$")
_GGUF_DIRECTION = re.compile(r"^direction\.(\d+)$")
GGUF_ARCH = "controlvector"


def load_any(path: Path, num_layers: int | None = None) -> SteeringVectors:
    if path.is_dir():
        return load_hf_checkpoint(path, num_layers)
    if not path.exists():
        raise SteeringVectorsError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return load_npy(path)
    if suffix == ".gguf":
        return load_gguf(path, num_layers)
    if suffix == ".safetensors":
        return load_safetensors(path, num_layers)
    raise SteeringVectorsError(
        f"{path}: unknown extension {path.suffix!r}; expected .safetensors, .npy, .gguf or an HF checkpoint directory"
    )


def save_any(vectors: SteeringVectors, path: Path) -> Path:
    suffix = path.suffix.lower()
    writers = {".safetensors": _write_safetensors, ".gguf": _write_gguf, ".npy": _write_npy}
    if suffix not in writers:
        raise SteeringVectorsError(f"{path}: cannot write {path.suffix!r}; use .safetensors, .gguf or .npy")
    if suffix == ".gguf":
        _check_gguf_writable(vectors, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        writers[suffix](vectors, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---- safetensors: ours or an HF checkpoint file ---------------------------------------------------------------


def load_safetensors(path: Path, num_layers: int | None = None) -> SteeringVectors:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            names = list(f.keys())
            if metadata.get("format") != "steering-vectors" and any(_HF_BIAS.match(n) for n in names):
                tensors = None
            else:
                tensors = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as e:
        raise SteeringVectorsError(f"{path}: not a readable safetensors file ({e})") from None
    if tensors is None:
        return load_hf_checkpoint(path, num_layers)
    return SteeringVectors._from_safetensors(tensors, metadata, str(path))


def _write_safetensors(vectors: SteeringVectors, path: Path) -> None:
    path.write_bytes(vectors.to_bytes())


# ---- HF checkpoints with down_proj.bias (the paper code's) ------------------------------------------------------


def load_hf_checkpoint(path: Path, num_layers: int | None = None) -> SteeringVectors:
    """Vectors from ``model.layers.{l}.mlp.down_proj.bias`` in a checkpoint file or directory (all shards)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise SteeringVectorsError(f"{path}: no .safetensors files in this directory")
    config = _read_hf_config(path if path.is_dir() else path.parent)
    vectors: dict[int, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    match = _HF_BIAS.match(name)
                    if match:
                        vectors[int(match.group(1))] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise SteeringVectorsError(f"{file}: not a readable safetensors file ({e})") from None
    if not vectors:
        raise SteeringVectorsError(f"{path}: no 'model.layers.<l>.mlp.down_proj.bias' tensors found")
    hidden_size = _common_length(vectors, path)
    num_layers = config.get("num_hidden_layers") or num_layers or max(vectors) + 1
    return SteeringVectors(vectors, num_layers, hidden_size, model=config.get("_name_or_path"), source=str(path))


def _read_hf_config(directory: Path) -> dict:
    config_file = directory / "config.json"
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text())
    return config.get("text_config", config)


# ---- .npy [L, d] (the paper code's) ------------------------------------------------------------------------


def load_npy(path: Path) -> SteeringVectors:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise SteeringVectorsError(f"{path}: not a readable .npy file ({e})") from None
    if array.ndim != 2:
        raise SteeringVectorsError(f"{path}: expected an array of shape [num_layers, hidden_size], got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise SteeringVectorsError(f"{path}: expected a float array, got dtype {array.dtype}")
    return SteeringVectors.from_tensor(torch.from_numpy(array.astype(np.float32)), source=str(path))


def _write_npy(vectors: SteeringVectors, path: Path) -> None:
    with open(path, "wb") as f:
        np.save(f, vectors.to_tensor().numpy())


# ---- GGUF control vectors (llama.cpp, repeng) ---------------------------------------------------------------


def load_gguf(path: Path, num_layers: int | None = None) -> SteeringVectors:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise SteeringVectorsError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _gguf_string(reader, "general.architecture")
    if arch != GGUF_ARCH:
        raise SteeringVectorsError(f"{path}: GGUF architecture is {arch!r}, expected {GGUF_ARCH!r} (a control vector)")
    vectors: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = _GGUF_DIRECTION.match(tensor.name)
        if match is None:
            raise SteeringVectorsError(f"{path}: unknown tensor name {tensor.name!r} (expected 'direction.<block>')")
        data = np.asarray(tensor.data)
        if data.ndim != 1:
            raise SteeringVectorsError(f"{path}: tensor {tensor.name!r} has shape {data.shape}, expected 1-D")
        vectors[int(match.group(1))] = torch.from_numpy(data.astype(np.float32))
    if not vectors:
        raise SteeringVectorsError(f"{path}: no 'direction.<block>' tensors found")
    hidden_size = _common_length(vectors, path)
    return SteeringVectors(
        vectors,
        num_layers or max(vectors) + 1,
        hidden_size,
        model=_gguf_string(reader, f"{GGUF_ARCH}.model_hint") or None,
        source=str(path),
    )


def _check_gguf_writable(vectors: SteeringVectors, path: Path) -> None:
    layer0 = vectors.vectors.get(0)
    if layer0 is not None and bool(layer0.any()):
        raise SteeringVectorsError(
            f"{path}: layer 0 has a non-zero vector, which GGUF control vectors cannot hold (llama.cpp has no "
            "slot for block 0); drop it first with select_layers / --layers if that is what you want"
        )


def _write_gguf(vectors: SteeringVectors, path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, arch=GGUF_ARCH)
    writer.add_string(f"{GGUF_ARCH}.model_hint", vectors.model or "")
    layers = [layer for layer in sorted(vectors.vectors) if layer > 0]
    # llama.cpp's cvector-generator and repeng both record the number of direction tensors here.
    writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(layers))
    for layer in layers:
        writer.add_tensor(f"direction.{layer}", vectors.vectors[layer].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_string(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _common_length(vectors: dict[int, torch.Tensor], source: Path) -> int:
    lengths = {int(v.shape[-1]) if v.dim() else 0 for v in vectors.values()}
    if len(lengths) != 1:
        raise SteeringVectorsError(f"{source}: vectors have different lengths {sorted(lengths)}")
    return lengths.pop()
