"""`python -m kernels`: check the fused op on this machine and time it once.

Runs the op in every form the product uses (in place for the engine, with
autograd for the learner), on the C++ kernels and on the Triton kernels (on the
GPU, or under Triton's interpreter without one), against the float64
reference, then times the in-place op against vLLM's unsteered op and eager
torch at one realistic shape. benchmarks/bench_kernel.py has the full tables.
"""

import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels/ decorates its Triton kernels

import importlib  # noqa: E402

from kernels import (  # noqa: E402
    cpu_isa,
    cpu_op,
    fused_add_steer_rms_norm,
    fused_add_steer_rms_norm_,
    fused_add_steer_rms_norm_reference,
)

op_module = importlib.import_module("kernels.fused_add_steer_rms_norm")
EPS = 1e-6


def _max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max()).item()


def check(device: str, dtype: torch.dtype, T: int, d: int, R: int = 4) -> dict[str, float]:
    """Max errors relative to the tensor's max, of every output and gradient, vs float64."""
    hidden, residual = torch.randn(T, d, dtype=dtype, device=device), torch.randn(T, d, dtype=dtype, device=device)
    table = torch.randn(R, d, device=device)
    index = torch.randint(0, R, (T,), device=device)
    weight = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)

    leaves = [t.cpu().double().requires_grad_() for t in (hidden, residual, table)]
    y_ref, x_ref = fused_add_steer_rms_norm_reference(*leaves, index.cpu(), weight.cpu().double(), EPS)
    grad_y = torch.randn_like(y_ref)
    (y_ref * grad_y).sum().backward()

    if device == "cpu":  # the C++ op via the public functions
        h, r, t = (v.clone().requires_grad_() for v in (hidden, residual, table))
        y, x = fused_add_steer_rms_norm(h, r, t, index, weight, EPS)
        (y * grad_y.to(dtype)).sum().backward()
        grads = (h.grad, t.grad)
        h_, r_ = hidden.clone(), residual.clone()
        fused_add_steer_rms_norm_(h_, r_, table, index, weight, EPS)
    else:  # the Triton launchers directly, so the same code runs under the interpreter
        y, x, rstd = op_module.triton_forward(hidden, residual, table, index, weight, EPS)
        g, d_table, _ = op_module.triton_backward(
            grad_y.to(device, dtype), None, x, rstd, index, weight, R, True, False
        )
        grads = (g, d_table)
        h_, r_ = hidden.clone(), residual.clone()
        op_module.triton_forward_(h_, r_, table, index, weight, EPS)
    assert torch.equal(h_, y) and torch.equal(r_, x), "in-place and functional forms disagree"
    return {
        "y": _max_rel_error(y, y_ref),
        "residual_out": _max_rel_error(x, x_ref),
        "d_hidden": _max_rel_error(grads[0], leaves[0].grad),
        "d_table": _max_rel_error(grads[1], leaves[2].grad),
    }


def median_seconds(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    built = ", ".join(cpu_op.built_capabilities())
    why = f"chosen by ${cpu_isa.ISA_VARIABLE}" if os.environ.get(cpu_isa.ISA_VARIABLE) else "the best this CPU runs"
    print(f"torch {torch.__version__}; C++ op built for {built}; loaded {op_module.CPU_CAPABILITY} ({why})")
    triton_where = "cuda" if torch.cuda.is_available() else "cpu"
    triton_label = "Triton (GPU)" if triton_where == "cuda" else "Triton (interpreter)"
    print("\nmax error relative to the float64 reference (in place == functional, bitwise: checked)")
    print(f"{'kernels':<22}{'dtype':<10}{'T x d':<12}{'y':>10}{'resid_out':>11}{'d_hidden':>10}{'d_table':>10}")
    for label, device, T, d in (("C++ (CPU)", "cpu", 512, 1536), (triton_label, triton_where, 8, 256)):
        for dtype in (torch.float32, torch.bfloat16):
            errors = check(device, dtype, T, d)
            row = "".join(f"{errors[k]:>10.1e}" if k != "residual_out" else f"{errors[k]:>11.1e}" for k in errors)
            print(f"{label:<22}{str(dtype).removeprefix('torch.'):<10}{f'{T} x {d}':<12}{row}")

    T, d, dtype = 512, 3584, torch.bfloat16
    hidden, residual = torch.randn(T, d, dtype=dtype), torch.randn(T, d, dtype=dtype)
    table, weight = torch.randn(1, d), torch.ones(d, dtype=dtype)
    timings = {
        "fused add + steer + RMSNorm (ours)": median_seconds(
            lambda: fused_add_steer_rms_norm_(hidden, residual, table, None, weight, EPS)
        )
    }
    try:
        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

        timings["vLLM fused_add_rms_norm (no steering)"] = median_seconds(
            lambda: torch.ops._C.fused_add_rms_norm(hidden, residual, weight, EPS)
        )
    except (ImportError, AttributeError):
        pass
    timings["eager torch (add, add, RMSNorm)"] = median_seconds(
        lambda: fused_add_steer_rms_norm_reference(hidden, residual, table, None, weight, EPS)
    )
    ours = timings["fused add + steer + RMSNorm (ours)"]
    print(f"\nCPU, T={T}, d={d}, bf16, in place, {torch.get_num_threads()} threads (median of 30)")
    for name, seconds in timings.items():
        gbps = 4 * T * d * hidden.element_size() / seconds / 1e9
        print(f"  {name:<40}{seconds * 1e6:>9.1f} us {gbps:>7.1f} GB/s   {seconds / ours:>5.2f}x ours")
    print("\nFull tables: python -m benchmarks.bench_kernel")


if __name__ == "__main__":
    main()
