"""Print a steering-vector file's metadata and per-layer norms: ``python -m steering_vllm.vectors.inspect FILE``."""

from __future__ import annotations

import argparse
import json
import sys

from steering_vllm.vectors.convert import add_reading_args, reading_options
from steering_vllm.vectors.steering_vectors import SteeringVectors, SteeringVectorsError


def format_summary(info: dict) -> str:
    lines = [
        f"source       {info['source']}",
        f"model        {info['model'] or '-'}",
        f"num_layers   {info['num_layers']}",
        f"hidden_size  {info['hidden_size']}",
        f"layers set   {len(info['layers'])}",
        f"content hash {info['content_hash']}",
        *(f"{key:12s} {value}" for key, value in sorted(info["provenance"].items())),
        "",
        "layer      norm",
    ]
    present = set(info["layers"])
    for layer, norm in enumerate(info["norms"]):
        lines.append(f"{layer:5d}  {norm:8.4f}" + ("" if layer in present else "  (absent)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steering_vllm.vectors.inspect", description=__doc__)
    parser.add_argument(
        "path", help="vectors in any readable format (ours, .npy, .gguf, HF checkpoint, other libraries')"
    )
    parser.add_argument("--num-layers", type=int, help="model's layer count, for inputs that do not record it")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_reading_args(parser)
    args = parser.parse_args(argv)
    try:
        info = SteeringVectors.load(args.path, num_layers=args.num_layers, **reading_options(args)).summary()
    except SteeringVectorsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
