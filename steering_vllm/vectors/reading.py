"""Which reader a path of vectors needs: ours, the paper code's (``formats``) or another library's (``foreign``).

Above both (they know nothing of each other's formats): ``SteeringVectors.load`` calls ``read``.
"""

from __future__ import annotations

from pathlib import Path

from steering_vllm.vectors import foreign, formats
from steering_vllm.vectors.formats import RawVectors, SteeringVectorsError


def read(path: Path, num_layers: int | None = None, fmt: str | None = None, **options) -> RawVectors:
    """Any file or directory of vectors we read: ours, the paper code's, or another library's (``foreign``).

    ``fmt`` names a foreign format instead of detecting it; ``options`` are the foreign readers' (e.g. ``layers``,
    ``gguf_layers``, ``expected_model``)."""
    if not path.exists():
        raise SteeringVectorsError(f"{path}: file not found")
    suffix = path.suffix.lower()
    ours = (path.is_dir() and any(path.glob("*.safetensors"))) or suffix in (".npy", ".safetensors")
    if ours and fmt is None:
        if options:
            raise SteeringVectorsError(
                f"{path}: option(s) {', '.join(sorted(options))} apply to other libraries' files only; this is "
                "ours, the paper code's .npy or an HF checkpoint (convert's --layers and --scale work on every format)"
            )
        if path.is_dir():
            return formats.load_hf_checkpoint(path, num_layers)
        return formats.load_npy(path) if suffix == ".npy" else formats.load_safetensors(path, num_layers)
    if suffix == ".gguf":
        return foreign.read_gguf(path, num_layers, fmt=fmt, **options)
    if fmt is None and foreign.detect(path) is None:
        known = "our .safetensors, an HF checkpoint, .npy [L, d], .gguf, or " + ", ".join(foreign.FORMATS)
        raise SteeringVectorsError(f"{path}: not a steering-vector file this reader knows (it reads {known})")
    return foreign.read_foreign(path, num_layers, fmt=fmt, **options)
