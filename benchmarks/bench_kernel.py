"""Kernel micro-benchmark of the fused add + steer + RMSNorm op on CPU, against fair baselines.

Forward, in place (the engine's form): every contender overwrites hidden and residual.
  ours      torch.ops.steering.fused_add_steer_rms_norm_, the call the vLLM plugin makes
  vllm      vLLM's fused_add_rms_norm from vLLM's library for the same ISA: the same work minus the vector
  vllm A/A  the same vLLM call timed a second time as its own contender: time(vllm A/A) / time(vllm) is
            the A/A control, how far two runs of one op drift apart in this row (the noise on "vs vllm")
  naive     steering done naively: residual += vector, then vLLM's op
  eager     the reference written in place in eager torch
  compiled  torch.compile of that in-place reference (Inductor fuses it into one loop)
  ref       the bandwidth reference: swaps hidden and residual in place, row by row with the op's threading
            (it reads both and writes both back, exactly the op's bytes, and does no arithmetic)
Backward (d_hidden = d_residual and d_table; the weight frozen, as in training):
  ours      the backward op
  eager     torch autograd through the eager reference
  compiled  the backward of torch.compile of the reference (AOTAutograd + Inductor)

Cache: "hot" calls run again and again on one set of buffers (kept in cache where they fit); "cold" calls walk
through a pool of sets 4x the size of the last-level cache, so every call finds its rows in DRAM (while the
threads stay busy, as between an engine's layers).

Medians over samples interleaved across the contenders. Ratios are time(other) / time(ours): above 1, ours is
faster. "of ref" is time(ref) / time(ours) for the forward (the share of the reference's bandwidth it reaches)
and the same per byte for the backward, which moves 3 T d elements (dy, x in; g out) to the reference's 4.

  python -m benchmarks.bench_kernel                 # each ISA this CPU runs (AVX2, AVX512, AVX512_BF16)
  python -m benchmarks.bench_kernel --isa AVX2      # one ISA: our variant and vLLM's, loaded in this process
  python -m benchmarks.bench_kernel --quick         # T in {16, 4096}, d = 3584
  python -m benchmarks.bench_kernel --repeats 3     # three runs of every ISA, taken in turn; per contender and
                                                    # row the median of the runs' medians (a burst of load
                                                    # from a neighbour on a shared machine moves one run)

Each run records its two tables in benchmarks/results/kernel_cpu_forward.json and kernel_cpu_backward.json (the
docs' tables, made with --repeats 3) and their summary in kernel_cpu_summary.json (benchmarks/kernel_summary.py); a
run of one ISA or of other shapes than the defaults appends those options to the names (--isa AVX2:
kernel_cpu_forward_isaAVX2; --quick: kernel_cpu_forward_tokens16-4096_hidden3584), so it never overwrites them.
"""

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

EPS = 1e-6
# vLLM for CPU ships one library per ISA; each registers torch.ops._C, so one per process
VLLM_LIBRARY = {"AVX512_BF16": "vllm._C", "AVX512": "vllm._C_AVX512", "AVX2": "vllm._C_AVX2"}
FORWARD = ("ours", "vllm", "naive", "eager", "compiled", "ref", "vllm_again")
BACKWARD = ("ours", "eager", "compiled", "ref")


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache's size from sysfs (where there is none: 32 MiB)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    sizes = []
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    except (OSError, ValueError):
        pass
    return max(sizes, default=default)


def interleaved_medians(fns: dict, sets: list, samples: int, min_sample_seconds: float = 2e-3) -> dict[str, float]:
    """Median seconds per call of each fn(buffer_set), samples interleaved between the contenders.

    A sample is back-to-back calls lasting about min_sample_seconds that walk through the buffer sets in
    turn (at least once around): with one set the data stays in cache (hot); with a pool larger than the
    last-level cache every call finds its rows in DRAM, while the threads stay as busy as in an engine.
    """
    calls = {}
    for name, fn in fns.items():
        for buffers in sets[:2]:
            fn(buffers)  # warm up (and compile)
        start = time.perf_counter()
        fn(sets[-1])
        once = max(time.perf_counter() - start, 1e-7)
        calls[name] = max(len(sets), int(min_sample_seconds / once))
    times = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            start = time.perf_counter()
            for i in range(calls[name]):
                fn(sets[i % len(sets)])
            times[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(t) for name, t in times.items()}


def pool_size(cache: str, set_bytes: int) -> int:
    """Buffer sets for a row: one (hot), or enough to span 4x the last-level cache (cold, at least 2)."""
    return 1 if cache == "hot" else max(2, -(-4 * last_level_cache_bytes() // set_bytes))


def reference_(hidden, residual, table, weight, eps):
    """The op written in place in plain torch (row 0 of the table, as the global path)."""
    import torch

    x = hidden.float() + residual.float() + table[0]
    residual.copy_(x)
    hidden.copy_(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float())


def compile_inplace_reference():
    """torch.compile(reference_), called with Inductor's CPU outer-loop fusion off.

    torch 2.13's Inductor fails on this graph (KeyError 'buf2' in try_outer_loop_fusion_with_local_buf, both
    inputs mutated after a row reduction); without that one fusion it generates the fused loops. Off only
    while this function runs, so the other compiled contenders keep it.
    """
    import contextlib

    import torch
    from torch._inductor.codegen.cpp import CppScheduling

    compiled = torch.compile(reference_)
    original = CppScheduling.can_fuse_vertical_outer_loop

    @contextlib.contextmanager
    def no_outer_loop_fusion():
        CppScheduling.can_fuse_vertical_outer_loop = lambda self, node1, node2: False
        try:
            yield
        finally:
            CppScheduling.can_fuse_vertical_outer_loop = original

    def call(*args):
        with no_outer_loop_fusion():
            return compiled(*args)

    return call


def forward_contenders(T, d, dtype, compiled_reference_, with_vllm: bool, n_sets: int) -> tuple[dict, list]:
    """({name: fn(buffers)}, buffer sets); each fn overwrites its set's hidden and residual."""
    import torch

    sets = [(torch.randn(T, d, dtype=dtype), torch.randn(T, d, dtype=dtype)) for _ in range(n_sets)]
    table = torch.randn(1, d) * 0.01
    weight = (1 + 0.1 * torch.randn(d)).to(dtype)
    vector = table[0].to(dtype)
    ops = torch.ops
    # In place, again and again on the same buffers: the residual grows by about one unit a call, harmless here.
    fns = {"ours": lambda b: ops.steering.fused_add_steer_rms_norm_(b[0], b[1], table, None, weight, EPS)}
    if with_vllm:
        fns["vllm"] = lambda b: ops._C.fused_add_rms_norm(b[0], b[1], weight, EPS)
        fns["naive"] = lambda b: (b[1].add_(vector), ops._C.fused_add_rms_norm(b[0], b[1], weight, EPS))
        fns["vllm_again"] = fns["vllm"]  # the A/A control: the very same call, timed as a contender of its own
    fns["eager"] = lambda b: reference_(b[0], b[1], table, weight, EPS)
    fns["compiled"] = lambda b: compiled_reference_(b[0], b[1], table, weight, EPS)
    fns["ref"] = lambda b: ops.steering.bandwidth_reference_(b[0], b[1])
    return fns, sets


def backward_contenders(T, d, dtype, compiled_reference, n_sets: int) -> tuple[dict, list]:
    """({name: fn(buffers)}, buffer sets); eager and compiled keep one autograd graph per set."""
    import torch

    from kernels import fused_add_steer_rms_norm_reference

    table = (torch.randn(1, d) * 0.01).requires_grad_()
    weight = (1 + 0.1 * torch.randn(d)).to(dtype)
    sets = []
    for _ in range(n_sets):
        hidden, residual = torch.randn(T, d, dtype=dtype), torch.randn(T, d, dtype=dtype)
        grad_y = torch.randn(T, d, dtype=dtype)
        _, residual_out, rstd = torch.ops.steering.fused_add_steer_rms_norm_fwd(
            hidden, residual, table, None, weight, EPS
        )
        leaves = [hidden.requires_grad_(), residual.requires_grad_(), table]
        y_eager, _ = fused_add_steer_rms_norm_reference(*leaves, None, weight, EPS)
        y_compiled, _ = compiled_reference(*leaves, None, weight, EPS)
        sets.append(
            dict(grad_y=grad_y, x=residual_out, rstd=rstd, leaves=leaves, y_eager=y_eager, y_compiled=y_compiled)
        )
    ops = torch.ops.steering
    return {
        "ours": lambda b: ops.fused_add_steer_rms_norm_bwd(
            b["grad_y"], None, b["x"], b["rstd"], None, weight, 1, True, False
        ),
        "eager": lambda b: torch.autograd.grad(b["y_eager"], b["leaves"], b["grad_y"], retain_graph=True),
        "compiled": lambda b: torch.autograd.grad(b["y_compiled"], b["leaves"], b["grad_y"], retain_graph=True),
        "ref": lambda b: ops.bandwidth_reference_(b["x"], b["grad_y"]),
    }, sets


def load_vllm_library(isa: str) -> bool:
    """Load vLLM's CPU library built for `isa` (registers torch.ops._C); False where there is none."""
    module = VLLM_LIBRARY.get(isa)
    if module is None:
        return False
    try:
        importlib.import_module(module)
    except ImportError as e:
        # vLLM names its per-ISA libraries _C_<ISA> but their module _C: the import
        # complains after the library has loaded (vllm/platforms/cpu.py ignores it too)
        if "module export function" not in str(e):
            raise
    return True


def run_isa(args) -> dict:
    """Every row for the ISA of this process (our variant chosen through $STEERING_VLLM_CPU_ISA)."""
    import torch

    from kernels import fused_add_steer_rms_norm_reference

    isa = torch.ops.steering.cpu_capability()
    with_vllm = load_vllm_library(isa)
    compiled_reference_ = compile_inplace_reference()
    # the backward is timed again and again on one graph (retain_graph), which donated buffers forbid
    torch._functorch.config.donated_buffer = False
    compiled_reference = torch.compile(fused_add_steer_rms_norm_reference)
    results = {"isa": isa, "threads": torch.get_num_threads(), "forward": [], "backward": []}
    for kind, names in (("forward", FORWARD), ("backward", BACKWARD)):
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for d in args.hidden:
                for T in args.tokens:
                    for cache in args.cache:
                        set_bytes = (2 if kind == "forward" else 3) * T * d * dtype.itemsize
                        n_sets = pool_size(cache, set_bytes)
                        if kind == "forward":
                            fns, sets = forward_contenders(T, d, dtype, compiled_reference_, with_vllm, n_sets)
                        else:
                            fns, sets = backward_contenders(T, d, dtype, compiled_reference, n_sets)
                        t = interleaved_medians(fns, sets, args.samples)
                        del fns, sets
                        row = {"cache": cache, "dtype": dtype_name, "T": T, "d": d, **{n: t.get(n) for n in names}}
                        results[kind].append(row)
                        print(
                            f"{isa} {kind} {cache} {dtype_name} T={T} d={d} ({n_sets} sets): "
                            f"ours {t['ours'] * 1e6:.1f} us, ref {t['ref'] * 1e6:.1f} us",
                            file=sys.stderr,
                            flush=True,
                        )
    return results


def _ratio(row: dict, name: str) -> float | None:
    return None if row.get(name) is None else row[name] / row["ours"]


FORWARD_COLUMNS = [
    ("isa", "ISA", ""), ("cache", "cache", ""), ("dtype", "dtype", ""), ("T", "T", ""), ("d", "d", ""),
    ("ours_us", "ours µs", ".1f"), ("gb_s", "ours GB/s", ".1f"), ("of_ref", "of ref", ".2f"),
    ("vs_compiled", "vs compiled", ".2f"), ("vs_eager", "vs eager", ".2f"), ("vs_naive", "vs naive", ".2f"),
    ("vs_vllm", "vs vllm", ".2f"), ("vllm_a_a", "vllm A/A", ".2f"),
]  # fmt: skip
BACKWARD_COLUMNS = FORWARD_COLUMNS[:8] + [("vs_eager", "vs eager", ".2f"), ("vs_compiled", "vs compiled", ".2f")]


def tables(all_results: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows of the two tables, forward and backward, a row group per ISA: the numbers they show, and each
    contender's median seconds under "seconds"."""

    def leading(isa: str, r: dict, elements_per_td: int) -> dict:
        nbytes = elements_per_td * r["T"] * r["d"] * (2 if r["dtype"] in ("bfloat16", "float16") else 4)
        return {"isa": isa, "cache": r["cache"], "dtype": r["dtype"], "T": r["T"], "d": r["d"],
                "ours_us": r["ours"] * 1e6, "gb_s": nbytes / r["ours"] / 1e9}  # fmt: skip

    forward, backward = [], []
    for res in all_results:
        for r in res["forward"]:
            ratios = {f"vs_{n}": _ratio(r, n) for n in ("compiled", "eager", "naive", "vllm")}
            a_a = None if r.get("vllm_again") is None else r["vllm_again"] / r["vllm"]
            seconds = {n: r.get(n) for n in FORWARD}
            forward.append({**leading(res["isa"], r, 4), "of_ref": _ratio(r, "ref"), **ratios, "vllm_a_a": a_a,
                            "seconds": seconds})  # fmt: skip
        for r in res["backward"]:
            of_ref = 0.75 * r["ref"] / r["ours"]  # per byte: ours moves 3 T d elements, the swap 4 T d
            seconds = {n: r.get(n) for n in BACKWARD}
            backward.append({**leading(res["isa"], r, 3), "of_ref": of_ref, "vs_eager": _ratio(r, "eager"),
                             "vs_compiled": _ratio(r, "compiled"), "seconds": seconds})  # fmt: skip
    return forward, backward


def record_tables(all_results: list[dict], args, parser, repeats: int = 1) -> list[tuple[str, str]]:
    """Record ``kernel_cpu_forward`` and ``kernel_cpu_backward`` (a run of one ISA or of other shapes than the
    defaults: those names with the options appended, e.g. ``kernel_cpu_forward_isaAVX2``); [(name, title)]."""
    from benchmarks.results import record, variant

    forward, backward = tables(all_results)
    isas = ", ".join(res["isa"] for res in all_results)
    of_runs = f", median of {repeats} runs" if repeats > 1 else ""
    setting = f"{isas}; {all_results[0]['threads']} threads, medians of {args.samples} samples{of_runs}"
    made = []
    for kind, rows, columns, what in (
        ("forward", forward, FORWARD_COLUMNS, "Forward, in place: GB/s = 4 T d bytes / time; of ref, vs X = "
         "time(X) / time(ours): above 1, ours is faster; vllm A/A = time(vllm again) / time(vllm)"),
        ("backward", backward, BACKWARD_COLUMNS, "Backward (d_hidden = d_residual, d_table): GB/s = 3 T d bytes / "
         "time; of ref per byte; vs X = time(X) / time(ours)"),
    ):  # fmt: skip
        name = variant(f"kernel_cpu_{kind}", parser, args, ("isa", "tokens", "hidden", "dtypes", "cache"))
        title = f"Fused add + steer + RMSNorm on CPU. {what}. {setting}"
        record(name, title, columns, rows)
        made.append((name, title))
    from benchmarks.kernel_summary import record_summary

    record_summary(made[0][0], made[1][0])
    return made


def median_of_runs(runs: list[dict]) -> dict:
    """One ISA's results from several runs of the same rows: each contender's median time over the runs."""
    merged = {key: value for key, value in runs[0].items() if key not in ("forward", "backward")}
    for kind in ("forward", "backward"):
        merged[kind] = []
        for rows in zip(*(run[kind] for run in runs), strict=True):
            row = dict(rows[0])
            for name, value in rows[0].items():
                if isinstance(value, float):
                    row[name] = statistics.median(r[name] for r in rows)
            merged[kind].append(row)
    return merged


def runnable_isas() -> list[str]:
    """The vector ISAs that both our build and this CPU have (DEFAULT has no vLLM counterpart)."""
    from kernels import cpu_isa, cpu_op

    built = cpu_op.built_capabilities()
    return [c for c in cpu_isa.CAPABILITIES if c != "DEFAULT" and c in built and cpu_isa.supported(c)]


def arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isa", default="all", help="AVX2, AVX512, AVX512_BF16, DEFAULT or all (default)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 512, 4096])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1536, 3584, 5120])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--cache", nargs="+", default=["hot", "cold"], choices=["hot", "cold"])
    parser.add_argument("--samples", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="T in {16, 4096}, d = 3584")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every ISA, in turn; medians over them")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (used between processes)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.quick:
        args.tokens, args.hidden = [16, 4096], [3584]
    if args.isa != "all":
        args.isa = args.isa.upper()
    return args, parser


def main(argv: list[str] | None = None) -> None:
    from benchmarks.results import load, markdown

    args, parser = arguments(argv)
    if args.isa != "all":
        os.environ["STEERING_VLLM_CPU_ISA"] = args.isa  # read when kernels loads its library
        results = run_isa(args)
        if args.json:
            print(json.dumps(results), flush=True)
            return
        all_results = [results]
    else:
        forwarded = ["--samples", str(args.samples), "--dtypes", *args.dtypes, "--cache", *args.cache]
        forwarded += ["--tokens", *map(str, args.tokens), "--hidden", *map(str, args.hidden)]
        isas = runnable_isas()
        runs = {isa: [] for isa in isas}
        for repeat in range(args.repeats):
            for isa in isas:
                print(f"--- {isa}, run {repeat + 1} of {args.repeats}", file=sys.stderr, flush=True)
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.bench_kernel", "--isa", isa, "--json", *forwarded],
                    check=True,
                    stdout=subprocess.PIPE,
                    text=True,
                ).stdout
                runs[isa].append(json.loads(out.strip().splitlines()[-1]))
        all_results = [median_of_runs(runs[isa]) for isa in isas]
    for name, title in record_tables(all_results, args, parser, args.repeats if args.isa == "all" else 1):
        print(f"\n{title}\n\n" + markdown(load(name)), flush=True)


if __name__ == "__main__":
    main()
