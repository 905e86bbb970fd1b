"""Convert steering vectors between formats: ``python -m steering_vllm.vectors.convert INPUT OUTPUT``.

INPUT: our .safetensors, an HF checkpoint (file or directory) with ``mlp.down_proj.bias`` tensors, the
paper code's .npy [L, d], or a llama.cpp / repeng GGUF control vector. OUTPUT's extension picks the
format: .safetensors (ours), .gguf (llama.cpp) or .npy. Other libraries' files are read too (IBM
activation-steering .svec, EasyEdit layer_{L}.pt, pyvene / pyreft additive interventions, hotwire-vllm .pt):
``--format`` names one where detection cannot, and the ``--source-*`` / ``--gguf-layers`` options choose what to
read; the output's provenance says what the input was and how its layers were mapped.
"""

from __future__ import annotations

import argparse
import sys

from steering_vllm.vectors import foreign
from steering_vllm.vectors.steering_vectors import SteeringVectors, SteeringVectorsError


def parse_layers(text: str) -> list[int]:
    """'1,3,5-8' -> [1, 3, 5, 6, 7, 8]."""
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        start, _, end = part.partition("-")
        try:
            first, last = int(start), int(end or start)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad layer list {text!r} (expected e.g. '1,3,5-8')") from None
        if last < first:
            raise argparse.ArgumentTypeError(f"bad layer list {text!r}: the range {part!r} runs backwards")
        layers.extend(range(first, last + 1))
    if not layers:
        raise argparse.ArgumentTypeError(f"bad layer list {text!r}: no layers (expected e.g. '1,3,5-8')")
    return layers


def add_reading_args(parser: argparse.ArgumentParser) -> None:
    """The options that say how to read another library's file (``steering_vllm.vectors.foreign``)."""
    group = parser.add_argument_group("reading other libraries' files")
    group.add_argument("--format", choices=(*foreign.FORMATS, foreign.GGUF_UNKNOWN_WRITER),
                       help="the input's format, where detection cannot tell (e.g. a GGUF's writer)")  # fmt: skip
    group.add_argument("--source-layers", help="the input's own layer ids to read ('all', or e.g. '10,12'); "
                       "hotwire-vllm files need it (each request there names its layer)")  # fmt: skip
    group.add_argument("--source-scale", type=float, help="the library's strength / coefficient to apply")
    group.add_argument("--gguf-layers", choices=("as-applied", "as-read"),
                       help="GGUF: direction.N at block N's output as llama.cpp applies it (default), or where its "
                       "writer read it (llama.cpp's cvector-generator: block N-1)")  # fmt: skip
    group.add_argument("--expected-model", help="refuse a file whose model hint names another model (type or name)")
    group.add_argument("--vector-id", help="hotwire-vllm: which {id}.pt of a directory")


def reading_options(args: argparse.Namespace) -> dict:
    """``SteeringVectors.load`` keywords from ``add_reading_args``' options (none given: plain detection)."""
    options = {"fmt": args.format}
    if args.source_layers is not None:
        options["layers"] = "all" if args.source_layers == "all" else parse_layers(args.source_layers)
    for key in ("source_scale", "gguf_layers", "expected_model", "vector_id"):
        value = getattr(args, key)
        if value is not None:
            options["scale" if key == "source_scale" else key] = value
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m steering_vllm.vectors.convert", description=__doc__.splitlines()[0]
    )
    parser.add_argument("input", help="vectors to read (.safetensors, .npy, .gguf, an HF checkpoint directory, or "
                        "another library's file or directory)")  # fmt: skip
    parser.add_argument("output", help="file to write; .safetensors (ours), .gguf (llama.cpp) or .npy")
    parser.add_argument("--num-layers", type=int, help="model's layer count, for inputs that do not record it (GGUF)")
    parser.add_argument("--model", help="base model name or path to record in the output's metadata")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the vectors by this factor")
    parser.add_argument("--layers", type=parse_layers, help="keep only these layers, e.g. '1-20' (others become 0)")
    add_reading_args(parser)
    args = parser.parse_args(argv)
    try:
        vectors = SteeringVectors.load(args.input, num_layers=args.num_layers, **reading_options(args))
        changes = []
        if args.layers is not None:
            vectors = vectors.select_layers(args.layers)
            changes.append(f"layers {','.join(map(str, sorted(set(args.layers))))} kept")
        if args.scale != 1.0:
            vectors = vectors.scale(args.scale)
            changes.append(f"scaled by {args.scale:g}")
        if changes:  # the file says it is not what its provenance made
            previous = vectors.provenance.get("converted")
            vectors.provenance["converted"] = "; ".join(filter(None, [previous, ", ".join(changes)]))
        if args.model:
            vectors.model = args.model
        vectors.save(args.output)
    except SteeringVectorsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output}: {len(vectors.vectors)} of {vectors.num_layers} layers, hidden_size "
        f"{vectors.hidden_size}, content hash {vectors.content_hash()[:16]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
