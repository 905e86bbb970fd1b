"""Hot-swap latency: swapping the vectors of a running engine, idle and while it serves, against a restart.

For each vector shape (layers x hidden size of a real model) an engine is built with that many layers of that
width (dummy bf16 weights; attention and MLP kept small where the vectors do not care: a Llama layout with
--heads heads of 64, a tiny intermediate size and vocabulary, so that the serving clients below stay cheap on
CPU), then, all in one run:

  idle, LLM         update_steering(llm, vectors), alternating two vector sets, no request running:
                    validation, serialization, the RPC to the engine's worker, the in-place copy and the
                    prefix-cache reset; median of --swaps calls
  idle, AsyncLLM    update_steering_async(engine, vectors) on the engine behind ``vllm serve``, no request
                    running: the same plus pausing and resuming the scheduler; median of --swaps calls
  while serving     the same call while --clients streaming requests run (each client sends a new request when
                    its last one ends, so the engine is never idle): its latency, how many requests were running
                    at that moment, and how long from the swap's start until every request then running has
                    streamed a token produced after the swap (the swap drops their KV, so this includes
                    recomputing their contexts); median of --busy-swaps swaps, --swap-interval seconds of
                    steady serving after each one
  restart           building a new engine with the new vectors (what a reload costs at the least; eager mode,
                    which starts faster than torch.compile, and dummy weights, so the ratio is conservative);
                    median of --restarts starts

  python -m benchmarks.bench_hot_swap                       # 28 x 3584 (Qwen2.5-7B), 48 x 5120 (Qwen2.5-14B)
  python -m benchmarks.bench_hot_swap --restarts 10 --clients 16

The table goes to benchmarks/results/hot_swap_cpu.json (hot_swap_gpu.json where torch sees a GPU), a row per
shape; options that change what is measured (--shapes, --heads, --clients, --prompt-len, --max-tokens,
--swap-interval) are appended to the name where they differ from the defaults (--clients 16:
hot_swap_cpu_clients16), so such a run never overwrites the docs' table. The raw samples stay in each row, and
in --output.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from trainer.vllm_logging import set_vllm_log_level

SHAPES = {"qwen2.5-7b": (28, 3584), "qwen2.5-14b": (48, 5120)}
MAX_MODEL_LEN = 512
ENGINE_KWARGS = dict(load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
                     max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=0.1)  # fmt: skip


def write_config(directory: Path, num_layers: int, hidden_size: int, heads: int = 1) -> Path:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": 64,  # as vLLM's CPU attention supports
        "intermediate_size": 128,
        "vocab_size": 1024,
        "max_position_embeddings": MAX_MODEL_LEN,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def timed_swaps(llm, vector_sets: list, count: int) -> list[float]:
    """Seconds of ``count`` calls ``update_steering(llm, vectors)``, alternating the vector sets, after a warm-up."""
    from steering_vllm import update_steering

    update_steering(llm, vector_sets[1])
    seconds = []
    for i in range(count):
        start = time.perf_counter()
        update_steering(llm, vector_sets[i % 2])
        seconds.append(time.perf_counter() - start)
    return seconds


def idle_and_restarts(model_dir: Path, vector_sets: list, paths: list[Path], args) -> dict:
    """``update_steering`` on an idle ``LLM`` (the first engine), and the start time of ``--restarts`` engines."""
    from vllm import LLM

    restarts, swaps = [], []
    for restart in range(args.restarts):
        start = time.perf_counter()
        llm = LLM(str(model_dir), additional_config={"steering_vectors": str(paths[restart % 2])}, **ENGINE_KWARGS)
        restarts.append(time.perf_counter() - start)
        if restart == 0:
            swaps = timed_swaps(llm, vector_sets, args.swaps)
        llm.llm_engine.engine_core.shutdown()
        del llm
    return {"idle_llm": swaps, "restarts": restarts}


class Clients:
    """``count`` clients streaming from an ``AsyncLLM``, each sending a new request as soon as its last one ends;
    ``streamed[request_id]`` counts the tokens each running request has received so far."""

    def __init__(self, engine, count: int, prompt_len: int, max_tokens: int):
        self.engine, self.prompt_len, self.max_tokens = engine, prompt_len, max_tokens
        self.streamed: dict[str, int] = {}
        self.ids = itertools.count()
        self.tasks = [asyncio.create_task(self._client(c)) for c in range(count)]

    async def _client(self, client: int) -> None:
        import torch
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens, ignore_eos=True, detokenize=False)
        while True:
            request_id = f"client{client}-{next(self.ids)}"
            prompt = torch.randint(1, 1000, (self.prompt_len,)).tolist()
            self.streamed[request_id] = 0
            try:
                async for output in self.engine.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id):
                    self.streamed[request_id] = len(output.outputs[0].token_ids)
            finally:
                del self.streamed[request_id]

    async def all_streaming(self) -> None:
        """Until every client's request has received a token."""
        while len(self.streamed) < len(self.tasks) or not all(self.streamed.values()):
            await asyncio.sleep(0.01)

    async def streamed_again(self, before: dict[str, int]) -> None:
        """Until every request of ``before`` (a snapshot of ``streamed``) has received a token more, or has ended."""
        while any(self.streamed.get(r, n + 1) <= n for r, n in before.items()):
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()  # AsyncLLM aborts a request whose stream is cancelled
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def async_swaps(model_dir: Path, vector_sets: list, path: Path, args) -> dict:
    """``update_steering_async`` on one ``AsyncLLM``: idle, then while ``--clients`` requests stream."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from steering_vllm import update_steering_async

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(model_dir), additional_config={
        "steering_vectors": str(path)}, **ENGINE_KWARGS))  # fmt: skip
    try:
        idle = [await _timed(update_steering_async(engine, vector_sets[i % 2])) for i in range(args.swaps + 1)][1:]
        clients = Clients(engine, args.clients, args.prompt_len, args.max_tokens)
        await clients.all_streaming()
        busy = []
        for i in range(args.busy_swaps):
            await asyncio.sleep(args.swap_interval)
            running = len(clients.streamed)
            start = time.perf_counter()
            await update_steering_async(engine, vector_sets[i % 2])
            swapped = time.perf_counter() - start
            await clients.streamed_again(dict(clients.streamed))  # tokens of the step the pause waited for are in
            busy.append({"swap": swapped, "running": running, "streamed_again": time.perf_counter() - start})
        await clients.stop()
    finally:
        engine.shutdown()
    return {"idle_async": idle, "busy": busy}


async def _timed(awaitable) -> float:
    start = time.perf_counter()
    await awaitable
    return time.perf_counter() - start


def summarize(shape: str, num_layers: int, hidden_size: int, measured: dict) -> dict:
    busy = measured["busy"]
    running = [b["running"] for b in busy]
    return {"shape": shape, "layers": num_layers, "hidden_size": hidden_size, "bytes": num_layers * hidden_size * 4,
            "idle_llm_ms": 1e3 * statistics.median(measured["idle_llm"]),
            "idle_async_ms": 1e3 * statistics.median(measured["idle_async"]),
            "busy_ms": 1e3 * statistics.median(b["swap"] for b in busy),
            "busy_max_ms": 1e3 * max(b["swap"] for b in busy), "running": (min(running), max(running)),
            "streamed_again_ms": 1e3 * statistics.median(b["streamed_again"] for b in busy),
            "restart_s": statistics.median(measured["restarts"]), "restarts": len(measured["restarts"]),
            "swaps": len(measured["idle_llm"]), "busy_swaps": len(busy), "raw": measured}  # fmt: skip


NAMES = {"qwen2.5-7b": "Qwen2.5-7B", "qwen2.5-14b": "Qwen2.5-14B"}
COLUMNS = [
    ("vectors", "vectors", ""), ("layers", "layers", ""), ("hidden_size", "d", ""), ("bytes", "bytes", ","),
    ("idle_llm_ms", "idle swap, `LLM` ms", ".2f"), ("idle_async_ms", "idle swap, `AsyncLLM` ms", ".2f"),
    ("busy_ms", "swap while serving ms", ".2f"), ("busy_max_ms", "swap while serving, max ms", ".2f"),
    ("requests_running", "requests running", ""), ("streamed_again_ms", "until they stream again ms", ".0f"),
    ("restart_s", "restart s", ".1f"), ("restart_vs_idle", "restart / idle swap", ",.0f}x"),
    ("restart_vs_busy", "restart / swap while serving", ",.0f}x"),
]  # fmt: skip
MEASURED = ("shapes", "heads", "clients", "prompt_len", "max_tokens", "swap_interval")


def table_rows(rows: list[dict]) -> list[dict]:
    """``summarize``'s rows with what the table shows beside them: the model's name, the range of requests running
    at the swaps, and the restart's ratios to the swaps (all measured in this run)."""
    table = []
    for r in rows:
        low, high = r["running"]
        table.append({**r, "vectors": NAMES.get(r["shape"], r["shape"]),
                      "requests_running": f"{low}" if low == high else f"{low}-{high}",
                      "restart_vs_idle": 1e3 * r["restart_s"] / r["idle_llm_ms"],
                      "restart_vs_busy": 1e3 * r["restart_s"] / r["busy_ms"]})  # fmt: skip
    return table


def record_table(rows: list[dict], args, parser) -> tuple[str, str]:
    """Record the table of ``summarize``'s rows as hot_swap_DEVICE[_OPTIONVALUE...]; (name, title)."""
    from benchmarks.results import device, record, variant

    first = rows[0]
    workload = (f"{args.clients} clients streaming, {args.prompt_len}-token prompts, {args.max_tokens} new tokens "
                f"each, a new request as each ends; {args.swap_interval} s of serving between swaps")  # fmt: skip
    title = (f"Hot swap against a restart: engines of each shape (dummy bf16 weights, {args.heads} attention "
             f"head(s) of 64, eager); medians; idle: {first['swaps']} swaps each; while serving: "
             f"{first['busy_swaps']} swaps ({workload}); restart: {first['restarts']} engine starts")  # fmt: skip
    name = variant(f"hot_swap_{device()}", parser, args, MEASURED)
    record(name, title, COLUMNS, table_rows(rows))
    return name, title


def arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--swaps", type=int, default=50, help="idle swaps per engine (after one warm-up)")
    parser.add_argument("--restarts", type=int, default=5, help="engine starts to take the median of")
    parser.add_argument("--busy-swaps", type=int, default=20, help="swaps while the clients stream")
    parser.add_argument("--clients", type=int, default=8, help="streaming requests kept running during those swaps")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens of each client request")
    parser.add_argument("--max-tokens", type=int, default=64, help="generated tokens of each client request")
    parser.add_argument("--swap-interval", type=float, default=0.5, help="seconds of serving between two swaps")
    parser.add_argument("--heads", type=int, default=1, help="attention heads (of 64) of the engines' layers")
    parser.add_argument("--output", type=Path, default=Path("runs/bench_hot_swap.json"))
    return parser.parse_args(argv), parser


def main(argv: list[str] | None = None) -> None:
    args, parser = arguments(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    set_vllm_log_level(None)  # warnings, unless $VLLM_LOGGING_LEVEL says otherwise
    import torch

    from steering_vllm import SteeringVectors

    workdir = Path(tempfile.mkdtemp(prefix="bench_hot_swap_"))
    rows = []
    for shape in args.shapes.split(","):
        num_layers, hidden_size = SHAPES[shape]
        model_dir = write_config(workdir / shape, num_layers, hidden_size, args.heads)
        vector_sets = [SteeringVectors.from_tensor(torch.randn(num_layers, hidden_size) * 0.05) for _ in range(2)]
        paths = [v.save(workdir / f"{shape}-{i}.safetensors") for i, v in enumerate(vector_sets)]
        measured = idle_and_restarts(model_dir, vector_sets, paths, args)
        measured.update(asyncio.run(async_swaps(model_dir, vector_sets, paths[0], args)))
        rows.append(summarize(shape, num_layers, hidden_size, measured))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "raw"}), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1))
    from benchmarks.results import load, markdown

    name, title = record_table(rows, args, parser)
    print(f"\n{title}\n\n" + markdown(load(name)))


if __name__ == "__main__":
    main()
