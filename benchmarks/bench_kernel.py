"""Kernel micro-benchmark of the fused add + steer + RMSNorm op on CPU.

Every row is measured side by side in one run, samples interleaved between the
contenders (round-robin), medians reported:

  forward (in place, the engine's form), per (T, d, dtype):
    ours        kernels.fused_add_steer_rms_norm_ (C++ op)
    vllm        vLLM's CPU fused_add_rms_norm: the same work minus the steering bias
    naive       steering done naively: residual += vector, then vLLM's op
    eager       the torch reference, eager (add, add, RMSNorm)
    compiled    torch.compile of the reference
    copy        a plain tensor copy of the same bytes (read 2*T*d, write 2*T*d)
  backward (d_hidden/d_residual and d_table; weight frozen, as in training):
    ours        the backward op
    autograd    torch autograd through the eager reference

  python -m benchmarks.bench_kernel                 # the full table (about 2 minutes on 2 cores)
  python -m benchmarks.bench_kernel --quick         # T in {16, 4096}, d=3584 only
"""

import argparse
import statistics
import time

import torch

from kernels import fused_add_steer_rms_norm_, fused_add_steer_rms_norm_reference

EPS = 1e-6


def interleaved_medians(fns: dict, samples: int, min_sample_seconds: float = 2e-3) -> dict[str, float]:
    """Median seconds per call of each fn; each sample times enough calls to last min_sample_seconds."""
    calls = {}
    for name, fn in fns.items():
        fn()  # warm up (and compile)
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        calls[name] = max(1, int(min_sample_seconds / once))
    times = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            n = calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(t) for name, t in times.items()}


def forward_contenders(T: int, d: int, dtype: torch.dtype, compiled_reference) -> tuple[dict, int]:
    hidden, residual = torch.randn(T, d, dtype=dtype), torch.randn(T, d, dtype=dtype)
    table, weight = torch.randn(1, d) * 0.01, torch.ones(d, dtype=dtype)
    vector = table[0].to(dtype)
    copy_src, copy_dst = torch.randn(2 * T * d, dtype=dtype), torch.empty(2 * T * d, dtype=dtype)
    # The in-place ops run again and again on the same buffers: residual grows by
    # about one unit per call, harmless for the thousands of calls made here.
    fns = {
        "ours": lambda: fused_add_steer_rms_norm_(hidden, residual, table, None, weight, EPS),
        "vllm": lambda: torch.ops._C.fused_add_rms_norm(hidden, residual, weight, EPS),
        "naive": lambda: (residual.add_(vector), torch.ops._C.fused_add_rms_norm(hidden, residual, weight, EPS)),
        "eager": lambda: fused_add_steer_rms_norm_reference(hidden, residual, table, None, weight, EPS),
        "compiled": lambda: compiled_reference(hidden, residual, table, None, weight, EPS),
        "copy": lambda: copy_dst.copy_(copy_src),
    }
    return fns, 4 * T * d * hidden.element_size()


def backward_contenders(T: int, d: int, dtype: torch.dtype) -> dict:
    hidden, residual = torch.randn(T, d, dtype=dtype), torch.randn(T, d, dtype=dtype)
    table, weight = (torch.randn(1, d) * 0.01).requires_grad_(), torch.ones(d, dtype=dtype)
    grad_y = torch.randn(T, d, dtype=dtype)
    _, residual_out, rstd = torch.ops.steering.fused_add_steer_rms_norm_fwd(hidden, residual, table, None, weight, EPS)
    leaves = [hidden.clone().requires_grad_(), residual.clone().requires_grad_(), table]
    y_ref, _ = fused_add_steer_rms_norm_reference(*leaves, None, weight, EPS)
    return {
        "ours": lambda: torch.ops.steering.fused_add_steer_rms_norm_bwd(
            grad_y, None, residual_out, rstd, None, weight, 1, True, False
        ),
        "autograd": lambda: torch.autograd.grad(y_ref, leaves, grad_y, retain_graph=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512, 4096])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1536, 3584, 5120])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="T in {16, 4096}, d=3584")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.hidden = [16, 4096], [3584]

    import vllm._custom_ops  # noqa: F401  registers torch.ops._C (vLLM's CPU ops)

    # default dynamic: specialises on the first shape, then recompiles once with dynamic sizes
    compiled_reference = torch.compile(fused_add_steer_rms_norm_reference)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.samples} interleaved samples")
    print("\nForward, in place. GB/s = 4*T*d*bytes / time; ratios are time / time(ours) (>1: ours is faster)")
    header = f"{'dtype':<9}{'T':>6}{'d':>6}{'ours us':>10}{'ours GB/s':>10}{'copy GB/s':>10}" + "".join(
        f"{name:>10}" for name in ("vs vllm", "vs naive", "vs eager", "vs compile", "of copy")
    )
    print(header)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for d in args.hidden:
            for T in args.tokens:
                fns, nbytes = forward_contenders(T, d, dtype, compiled_reference)
                t = interleaved_medians(fns, args.samples)
                rows.append((dtype_name, T, d, t))
                print(
                    f"{dtype_name:<9}{T:>6}{d:>6}{t['ours'] * 1e6:>10.1f}{nbytes / t['ours'] / 1e9:>10.1f}"
                    f"{nbytes / t['copy'] / 1e9:>10.1f}{t['vllm'] / t['ours']:>10.2f}{t['naive'] / t['ours']:>10.2f}"
                    f"{t['eager'] / t['ours']:>10.2f}{t['compiled'] / t['ours']:>10.2f}{t['copy'] / t['ours']:>10.2f}",
                    flush=True,
                )

    print("\nBackward (d_hidden = d_residual, d_table). ratio = time(autograd of the reference) / time(ours)")
    print(f"{'dtype':<9}{'T':>6}{'d':>6}{'ours us':>10}{'autograd us':>13}{'ratio':>8}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for d in args.hidden:
            for T in args.tokens:
                t = interleaved_medians(backward_contenders(T, d, dtype), args.samples)
                print(
                    f"{dtype_name:<9}{T:>6}{d:>6}{t['ours'] * 1e6:>10.1f}{t['autograd'] * 1e6:>13.1f}"
                    f"{t['autograd'] / t['ours']:>8.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
