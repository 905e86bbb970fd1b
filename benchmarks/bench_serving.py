"""Generation throughput: the steered model against stock vLLM on the same model, same prompts, same sampling.

Three engines run side by side, each in its own process, on the same dummy weights (``load_format="dummy"``,
so any shape can be measured without a download):

  stock     vLLM's own model class (our plugin not loaded: VLLM_PLUGINS='')
  steered   our plugin: the vector folded into the fused add + RMSNorm op (non-zero vectors)
  naive     our plugin with the norm patched to what a quick patch does: ``hidden + s`` as a separate op,
            then vLLM's own fused add + RMSNorm (the issue's reference point: 0.955-0.98x stock)

Rounds are interleaved (stock, steered, naive, then the reverse order, ...). Every round sends fresh prompts
(new random token ids, the same lengths; all engines get the same ones within a round), so no round reuses an
earlier round's prefix-cache blocks and each does the same prefill + decode work; the table reports median
output tokens/s and the ratio against stock. A second stock
engine (``stock-2``, on by default) is the A/A control: its ratio to stock is the noise floor of the run.

  python -m benchmarks.bench_serving                         # Qwen2.5-0.5B shape, bf16, torch.compile on
  python -m benchmarks.bench_serving --shape qwen2.5-1.5b --layers 4
  python -m benchmarks.bench_serving --shape qwen2.5-7b      # full size, on a GPU

The table goes to benchmarks/results/serving_cpu.json (serving_gpu.json where torch sees a GPU); options that
change what is measured (--shape, --layers, --dtype, --batch, --prompt-len, --max-tokens, --eager, --kinds) are
appended to the name where they differ from the defaults: --eager writes serving_cpu_eager.json, --shape
qwen2.5-7b on a GPU serving_gpu_shapeqwen2.5-7b.json. Each row keeps its engine's rate of every round.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import operator
import os
import tempfile
import time
from pathlib import Path

from trainer.vllm_logging import set_vllm_log_level

SHAPES = {
    # Qwen2.5 configs (hidden, intermediate, layers, heads, kv heads, vocab)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip
KINDS = ("stock", "steered", "naive", "stock-2")


def write_config(directory: Path, shape: str, layers: int | None) -> Path:
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16",
        **SHAPES[shape],
    }
    if layers:
        config["num_hidden_layers"] = layers
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _use_naive_steering() -> None:
    """Patch the steered norm into the naive form: a separate add of the vector, then vLLM's own norm."""
    from vllm.model_executor.layers.layernorm import RMSNorm

    from steering_vllm.engine.norm import SteeredRMSNorm

    def naive_forward(self, x, residual=None):
        if residual is None:
            return RMSNorm.forward(self, x)
        return RMSNorm.forward(self, x + self.steering_table[0].to(x.dtype), residual)

    SteeredRMSNorm.forward = naive_forward


def round_prompts(round_index: int, batch: int, prompt_len: int) -> list[list[int]]:
    """The prompts of one round (0: the warm-up): random token ids, new for every round, the same for every engine."""
    import torch

    g = torch.Generator().manual_seed(1000 + round_index)
    return torch.randint(1, 1000, (batch, prompt_len), generator=g).tolist()


def engine_process(kind: str, model_dir: str, vectors_path: str, engine_kwargs: dict, conn) -> None:
    # The engine runs inside this process (no engine-core subprocess), so the patch below reaches the model.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    set_vllm_log_level(None)  # warnings, unless $VLLM_LOGGING_LEVEL says otherwise
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model below sends a callable
    kind = kind.split("-")[0]  # stock-2 is a second stock engine
    if kind == "stock":
        os.environ["VLLM_PLUGINS"] = ""
    if kind == "naive":
        _use_naive_steering()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    additional_config = {} if kind == "stock" else {"steering_vectors": vectors_path}
    llm = LLM(model_dir, load_format="dummy", skip_tokenizer_init=True, additional_config=additional_config,
              **engine_kwargs)  # fmt: skip
    conn.send(llm.apply_model(operator.attrgetter("__class__.__name__"))[0])
    while (request := conn.recv()) is not None:
        prompts, max_tokens = request
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        conn.send((sum(len(o.outputs[0].token_ids) for o in outputs), seconds))


def arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--layers", type=int, help="keep only this many layers of the shape")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=16, help="prompts per round")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per engine (after one warm-up)")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: torch.compile, vLLM's default)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="engines to compare (the first is the baseline)")
    return parser.parse_args(argv), parser


def main(argv: list[str] | None = None) -> None:
    args, parser = arguments(argv)

    import torch

    from steering_vllm import SteeringVectors

    kinds = args.kinds.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    model_dir = write_config(workdir / "model", args.shape, args.layers)
    config = json.loads((model_dir / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    table = torch.randn(config["num_hidden_layers"], config["hidden_size"], generator=g) * 0.05
    vectors_path = str(SteeringVectors.from_tensor(table).save(workdir / "vectors.safetensors"))
    engine_kwargs = dict(dtype=args.dtype, enforce_eager=args.eager, max_model_len=args.prompt_len + args.max_tokens,
                         gpu_memory_utilization=0.3, seed=0)  # fmt: skip

    context = multiprocessing.get_context("spawn")
    engines = {}
    for kind in kinds:  # started one after another: two engines compiling at once would fight for the cores
        parent, child = context.Pipe()
        process = context.Process(
            target=engine_process, args=(kind, str(model_dir), vectors_path, engine_kwargs, child)
        )
        process.start()
        engines[kind] = (process, parent)
        print(f"{kind}: started {parent.recv()}", flush=True)

    def round_of(kind, round_index):
        engines[kind][1].send((round_prompts(round_index, args.batch, args.prompt_len), args.max_tokens))
        tokens, seconds = engines[kind][1].recv()
        return tokens / seconds

    rates = {kind: [] for kind in kinds}
    try:
        for kind in kinds:
            round_of(kind, 0)  # warm-up
        for r in range(args.rounds):
            for kind in kinds if r % 2 == 0 else reversed(kinds):
                rates[kind].append(round_of(kind, r + 1))
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {rates[k][-1]:.1f}" for k in kinds), flush=True)
    finally:
        for process, conn in engines.values():
            conn.send(None)
            process.join(timeout=60)

    from benchmarks.results import load, markdown

    name, title = record_table(rates, config, args, parser)
    print(f"\n{title}\n\n" + markdown(load(name)))


MEASURED = ("shape", "layers", "dtype", "batch", "prompt_len", "max_tokens", "eager", "kinds")


def record_table(rates: dict[str, list[float]], config: dict, args, parser) -> tuple[str, str]:
    """Record each engine's median output tokens/s and its ratio to the first (``rates``: {engine: [tokens/s of
    each round]}) as serving_DEVICE[_OPTIONVALUE...]; (name, title)."""
    from benchmarks.results import device, record, throughput_row, variant

    base = next(iter(rates))
    rows = [{"engine": kind, **throughput_row(rounds, rates[base])} for kind, rounds in rates.items()]
    columns = [("engine", "engine", ""), ("tokens_per_s", "output tokens/s (median)", ".1f"),
               ("ratio_of_medians", f"vs {base} (ratio of medians)", ".3f"),
               ("median_of_ratios", f"vs {base} (median of round ratios)", ".3f")]  # fmt: skip
    mode = "eager" if args.eager else "torch.compile"
    title = (f"{args.shape} ({config['num_hidden_layers']} layers, d={config['hidden_size']}), {args.dtype}, {mode}, "
             f"dummy weights, {args.batch} prompts x {args.prompt_len} tokens -> {args.max_tokens} greedy tokens, "
             "fresh prompts every round (new random ids, same lengths: no prefix-cache reuse across rounds), "
             f"{args.rounds} rounds, interleaved")  # fmt: skip
    name = variant(f"serving_{device()}", parser, args, MEASURED)
    record(name, title, columns, rows)
    return name, title


if __name__ == "__main__":
    main()
