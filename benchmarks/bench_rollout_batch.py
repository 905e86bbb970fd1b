"""What a bigger rollout batch costs per token: the bound on a sweep's generate time on this machine.

A sweep of R runs puts all runs' rollouts into one ``generate`` call, so it saves generate time only as far as
the engine's cost per generated token falls with the batch. This times one ``generate`` of the toy model
(``fixtures/toy-model``, the torch.compile'd engine the trainer starts, float32, per-request sets on) for one
toy run's batch (16 prompts x 8 samples = 128 sequences) and for twelve runs' (1,536), every sequence exactly
``--tokens`` new tokens long (``ignore_eos``): with the trainer's per-request options (a seed each, the sampled
token's logprob, detokenized text, each sequence reading its run's set), with none of them, and with the trainer's
options on an engine started with either of the two options that could make a big batch cheaper per token: a
running batch of all 1,536 sequences (``max_num_seqs``; the CPU default is 256) and vLLM's async scheduling
(the scheduler prepares the next step while the model runs). Medians of ``--repeats`` calls after a warm-up;
microseconds per generated token and the batch's gain, recorded in benchmarks/results/rollout_batch_cpu.json
(rollout_batch_gpu.json where torch sees a GPU, so a GPU run keeps the CPU table).

``--profile`` instead runs the engine in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and prints where one
call of 256 sequences with the trainer's options spends its time (cProfile, by cumulative time); it records nothing.

  python -m benchmarks.bench_rollout_batch [--tokens 64] [--repeats 3] [--profile]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS, ONE_RUN = 12, 128


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_rollout_batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per sequence (the toy config's max)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a profile of one call instead of timing")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.profile:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # scheduler, worker and front end in one profile
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from benchmarks.results import load, markdown, record
    from steering_vllm import SteeringVectors

    model = ROOT / "fixtures" / "toy-model"
    work = Path(tempfile.mkdtemp(prefix="rollout-batch-"))
    generator = torch.Generator().manual_seed(0)
    sets = {}
    for run in range(RUNS):
        table = torch.randn(4, 128, generator=generator) * 0.1
        sets[f"run{run}"] = str(SteeringVectors.from_tensor(table).save(work / f"run{run}.safetensors"))
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 390) for _ in range(40)] for _ in range(RUNS * ONE_RUN)]

    def start(**engine_options) -> LLM:
        return LLM(str(model), dtype="float32", seed=0, enable_chunked_prefill=False, gpu_memory_utilization=0.05,
                   max_model_len=512, logprobs_mode="processed_logprobs",
                   additional_config={"steering_sets": sets, "max_steering_configs": RUNS + 1},
                   **engine_options)  # fmt: skip

    def generate(llm: LLM, n: int, trainer_options: bool) -> float:
        params = [SamplingParams(temperature=1.0, max_tokens=args.tokens, min_tokens=args.tokens, ignore_eos=True,
                                 seed=1000 + i if trainer_options else None, logprobs=0 if trainer_options else None,
                                 detokenize=trainer_options,
                                 extra_args={"steering": f"run{i % RUNS}"} if trainer_options else None)
                  for i in range(n)]  # fmt: skip
        begin = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:n]], params, use_tqdm=False)
        return time.perf_counter() - begin

    if args.profile:
        import cProfile
        import pstats

        llm = start()
        generate(llm, ONE_RUN, True)
        profile = cProfile.Profile()
        profile.runcall(generate, llm, 2 * ONE_RUN, True)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
        return 0
    ways = [  # (row label, engine options, the trainer's per-request options)
        ("the trainer's options (seed, logprob, text, a set each)", {}, True),
        ("none of them", {}, False),
        (f"the trainer's options, max_num_seqs {RUNS * ONE_RUN}",
         {"max_num_seqs": RUNS * ONE_RUN, "max_num_batched_tokens": RUNS * ONE_RUN * 48}, True),
        ("the trainer's options, async scheduling", {"async_scheduling": True}, True),
    ]  # fmt: skip
    rows, llm, llm_options = [], None, None
    for way, engine_options, options in ways:
        if engine_options != llm_options:
            if llm is not None:
                llm.llm_engine.engine_core.shutdown()
            llm, llm_options = start(**engine_options), engine_options
            generate(llm, ONE_RUN, True)  # warm-up
        per_token = {}
        for n in (ONE_RUN, RUNS * ONE_RUN):
            seconds = statistics.median(generate(llm, n, options) for _ in range(args.repeats))
            per_token[n] = 1e6 * seconds / (n * args.tokens)
            print(f"{way}: {n} sequences, {seconds:.2f} s", flush=True)
        rows.append({"way": way, "one_run_us": per_token[ONE_RUN], "runs_us": per_token[RUNS * ONE_RUN],
                     "gain": per_token[ONE_RUN] / per_token[RUNS * ONE_RUN],
                     "sweep_generate": RUNS * per_token[RUNS * ONE_RUN] / per_token[ONE_RUN]})  # fmt: skip
    columns = [("way", "per-request options, engine options", ""),
               ("one_run_us", f"{ONE_RUN} sequences (us / token)", ".0f"),
               ("runs_us", f"{RUNS * ONE_RUN} sequences (us / token)", ".0f"),
               ("gain", "gain per token", ".2f}x"),
               ("sweep_generate", f"{RUNS} runs' generate / one run's", ".1f}x")]  # fmt: skip
    title = (f"One generate call of the toy model (torch.compile'd engine, float32, per-request sets on), "
             f"{args.tokens} new tokens per sequence, medians of {args.repeats}")  # fmt: skip
    name = "rollout_batch_gpu" if torch.cuda.is_available() else "rollout_batch_cpu"
    record(name, title, columns, rows)
    print("\n" + markdown(load(name)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
