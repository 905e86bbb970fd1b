"""Per-request steering at full speed: the same batch served with 1, 8 and 32 distinct steering configurations
in one engine, against the same batch under one global set and against stock vLLM.

Engines, each in its own process, on the same dummy weights (a real model's shape, ``load_format="dummy"``):

  stock        vLLM's own model class (our plugin not loaded)
  global       our plugin, one set of vectors for every request (``steering_vectors``: the single-row path)
  per-request  our plugin with named sets (``steering_sets``, ``max_steering_configs`` 32); each round serves
               the batch with 1, 8 or 32 distinct configurations (request i takes set i mod k)
  global-2     a second global engine: the A/A control, its ratio to global is the noise floor

Rounds are interleaved (engines forward, then in reverse), and every round sends fresh prompts, so no round
reuses another's prefix-cache blocks. Reported: median output tokens/s and its ratio to ``global`` (ratio of
medians, and median of per-round ratios). Then the time to first token (a one-token request) of a request
whose configuration is new to the engine (a new scale: its vectors are sent to the workers and written into
a row first) against one whose configuration is already in a row, medians of interleaved pairs.

  python -m benchmarks.bench_per_request                        # Qwen2.5-0.5B shape, bf16, torch.compile
  python -m benchmarks.bench_per_request --shape qwen2.5-7b     # full size, on a GPU

The two tables go to benchmarks/results/per_request_cpu.json (throughput) and per_request_cpu_first_token.json
(cpu -> gpu where torch sees a GPU); options that change what is measured (--shape, --layers, --dtype, --batch,
--prompt-len, --max-tokens, --eager) are appended to both names where they differ from the defaults (--shape
qwen2.5-7b on a GPU: per_request_gpu_shapeqwen2.5-7b.json), so such a run never overwrites the docs' tables.
Each row keeps its samples (tokens/s of every round, seconds of every first token).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.bench_serving import SHAPES, round_prompts, write_config
from trainer.vllm_logging import set_vllm_log_level

KINDS = ("stock", "global", "per-request", "global-2")
MIXES = (1, 8, 32)  # distinct configurations in a batch
MAX_CONFIGS = 32


def engine_process(kind: str, model_dir: str, paths: dict, engine_kwargs: dict, conn) -> None:
    set_vllm_log_level(None)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    kind = kind.split("-2")[0]
    if kind == "stock":
        os.environ["VLLM_PLUGINS"] = ""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    additional_config = {
        "stock": {},
        "global": {"steering_vectors": paths["global"]},
        "per-request": {"steering_sets": paths["sets"], "max_steering_configs": MAX_CONFIGS},
    }[kind]
    llm = LLM(model_dir, load_format="dummy", skip_tokenizer_init=True, additional_config=additional_config,
              **engine_kwargs)  # fmt: skip
    conn.send("ready")
    while (request := conn.recv()) is not None:
        prompts, max_tokens, choices = request
        params = [
            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False, extra_args=c)
            for c in choices
        ]
        batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        conn.send((sum(len(o.outputs[0].token_ids) for o in outputs), seconds))
    # without it the engine core outlives this function: the join below times out and the interpreter's exit then
    # waits minutes for the engine processes, which end in "Executor failed" tracebacks
    llm.llm_engine.engine_core.shutdown()


def choices_for(kind: str, batch: int, mix: int) -> list[dict | None]:
    if kind != "per-request":
        return [None] * batch
    return [{"steering": f"s{i % mix}"} for i in range(batch)]


def arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--layers", type=int, help="keep only this many layers of the shape")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=32, help="requests per round")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per engine and mix (after a warm-up)")
    parser.add_argument("--ttft-pairs", type=int, default=10, help="new-vs-known configuration first-token pairs")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: torch.compile)")
    return parser.parse_args(argv), parser


def main(argv: list[str] | None = None) -> None:
    args, parser = arguments(argv)

    import torch

    from steering_vllm import SteeringVectors

    workdir = Path(tempfile.mkdtemp(prefix="bench_per_request_"))
    model_dir = write_config(workdir / "model", args.shape, args.layers)
    config = json.loads((model_dir / "config.json").read_text())
    shape = (config["num_hidden_layers"], config["hidden_size"])
    g = torch.Generator().manual_seed(0)
    paths = {"sets": {}}
    for i in range(max(MIXES)):
        vectors = SteeringVectors.from_tensor(torch.randn(*shape, generator=g) * 0.05)
        paths["sets"][f"s{i}"] = str(vectors.save(workdir / f"s{i}.safetensors"))
    paths["global"] = paths["sets"]["s0"]
    engine_kwargs = dict(dtype=args.dtype, enforce_eager=args.eager, max_model_len=args.prompt_len + args.max_tokens,
                         gpu_memory_utilization=0.3, seed=0, max_num_seqs=max(args.batch, 32))  # fmt: skip

    context = multiprocessing.get_context("spawn")
    engines = {}
    for kind in KINDS:  # one after another: two engines compiling at once would fight for the cores
        parent, child = context.Pipe()
        process = context.Process(target=engine_process, args=(kind, str(model_dir), paths, engine_kwargs, child))
        process.start()
        engines[kind] = (process, parent)
        parent.recv()
        print(f"{kind}: started", flush=True)

    def serve(kind, prompts, max_tokens, choices):
        engines[kind][1].send((prompts, max_tokens, choices))
        return engines[kind][1].recv()

    columns = [(kind, 1) for kind in KINDS if kind != "per-request"] + [("per-request", m) for m in MIXES]
    rates = {column: [] for column in columns}
    ttft = {"known": [], "new": []}
    try:
        for r in range(args.rounds + 1):  # round 0 is the warm-up
            prompts = round_prompts(r, args.batch, args.prompt_len)
            for kind, mix in columns if r % 2 == 0 else reversed(columns):
                tokens, seconds = serve(kind, prompts, args.max_tokens, choices_for(kind, args.batch, mix))
                if r:
                    rates[(kind, mix)].append(tokens / seconds)
            if r:
                line = "  ".join(f"{_label(k, m)} {rates[(k, m)][-1]:.0f}" for k, m in columns)
                print(f"round {r}/{args.rounds}: {line}", flush=True)
        for p in range(args.ttft_pairs):
            prompt = round_prompts(10_000 + p, 1, args.prompt_len)
            order = ("known", "new") if p % 2 == 0 else ("new", "known")
            for which in order:
                scale = 1.0 if which == "known" else 1.0 + (p + 1) / 1000  # a scale never used: a new configuration
                _, seconds = serve("per-request", prompt, 1, [{"steering": "s0", "steering_scale": scale}])
                ttft[which].append(seconds)
    finally:
        for process, conn in engines.values():
            conn.send(None)
            process.join(timeout=60)

    from benchmarks.results import load, markdown

    for name, title in record_tables(rates, ttft, shape, args, parser):
        print(f"\n{title}\n\n" + markdown(load(name)))


MEASURED = ("shape", "layers", "dtype", "batch", "prompt_len", "max_tokens", "eager")
THROUGHPUT_COLUMNS = [
    ("engine", "engine", ""), ("configurations", "configurations in the batch", ""),
    ("tokens_per_s", "output tokens/s (median)", ".1f"), ("ratio_of_medians", "vs global (ratio of medians)", ".3f"),
    ("median_of_ratios", "vs global (median of round ratios)", ".3f"),
]  # fmt: skip
FIRST_TOKEN_COLUMNS = [("configuration", "configuration", ""), ("ms", "first token ms (median)", ".1f"),
                       ("vs_known", "vs one already in a row", ".2f}x")]  # fmt: skip


def record_tables(rates: dict, ttft: dict, shape: tuple[int, int], args, parser) -> list[tuple[str, str]]:
    """Record the throughput table (``rates``: {(engine, configurations): [tokens/s of each round]}) as
    per_request_DEVICE[_OPTIONVALUE...] and the first-token one (``ttft``: {"known" | "new": [seconds]}) as
    per_request_DEVICE_first_token[...]; [(name, title)]."""
    from benchmarks.results import device, record, throughput_row, variant

    base = rates[("global", 1)]
    throughput = [{"engine": kind, "configurations": "0 (stock)" if kind == "stock" else mix,
                   **throughput_row(rounds, base)} for (kind, mix), rounds in rates.items()]  # fmt: skip
    known = statistics.median(ttft["known"])
    first_token = [{"configuration": label, "ms": 1e3 * statistics.median(ttft[which]),
                    "vs_known": statistics.median(ttft[which]) / known, "seconds": ttft[which]}
                   for which, label in (("known", "already in a row"), ("new", "new to the engine"))]  # fmt: skip
    mode = "eager" if args.eager else "torch.compile"
    setting = f"{args.shape} ({shape[0]} layers, d={shape[1]}), {args.dtype}, {mode}, dummy weights"
    tables = [
        ("", throughput, THROUGHPUT_COLUMNS,
         f"Per-request sets: {setting}; {args.batch} requests x {args.prompt_len} prompt tokens -> "
         f"{args.max_tokens} greedy tokens, fresh prompts every round, {args.rounds} rounds, interleaved"),
        ("_first_token", first_token, FIRST_TOKEN_COLUMNS,
         f"First token of a one-token request ({args.prompt_len}-token prompt) whose configuration is already in a "
         "row or new to the engine (its vectors sent to the workers and written into a row first): "
         f"{setting}; medians of {args.ttft_pairs} interleaved pairs"),
    ]  # fmt: skip
    made = []
    for table, rows, columns, title in tables:
        name = variant(f"per_request_{device()}{table}", parser, args, MEASURED)
        record(name, title, columns, rows)
        made.append((name, title))
    return made


def _label(kind: str, mix: int) -> str:
    return f"{kind}/{mix}" if kind == "per-request" else kind


if __name__ == "__main__":
    main()
