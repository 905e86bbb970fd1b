"""Hot-swap latency: ``update_steering`` on a running engine against restarting the engine with new vectors.

For each vector shape (layers x hidden size of a real model) an engine is built with that many layers of that
width (dummy weights; attention and MLP kept small where the vectors do not care: tiny intermediate size and
vocabulary), then:

  swap      update_steering(llm, vectors), alternating two vector sets: validation, serialization, the RPC to
            the engine's worker, the in-place copy and the prefix-cache reset; median of --swaps calls
  restart   building a new engine with the new vectors (what a reload costs at the least; eager mode, which
            starts faster than torch.compile, so the ratio is conservative); median of --restarts starts

  python -m benchmarks.bench_hot_swap                       # 28 x 3584 (Qwen2.5-7B), 48 x 5120 (Qwen2.5-14B)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from trainer.vllm_logging import set_vllm_log_level

SHAPES = {"qwen2.5-7b": (28, 3584), "qwen2.5-14b": (48, 5120)}


def write_config(directory: Path, num_layers: int, hidden_size: int) -> Path:
    heads = hidden_size // 64  # head_dim 64, as vLLM's CPU attention supports
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 1024,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument("--restarts", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    set_vllm_log_level(None)  # warnings, unless $VLLM_LOGGING_LEVEL says otherwise

    import torch
    from vllm import LLM

    from steering_vllm import SteeringVectors, update_steering

    workdir = Path(tempfile.mkdtemp(prefix="bench_hot_swap_"))
    rows = []
    for shape in args.shapes.split(","):
        num_layers, hidden_size = SHAPES[shape]
        model_dir = write_config(workdir / shape, num_layers, hidden_size)
        vector_sets = [SteeringVectors.from_tensor(torch.randn(num_layers, hidden_size) * 0.05) for _ in range(2)]
        paths = [v.save(workdir / f"{shape}-{i}.safetensors") for i, v in enumerate(vector_sets)]
        restarts, swaps = [], []
        for restart in range(args.restarts):
            start = time.perf_counter()
            llm = LLM(str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                      enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.1,
                      additional_config={"steering_vectors": str(paths[restart % 2])})  # fmt: skip
            restarts.append(time.perf_counter() - start)
            if restart == 0:
                update_steering(llm, vector_sets[1])  # warm-up
                for i in range(args.swaps):
                    start = time.perf_counter()
                    update_steering(llm, vector_sets[i % 2])
                    swaps.append(time.perf_counter() - start)
            llm.llm_engine.engine_core.shutdown()
            del llm
        swap, restart = statistics.median(swaps), statistics.median(restarts)
        rows.append((shape, num_layers, hidden_size, swap, min(swaps), restart))
        print(f"{shape}: swap {swap * 1e3:.2f} ms, restart {restart:.1f} s", flush=True)

    print("\n| vectors | layers x d | bytes | swap, median ms | swap, min ms | restart, median s | restart / swap |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for shape, num_layers, hidden_size, swap, best, restart in rows:
        size = num_layers * hidden_size * 4
        print(f"| {shape} | {num_layers} x {hidden_size} | {size:,} | {swap * 1e3:.2f} | {best * 1e3:.2f} | "
              f"{restart:.1f} | {restart / swap:,.0f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
