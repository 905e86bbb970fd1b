"""Per-layer steering vectors and the safetensors file format (DESIGN.md §4).

A file holds one float32 tensor of shape [hidden_size] per steered layer, named
``layers.{l}`` (l = the decoder layer whose output it is added to); layers not in
the file are zero. Other formats (.npy, HF checkpoints, GGUF) are read and written
by explicit conversion in ``steering_vllm.vectors.formats``.
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from stat import S_ISREG

import torch

from steering_vllm.vectors import formats, reading
from steering_vllm.vectors.formats import FORMAT, FORMAT_VERSION, SITE, SteeringVectorsError  # noqa: F401 (public here)


class SteeringVectors:
    """One d-vector per decoder layer, float32, zero where absent.

    ``vectors`` maps a layer index to a 1-D float32 tensor of length ``hidden_size``.
    Instances are treated as immutable: ``scale`` and ``select_layers`` return new ones.
    """

    def __init__(
        self,
        vectors: dict[int, torch.Tensor],
        num_layers: int,
        hidden_size: int,
        model: str | None = None,
        source: str = "<tensors>",
        provenance: dict[str, str] | None = None,
    ):
        self.num_layers = int(num_layers)
        self.hidden_size = int(hidden_size)
        self.model = model
        self.source = source
        self.provenance = dict(provenance or {})  # how the vectors were made or converted (saved as metadata)
        if self.num_layers < 1 or self.hidden_size < 1:
            raise SteeringVectorsError(
                f"{source}: num_layers and hidden_size must be positive, got {num_layers} and {hidden_size}"
            )
        self._content_hash: str | None = None
        self.vectors: dict[int, torch.Tensor] = {}
        for layer, vector in sorted(vectors.items()):
            self.vectors[int(layer)] = _checked_vector(vector, int(layer), self.num_layers, self.hidden_size, source)

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def zeros(cls, num_layers: int, hidden_size: int, model: str | None = None) -> SteeringVectors:
        return cls({}, num_layers, hidden_size, model=model, source="<zeros>")

    @classmethod
    def from_tensor(
        cls,
        table: torch.Tensor,
        model: str | None = None,
        source: str = "<tensor>",
        provenance: dict[str, str] | None = None,
    ) -> SteeringVectors:
        """From a [num_layers, hidden_size] tensor; all-zero rows are left out of the file."""
        if table.dim() != 2:
            raise SteeringVectorsError(
                f"{source}: expected a [num_layers, hidden_size] tensor, got {tuple(table.shape)}"
            )
        table = _as_float32(table.detach().cpu(), source, "table")
        vectors = {layer: row for layer, row in enumerate(table) if bool(row.any())}
        return cls(vectors, table.shape[0], table.shape[1], model, source, provenance)

    @classmethod
    def load(
        cls, path: str | os.PathLike, num_layers: int | None = None, fmt: str | None = None, **options
    ) -> SteeringVectors:
        """Read our format, or convert a paper-code .npy, an HF checkpoint with ``down_proj.bias``, a GGUF control
        vector, or another library's file (IBM activation-steering, EasyEdit, pyvene, hotwire-vllm:
        ``steering_vllm.vectors.foreign``, whose ``fmt`` and options this passes on).

        ``num_layers`` is used only by formats that do not record the layer count (GGUF, HF checkpoints
        without a config.json); otherwise it is inferred from the highest layer present. A file is parsed once
        per process while it stays unchanged; each call returns a new instance.
        """
        if fmt is not None or options:
            return cls._from_raw(reading.read(Path(path), num_layers, fmt, **options))
        key = _file_identity(cls, path)
        with _PARSED_LOCK:
            asked, parsed = _PARSED.get(key, (None, None)) if key is not None else (None, None)
        # A parse made with the same num_layers answers the call, and so does one that found the count asked for:
        # formats that record the count ignore the argument, the others take it as the count.
        if parsed is None or not (num_layers == asked or (num_layers is not None and num_layers == parsed.num_layers)):
            parsed = cls._from_raw(reading.read(Path(path), num_layers))
            if key is not None:
                with _PARSED_LOCK:
                    _PARSED[key] = (num_layers, parsed)
                    while len(_PARSED) > _PARSED_KEEP:
                        _PARSED.popitem(last=False)
        return cls(
            parsed.vectors, parsed.num_layers, parsed.hidden_size, parsed.model, parsed.source, parsed.provenance
        )

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> SteeringVectors:
        """Parse safetensors bytes in our format (e.g. an HTTP request body)."""
        return cls._from_raw(formats.parse_bytes(data, source))

    @classmethod
    def _from_raw(cls, raw: formats.RawVectors) -> SteeringVectors:
        return cls(raw.vectors, raw.num_layers, raw.hidden_size, raw.model, raw.source, raw.provenance)

    # ---- output -------------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return formats.ours_metadata(self.num_layers, self.hidden_size, self.model, self.provenance)

    def to_bytes(self) -> bytes:
        return formats.ours_bytes(self._raw())

    def save(self, path: str | os.PathLike) -> Path:
        """Write our format (``.safetensors``), llama.cpp's GGUF (``.gguf``) or the paper's ``.npy``.

        The file is written to a temporary name first and renamed, so a reader never sees half a file.
        """
        return formats.write(self._raw(), Path(path))

    def to_tensor(self) -> torch.Tensor:
        """[num_layers, hidden_size] float32, zero rows for absent layers."""
        table = torch.zeros(self.num_layers, self.hidden_size, dtype=torch.float32)
        for layer, vector in self.vectors.items():
            table[layer] = vector
        return table

    def _raw(self) -> formats.RawVectors:
        return formats.RawVectors(
            self.vectors, self.num_layers, self.hidden_size, self.model, self.source, self.provenance
        )

    # ---- transforms ---------------------------------------------------------------------------------------

    def scale(self, factor: float) -> SteeringVectors:
        if not math.isfinite(factor):
            raise SteeringVectorsError(f"{self.source}: scale must be finite, got {factor}")
        vectors = {layer: vector * factor for layer, vector in self.vectors.items()}
        overflowed = [layer for layer, vector in vectors.items() if _overflows(vector)]
        if overflowed:
            raise SteeringVectorsError(f"{self.source}: scale {factor:g} overflows float32 on layers {overflowed}")
        return SteeringVectors(vectors, self.num_layers, self.hidden_size, self.model, self.source, self.provenance)

    def select_layers(self, layers: Iterable[int]) -> SteeringVectors:
        """Keep only the given layers' vectors; the others become zero."""
        keep = set()
        for given in layers:
            layer = _layer_index(given)
            if layer is None:
                raise SteeringVectorsError(f"{self.source}: layer {given!r} is not a layer index (an int)")
            if not 0 <= layer < self.num_layers:
                raise SteeringVectorsError(
                    f"{self.source}: layer {layer} out of range for num_layers={self.num_layers}"
                )
            keep.add(layer)
        vectors = {layer: vector for layer, vector in self.vectors.items() if layer in keep}
        return SteeringVectors(vectors, self.num_layers, self.hidden_size, self.model, self.source, self.provenance)

    # ---- checks and summaries -----------------------------------------------------------------------------

    def check_compatible(self, num_layers: int, hidden_size: int, model: str | None = None) -> None:
        """Raise unless these vectors fit a model with ``num_layers`` decoder layers of width ``hidden_size``."""
        where = f" ({model})" if model else ""
        if self.hidden_size != hidden_size:
            raise SteeringVectorsError(
                f"{self.source}: hidden_size {self.hidden_size} does not match the model's {hidden_size}{where}"
            )
        if self.num_layers != num_layers:
            raise SteeringVectorsError(
                f"{self.source}: num_layers {self.num_layers} does not match the model's {num_layers}{where}"
            )

    def summary(self) -> dict:
        """What ``inspect`` prints and ``GET /v1/steering`` answers: plain JSON-able values."""
        return {
            "source": self.source,
            "model": self.model,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "layers": sorted(self.vectors),
            "norms": self.norms(),
            "content_hash": self.content_hash(),
            "provenance": self.provenance,
        }

    def norms(self) -> list[float]:
        """L2 norm of each layer's vector (0.0 for absent layers)."""
        return [float(v) for v in self.to_tensor().norm(dim=1)]

    def content_hash(self) -> str:
        """sha256 of the shape and the float32 values; independent of file format, metadata and layer order.

        Computed once (about 1 ms per MB): instances are not modified after construction.
        """
        if self._content_hash is None:
            self._content_hash = table_hash(self.to_tensor())
        return self._content_hash

    def __repr__(self) -> str:
        return (
            f"SteeringVectors(num_layers={self.num_layers}, hidden_size={self.hidden_size}, "
            f"layers={sorted(self.vectors)}, source={self.source!r})"
        )


# Files parsed in this process, by identity. The process that starts an engine reads each vector file up to
# three times (the flag's check, the check against the model, the per-request front end's sets): it is parsed
# once. A rewritten file has a new identity (size, mtime, inode), so it is read again.
_PARSED: OrderedDict[tuple, tuple[int | None, SteeringVectors]] = OrderedDict()
_PARSED_KEEP = 8
_PARSED_LOCK = threading.Lock()


def _file_identity(cls: type, path: str | os.PathLike) -> tuple | None:
    """What names a regular file's content in this process, or None (a directory or a missing file: not cached)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if not S_ISREG(stat.st_mode):
        return None
    return (cls, os.fspath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def table_hash(table: torch.Tensor) -> str:
    """``content_hash`` of a [num_layers, hidden_size] float32 table, whatever its values (NaN included)."""
    digest = hashlib.sha256(f"{table.shape[0]}x{table.shape[1]}:".encode())
    digest.update(table.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _as_float32(tensor: torch.Tensor, source: str, name: str) -> torch.Tensor:
    if not (tensor.is_floating_point()):
        raise SteeringVectorsError(f"{source}: tensor {name!r} has dtype {tensor.dtype}, expected float32")
    return tensor.to(torch.float32)


def _checked_vector(vector, layer: int, num_layers: int, hidden_size: int, source: str) -> torch.Tensor:
    name = f"layers.{layer}"
    if not 0 <= layer < num_layers:
        raise SteeringVectorsError(f"{source}: tensor {name!r}: layer index out of range for num_layers={num_layers}")
    vector = torch.as_tensor(vector)
    if vector.dim() != 1:
        raise SteeringVectorsError(f"{source}: tensor {name!r} has shape {tuple(vector.shape)}, expected 1-D")
    if vector.shape[0] != hidden_size:
        raise SteeringVectorsError(
            f"{source}: tensor {name!r} has shape {tuple(vector.shape)}, expected ({hidden_size},) = hidden_size"
        )
    vector = _as_float32(vector.detach().cpu(), source, name).contiguous()
    if not bool(torch.isfinite(vector).all()):
        bad = "NaN" if bool(torch.isnan(vector).any()) else "Inf"
        raise SteeringVectorsError(f"{source}: tensor {name!r} contains {bad} values")
    if _overflows(vector):
        raise SteeringVectorsError(
            f"{source}: tensor {name!r} is too large (largest |value| {float(vector.abs().max()):.3g}): its squared "
            "norm overflows float32, and so would the variance of the norm it is added before"
        )
    return vector.clone()


def _overflows(vector: torch.Tensor) -> bool:
    """Whether ``vector`` (float32) or the sum of its squares is not finite in float32."""
    return not bool(torch.isfinite(vector.square().sum()))


def _layer_index(value) -> int | None:
    """``value`` as a layer index (ints, numpy ints), or None (floats, strings, bools)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
