"""Reading and writing steering vectors in every format DESIGN.md §4 names.

- ``.safetensors`` in our format (``layers.{l}`` + metadata), the contract;
- an HF checkpoint (file or directory) whose ``model.layers.{l}.mlp.down_proj.bias`` tensors hold the
  vectors, as the paper's code saves them;
- the paper code's ``.npy`` of shape [L, d];
- llama.cpp / repeng GGUF control vectors: ``direction.{n}`` is added to the output of block n (0-based),
  so it is our ``layers.{n}``; llama.cpp has no slot for block 0, so a vector on layer 0 cannot be written.
  GGUF and the other libraries' files are read by ``foreign``; ``reading.read`` picks the reader for a path.

Readers return a ``RawVectors`` (the layers' tensors as the file holds them, the shape and where they came from)
and writers take the same plain data; ``SteeringVectors`` (``steering_vectors.py``) is the one constructor that
checks them. This module imports nothing of the package.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FORMAT = "steering-vectors"
FORMAT_VERSION = "1"
SITE = "block_output"
PROVENANCE_KEY = "provenance"  # optional metadata: a JSON object of strings saying how the vectors were made
_TENSOR_NAME = re.compile(r"^layers\.(0|[1-9][0-9]*)$")

_HF_BIAS = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.down_proj\.bias$")
GGUF_ARCH = "controlvector"


class SteeringVectorsError(ValueError):
    """A steering-vector file or tensor that cannot be used; the message names the source and the problem."""


@dataclass(frozen=True)
class RawVectors:
    """What a file holds, before any check of the values: layer index -> tensor, and the table's shape.

    ``provenance``: how the vectors were made or converted (plain strings, e.g. the extraction method or the
    foreign format read and how its layers were mapped); written into our format's metadata as one JSON string.
    """

    vectors: dict[int, torch.Tensor]
    num_layers: int
    hidden_size: int
    model: str | None
    source: str
    provenance: dict[str, str] = field(default_factory=dict)


def write(raw: RawVectors, path: Path) -> Path:
    """Write ``.safetensors`` (ours), ``.gguf`` (llama.cpp's) or ``.npy`` (the paper's) by extension, atomically."""
    suffix = path.suffix.lower()
    writers = {".safetensors": _write_safetensors, ".gguf": _write_gguf, ".npy": _write_npy}
    if suffix not in writers:
        raise SteeringVectorsError(f"{path}: cannot write {path.suffix!r}; use .safetensors, .gguf or .npy")
    if suffix == ".gguf":
        _check_gguf_writable(raw, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        writers[suffix](raw, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---- safetensors: ours or an HF checkpoint file ---------------------------------------------------------------


def load_safetensors(path: Path, num_layers: int | None = None) -> RawVectors:
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
    return parse_ours(tensors, metadata, str(path))


def parse_bytes(data: bytes, source: str) -> RawVectors:
    """Safetensors bytes in our format (e.g. an HTTP request body)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        metadata = _read_header_metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise SteeringVectorsError(f"{source}: not a readable safetensors file ({e})") from None
    return parse_ours(tensors, metadata, source)


def parse_ours(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> RawVectors:
    """Our format's tensors and metadata, their names and metadata checked (DESIGN.md §4)."""
    fmt = metadata.get("format")
    if fmt != FORMAT:
        raise SteeringVectorsError(f"{source}: metadata 'format' is {fmt!r}, expected {FORMAT!r}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise SteeringVectorsError(
            f"{source}: metadata 'format_version' is {version!r}; this version reads {FORMAT_VERSION!r}"
        )
    num_layers = _int_metadata(metadata, "num_layers", source)
    hidden_size = _int_metadata(metadata, "hidden_size", source)
    site = metadata.get("site", SITE)
    if site != SITE:
        raise SteeringVectorsError(f"{source}: metadata 'site' is {site!r}; only {SITE!r} is supported")
    vectors = {}
    for name, tensor in tensors.items():
        match = _TENSOR_NAME.match(name)
        if match is None:
            raise SteeringVectorsError(f"{source}: unknown tensor name {name!r} (expected 'layers.<index>')")
        vectors[int(match.group(1))] = tensor
    for layer in vectors:
        if layer >= num_layers:
            raise SteeringVectorsError(
                f"{source}: tensor 'layers.{layer}': layer index out of range for num_layers={num_layers}"
            )
    return RawVectors(vectors, num_layers, hidden_size, metadata.get("model"), source, _provenance(metadata, source))


def _provenance(metadata: dict[str, str], source: str) -> dict[str, str]:
    text = metadata.get(PROVENANCE_KEY)
    if text is None:
        return {}
    try:
        provenance = json.loads(text)
    except json.JSONDecodeError:
        provenance = None
    if not isinstance(provenance, dict) or not all(isinstance(v, str) for v in provenance.values()):
        raise SteeringVectorsError(f"{source}: metadata {PROVENANCE_KEY!r} is not a JSON object of strings")
    return provenance


def ours_metadata(
    num_layers: int, hidden_size: int, model: str | None, provenance: dict[str, str] | None = None
) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hidden_size": str(hidden_size),
        "num_layers": str(num_layers),
        "site": SITE,
    }
    if model:
        meta["model"] = model
    if provenance:
        meta[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    return meta


def ours_bytes(raw: RawVectors) -> bytes:
    from safetensors.torch import save

    tensors = {f"layers.{layer}": vector.contiguous() for layer, vector in sorted(raw.vectors.items())}
    return save(tensors, metadata=ours_metadata(raw.num_layers, raw.hidden_size, raw.model, raw.provenance))


def _write_safetensors(raw: RawVectors, path: Path) -> None:
    path.write_bytes(ours_bytes(raw))


def _int_metadata(metadata: dict[str, str], key: str, source: str) -> int:
    value = metadata.get(key)
    if value is None:
        raise SteeringVectorsError(f"{source}: metadata {key!r} is missing")
    try:
        return int(value)
    except ValueError:
        raise SteeringVectorsError(f"{source}: metadata {key!r} is {value!r}, expected an integer") from None


def _read_header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (safetensors.torch.load drops it)."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__") or {}


# ---- HF checkpoints with down_proj.bias (the paper code's) ------------------------------------------------------


def load_hf_checkpoint(path: Path, num_layers: int | None = None) -> RawVectors:
    """Vectors from ``model.layers.{l}.mlp.down_proj.bias`` in a checkpoint file or directory (all shards)."""
    from safetensors import SafetensorError, safe_open

    files = _hf_files(path)
    config = _read_hf_config(path if path.is_dir() else path.parent)
    vectors: dict[int, torch.Tensor] = {}
    found: dict[int, str] = {}  # layer -> where its bias was read
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    match = _HF_BIAS.match(name)
                    if match:
                        layer, where = int(match.group(1)), f"{file.name}: {name}"
                        if layer in found:
                            raise SteeringVectorsError(f"{path}: layer {layer}'s bias appears twice ({found[layer]}; "
                                                       f"{where})")  # fmt: skip
                        vectors[layer], found[layer] = f.get_tensor(name), where
        except (SafetensorError, OSError) as e:
            raise SteeringVectorsError(f"{file}: not a readable safetensors file ({e})") from None
    if not vectors:
        raise SteeringVectorsError(f"{path}: no 'model.layers.<l>.mlp.down_proj.bias' tensors found")
    hidden_size = _common_length(vectors, path)
    num_layers = config.get("num_hidden_layers") or num_layers or max(vectors) + 1
    return RawVectors(vectors, num_layers, hidden_size, config.get("_name_or_path"), str(path))


def _hf_files(path: Path) -> list[Path]:
    """The checkpoint's files: ``path`` itself, or a directory's shards (those its index names, when it has one:
    a leftover shard of another save beside them must not be read)."""
    if not path.is_dir():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SteeringVectorsError(f"{index}: not a safetensors index ({e})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise SteeringVectorsError(f"{index}: names shard(s) {missing} that are not in {path}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SteeringVectorsError(f"{path}: no .safetensors files in this directory")
    return files


def _read_hf_config(directory: Path) -> dict:
    config_file = directory / "config.json"
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SteeringVectorsError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise SteeringVectorsError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    return config.get("text_config", config)


# ---- .npy [L, d] (the paper code's) ------------------------------------------------------------------------


def load_npy(path: Path) -> RawVectors:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise SteeringVectorsError(f"{path}: not a readable .npy file ({e})") from None
    if array.ndim != 2:
        raise SteeringVectorsError(f"{path}: expected an array of shape [num_layers, hidden_size], got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise SteeringVectorsError(f"{path}: expected a float array, got dtype {array.dtype}")
    table = torch.from_numpy(array.astype(np.float32))
    vectors = {layer: row for layer, row in enumerate(table) if bool(row.any())}
    return RawVectors(vectors, table.shape[0], table.shape[1], None, str(path))


def _write_npy(raw: RawVectors, path: Path) -> None:
    table = np.zeros((raw.num_layers, raw.hidden_size), dtype=np.float32)
    for layer, vector in raw.vectors.items():
        table[layer] = vector.numpy()
    with open(path, "wb") as f:
        np.save(f, table)


# ---- GGUF control vectors (llama.cpp, repeng) ---------------------------------------------------------------


def _check_gguf_writable(raw: RawVectors, path: Path) -> None:
    layer0 = raw.vectors.get(0)
    if layer0 is not None and bool(layer0.any()):
        raise SteeringVectorsError(
            f"{path}: layer 0 has a non-zero vector, which GGUF control vectors cannot hold (llama.cpp has no "
            "slot for block 0); drop it first with select_layers / --layers if that is what you want"
        )
    if not any(layer > 0 and bool(vector.any()) for layer, vector in raw.vectors.items()):
        raise SteeringVectorsError(f"{path}: no vector on a layer above 0, and a GGUF control vector with no "
                                   "direction tensors is not a file llama.cpp (or this reader) can load")  # fmt: skip


def _write_gguf(raw: RawVectors, path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, arch=GGUF_ARCH)
    writer.add_string(f"{GGUF_ARCH}.model_hint", raw.model or "")
    layers = [layer for layer in sorted(raw.vectors) if layer > 0]
    # llama.cpp's cvector-generator and repeng both record the number of direction tensors here.
    writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(layers))
    for layer in layers:
        writer.add_tensor(f"direction.{layer}", raw.vectors[layer].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _common_length(vectors: dict[int, torch.Tensor], source: Path) -> int:
    lengths = {int(v.shape[-1]) if v.dim() else 0 for v in vectors.values()}
    if len(lengths) != 1:
        raise SteeringVectorsError(f"{source}: vectors have different lengths {sorted(lengths)}")
    return lengths.pop()
