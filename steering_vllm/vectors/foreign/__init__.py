"""Readers for steering vectors written by other libraries, mapped to our convention.

Our convention (DESIGN.md §4): ``layers.{l}`` is added to the OUTPUT of decoder block ``l`` (0-based), i.e. the
residual stream right after block ``l`` (HF ``output_hidden_states`` index ``l + 1``). The embeddings, before
block 0, cannot be steered. Every reader below says, at the reader, which source file and function of the other
library fixed its mapping, where that library READS a vector when it makes one and where it ADDS it when it
steers; the mapping follows where the library ADDS it (so a converted file steers as the library would have),
except for llama.cpp's cvector-generator files, whose choice is an option (see ``_read_gguf``).

Formats (``detect`` returns the name; ``read_foreign`` reads it):

- ``ibm-svec``: IBM activation-steering ``SteeringVector.save`` (JSON). ``directions[i]`` -> ``layers.{i-1}``.
- ``easyedit``: EasyEdit (EasySteer) ``layer_{L}.pt`` 1-D tensors (a directory, or one such file). -> ``layers.{L}``.
- ``pyvene``: a directory written by pyvene ``IntervenableModel.save`` (also pyreft's ``ReftModel``); only
  ``AdditionIntervention`` / ``SubtractionIntervention`` on ``block_output`` with a saved constant source.
  ``layer L`` -> ``layers.{L}``.
- ``hotwire``: hotwire-vllm's ``.pt`` (``[n_layers, hidden]`` or ``[hidden]``, maybe wrapped in a dict), or a
  ``$HOTWIRE_VECTORS`` directory of them. Row ``L`` -> ``layers.{L}``; the layer(s) must be chosen (``layers=``).
- GGUF control vectors: llama.cpp adds ``direction.{N}`` to block N's output, so by default (``gguf_layers=
  "as-applied"``, DESIGN.md §4) ``direction.{N}`` -> ``layers.{N}`` whoever wrote the file: it steers as
  llama.cpp serves it. ``gguf_layers="as-read"`` puts each vector where its writer READ it, which depends on
  the writer: ``repeng-gguf`` (repeng ``ControlVector.export_gguf``, and our own writer) read it there too;
  ``llama-cpp-gguf`` (llama.cpp ``cvector-generator``) read it at block N-1's output -> ``layers.{N-1}``;
  ``gguf-control-vector`` (the metadata does not tell the writer) refuses ``as-read`` unless ``fmt=`` says.

Options of ``read_foreign`` (each format accepts only those that apply to it; see ``OPTIONS``):

- ``layers``: the FILE's own layer ids to keep (their numbering, before mapping), or ``"all"``;
- ``scale``: a float every kept vector is multiplied by (their strength / multiplier / coefficient);
- ``hidden_size``: the expected vector length;
- ``expected_model``: a model name or type (or several); the file's model hint must match one of them;
- ``vector_id`` (hotwire): which ``{id}.pt`` of a directory;
- ``gguf_layers`` (GGUF): ``"as-applied"`` (default) or ``"as-read"``.

This package imports only ``formats`` of the package (``formats`` imports it lazily).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from steering_vllm.vectors.foreign import easyedit, gguf, hotwire, ibm, pyvene
from steering_vllm.vectors.foreign.common import (
    EASYEDIT,
    FORMATS,
    GGUF_UNKNOWN_WRITER,
    HOTWIRE,
    IBM_SVEC,
    LLAMA_CPP_GGUF,
    OPTIONS,
    PYVENE,
    REPENG_GGUF,
    json_keys,
)
from steering_vllm.vectors.foreign.hints import check_model_hint
from steering_vllm.vectors.formats import RawVectors, SteeringVectorsError


def detect(path: Path) -> str | None:
    """The foreign format a path holds (one of ``FORMATS``, or ``GGUF_UNKNOWN_WRITER``), or None.

    Looks at names and small headers only (a GGUF's metadata, a JSON's keys); the readers check the content.
    """
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if config.is_file() and "intervention_types" in json_keys(config):
            return PYVENE
        if any(path.glob("intkey_*.bin")):
            return PYVENE  # a pyvene save_intervention() directory (no config); the reader says why it refuses
        names = [p.name for p in path.iterdir() if p.is_file()]
        if any(easyedit.EASYEDIT_FILE.match(n) for n in names):
            return EASYEDIT
        if any(n.endswith(".pt") for n in names):
            return HOTWIRE
        return None
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix == ".svec":
        return IBM_SVEC
    if suffix == ".pt":
        return EASYEDIT if easyedit.EASYEDIT_FILE.match(path.name) else HOTWIRE
    if suffix == ".json" and {"model_type", "directions"} <= json_keys(path):
        return IBM_SVEC
    if suffix == ".gguf":
        return gguf.detect_writer(path)
    return None


def read_foreign(path: Path, num_layers: int | None = None, *, fmt: str | None = None, **options) -> RawVectors:
    """Read a foreign file into our convention; ``fmt`` overrides detection (see the module docstring).

    ``RawVectors.provenance`` says ``format``, ``layer_mapping`` (e.g. ``"their directions[X] ... -> our
    layers.{X-1}"``), the layers kept and the scale, and what the file says about its model.
    ``num_layers``: the model's number of decoder blocks, if known (the file's own count otherwise).
    """
    path = Path(path)
    if not path.exists():
        raise SteeringVectorsError(f"{path}: file not found")
    detected = detect(path)
    if fmt is None:
        fmt = detected
        if fmt is None:
            raise SteeringVectorsError(
                f"{path}: not a steering-vector format this reader knows (expected one of {', '.join(FORMATS)})"
            )
    if fmt not in _READERS or (fmt == GGUF_UNKNOWN_WRITER and detected != fmt):
        raise SteeringVectorsError(f"{path}: unknown foreign format {fmt!r}; expected one of {', '.join(FORMATS)}")
    unknown = sorted(set(options) - OPTIONS[fmt])
    if unknown:
        raise SteeringVectorsError(
            f"{path}: option(s) {', '.join(unknown)} do not apply to format {fmt!r} "
            f"(it takes {', '.join(sorted(OPTIONS[fmt]))})"
        )
    return _READERS[fmt](path, num_layers, fmt=fmt, detected=detected, **options)


GGUF_FORMATS = (REPENG_GGUF, LLAMA_CPP_GGUF, GGUF_UNKNOWN_WRITER)


def read_gguf(path: Path, num_layers: int | None = None, *, fmt: str | None = None, **options) -> RawVectors:
    """A GGUF control vector, whoever wrote it (the writer matters only to ``gguf_layers="as-read"``)."""
    if fmt is not None and fmt not in GGUF_FORMATS:
        raise SteeringVectorsError(
            f"{path}: a .gguf file is a GGUF control vector, not {fmt!r}; use one of {GGUF_FORMATS}"
        )
    fmt = fmt or detect(path) or GGUF_UNKNOWN_WRITER  # not a control vector: the reader names the architecture
    unknown = sorted(set(options) - OPTIONS[GGUF_UNKNOWN_WRITER])
    if unknown:
        raise SteeringVectorsError(f"{path}: option(s) {', '.join(unknown)} do not apply to a GGUF control vector")
    return gguf.read(Path(path), num_layers, fmt=fmt, detected=detect(path), **options)


_READERS: dict[str, Callable[..., RawVectors]] = {
    IBM_SVEC: ibm.read,
    EASYEDIT: easyedit.read,
    PYVENE: pyvene.read,
    HOTWIRE: hotwire.read,
    REPENG_GGUF: gguf.read,
    LLAMA_CPP_GGUF: gguf.read,
    GGUF_UNKNOWN_WRITER: gguf.read,
}

__all__ = ["FORMATS", "GGUF_UNKNOWN_WRITER", "check_model_hint", "detect", "read_foreign", "read_gguf"]
