"""GPU check of the fused op: one prepared script, a few minutes on one GPU.

1. correctness of the compiled Triton kernels against the float64 reference
   (functional, in place, backward; T=1 to 4096, odd d, several table rows)
   and bitwise-repeatable d_table;
2. int64 offsets: T * d > 2^31 elements;
3. CUDA-graph capture and replay of the in-place op, with the table changed
   in place between replays (what a hot-swap does under CUDA graphs);
4. bandwidth at T >= 8192 (rows far larger than L2) against the bandwidth
   reference measured in the same run: a Triton kernel that swaps hidden and
   residual in place, i.e. moves the in-place forward's bytes its way (reads
   both, writes both) with no arithmetic. The backward (reads dy, d_residual_out
   and x, writes g) moves as many bytes. Next to them: vLLM's CUDA
   fused_add_rms_norm (when vLLM is installed), torch.compile of the reference
   (in place for the forward; its compiled backward), eager torch.
   Targets: forward >= 92% and backward >= 80% of the reference.

python -m benchmarks.gpu_check            (benchmarks/gpu_check.sh installs and runs it)
"""

import importlib
import sys

import torch
import triton
import triton.language as tl

from kernels import fused_add_steer_rms_norm_, fused_add_steer_rms_norm_reference

op = importlib.import_module("kernels.fused_add_steer_rms_norm")
EPS = 1e-6
ULP = {torch.float32: 2**-20, torch.bfloat16: 2**-8, torch.float16: 2**-11}
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("  ok    " if ok else "  FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


def max_violation(actual, expected, rel) -> float:
    """max |a - e| / (rel * (|e| + rms(e))): <= 1 passes."""
    a, e = actual.double().cpu(), expected.double().cpu()
    scale = e.pow(2).mean().sqrt()
    return ((a - e).abs() / (rel * (e.abs() + scale))).max().item()


def inputs(T, d, R, dtype, with_index=True):
    dev = "cuda"
    return (
        torch.randn(T, d, dtype=dtype, device=dev),
        2 * torch.randn(T, d, dtype=dtype, device=dev),
        torch.randn(R, d, device=dev) * 0.5 + torch.arange(R, device=dev)[:, None],
        torch.randint(0, R, (T,), device=dev) if with_index else None,
        (1 + 0.3 * torch.randn(d, device=dev)).to(dtype),
    )


def correctness() -> None:
    print("\n1. correctness against the float64 reference (compiled Triton)")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for T, d, R, with_index in (
            (1, 67, 1, False),
            (7, 1000, 3, True),
            (4096, 3584, 4, True),
            (333, 5120, 1, False),
        ):
            h, r, t, idx, w = inputs(T, d, R, dtype, with_index)
            y, x, rstd = op.triton_forward(h, r, t, idx, w, EPS)
            h2, r2 = h.clone(), r.clone()
            fused_add_steer_rms_norm_(h2, r2, t, idx, w, EPS)
            leaves = [v.double().cpu().requires_grad_() for v in (h, r, t, w)]
            idx_cpu = idx.cpu() if idx is not None else None
            y_ref, x_ref = fused_add_steer_rms_norm_reference(leaves[0], leaves[1], leaves[2], idx_cpu, leaves[3], EPS)
            gy, gr = torch.randn_like(y_ref), torch.randn_like(x_ref)
            ((y_ref * gy).sum() + (x_ref * gr).sum()).backward()
            args = (gy.to("cuda", dtype), gr.to("cuda", dtype), x, rstd, idx, w, R, True, True)
            g, dt, dw = op.triton_backward(*args)
            g2, dt2, dw2 = op.triton_backward(*args)
            worst = max(
                max_violation(y, y_ref, 2 * ULP[dtype]),
                max_violation(x, x_ref, 2 * ULP[dtype]),
                max_violation(g, leaves[0].grad, 8 * ULP[dtype]),
                max_violation(dt, leaves[2].grad, 8 * ULP[dtype]),
                max_violation(dw, leaves[3].grad, 8 * ULP[dtype]),
            )
            same = torch.equal(h2, y) and torch.equal(r2, x)
            repeat = torch.equal(g, g2) and torch.equal(dt, dt2) and torch.equal(dw, dw2)
            check(
                worst <= 1 and same and repeat,
                f"{dtype} T={T} d={d} R={R}: worst/tolerance {worst:.2f}, in place == functional {same}, "
                f"backward bitwise repeatable {repeat}",
            )


def int64_offsets() -> None:
    print("\n2. int64 offsets (T * d > 2^31)")
    d = 4096
    T = 2**31 // d + 5
    h = torch.empty(T, d, dtype=torch.bfloat16, device="cuda")
    r = torch.empty_like(h)
    th, tr, t, idx, w = inputs(5, d, 3, torch.bfloat16)
    h[-5:], r[-5:] = th, tr
    full_idx = torch.zeros(T, dtype=torch.long, device="cuda")
    full_idx[-5:] = idx
    fused_add_steer_rms_norm_(h, r, t, full_idx, w, EPS)
    y_ref, x_ref = fused_add_steer_rms_norm_reference(th.double(), tr.double(), t.double(), idx, w.double(), EPS)
    worst = max(
        max_violation(h[-5:], y_ref, 2 * ULP[torch.bfloat16]), max_violation(r[-5:], x_ref, 2 * ULP[torch.bfloat16])
    )
    check(worst <= 1, f"last rows of a {T} x {d} bf16 tensor: worst/tolerance {worst:.2f}")
    del h, r
    torch.cuda.empty_cache()


def cuda_graph() -> None:
    print("\n3. CUDA-graph capture and replay of the in-place op")
    T, d, R = 256, 3584, 2
    h, r, t, idx, w = inputs(T, d, R, torch.bfloat16)
    static_h, static_r = h.clone(), r.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernel) outside the capture
        fused_add_steer_rms_norm_(static_h.clone(), static_r.clone(), t, idx, w, EPS)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_add_steer_rms_norm_(static_h, static_r, t, idx, w, EPS)
    for step in range(3):
        new_h, new_r = torch.randn_like(h), torch.randn_like(r)
        t.copy_(torch.randn_like(t))  # vectors swapped in place between replays
        static_h.copy_(new_h), static_r.copy_(new_r)
        graph.replay()
        torch.cuda.synchronize()
        eh, er = new_h.clone(), new_r.clone()
        fused_add_steer_rms_norm_(eh, er, t, idx, w, EPS)
        check(torch.equal(static_h, eh) and torch.equal(static_r, er), f"replay {step}: equals eager, new table seen")


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3  # seconds


@triton.jit
def _swap_rows_kernel(a_ptr, b_ptr, n_cols, BLOCK_SIZE: tl.constexpr):
    # the bandwidth reference: one program a row, like the forward; reads a and b, writes them swapped
    offsets = tl.program_id(0).to(tl.int64) * n_cols + tl.arange(0, BLOCK_SIZE)
    mask = tl.arange(0, BLOCK_SIZE) < n_cols
    a = tl.load(a_ptr + offsets, mask=mask)
    b = tl.load(b_ptr + offsets, mask=mask)
    tl.store(a_ptr + offsets, b, mask=mask)
    tl.store(b_ptr + offsets, a, mask=mask)


def swap_rows_(a: torch.Tensor, b: torch.Tensor) -> None:
    block, num_warps = op._launch_settings(a.shape[1])
    _swap_rows_kernel[(a.shape[0],)](a, b, a.shape[1], BLOCK_SIZE=block, num_warps=num_warps)


def reference_(hidden, residual, table, weight, eps):
    """The op in place in plain torch (torch.compile makes one kernel of it)."""
    x = hidden.float() + residual.float() + table[0]
    residual.copy_(x)
    hidden.copy_(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float())


def bandwidth_row(dtype, T, d, has_vllm, compiled_ref, compiled_ref_) -> None:
    h, r, t, _, w = inputs(T, d, 1, dtype, with_index=False)
    nbytes = 4 * T * d * h.element_size()  # forward: read hidden, residual, write both; backward: read 3, write 1
    a, b = h.clone(), r.clone()
    ref_s = bench(lambda: swap_rows_(a, b))
    fwd_s = bench(lambda: fused_add_steer_rms_norm_(h, r, t, None, w, EPS))
    _, x, rstd = op.triton_forward(h, r, t, None, w, EPS)
    gy, gr = torch.randn_like(h), torch.randn_like(h)
    bwd_s = bench(lambda: op.triton_backward(gy, gr, x, rstd, None, w, 1, True, False))
    vllm_s = bench(lambda: torch.ops._C.fused_add_rms_norm(h, r, w, EPS)) if has_vllm else float("nan")
    compiled_s = bench(lambda: compiled_ref_(h, r, t, w, EPS))
    eager_s = bench(lambda: reference_(h, r, t, w, EPS))
    leaves = [h.clone().requires_grad_(), r.clone().requires_grad_(), t.clone().requires_grad_()]
    y_c, x_c = compiled_ref(*leaves, None, w, EPS)
    compiled_bwd_s = bench(lambda: torch.autograd.grad([y_c, x_c], leaves, [gy, gr], retain_graph=True))
    print(
        f"{str(dtype)[6:]:<9}{T:>7}{d:>6}{nbytes / ref_s / 1e9:>8.0f}{nbytes / fwd_s / 1e9:>9.0f}{ref_s / fwd_s:>8.2f}"
        f"{nbytes / bwd_s / 1e9:>9.0f}{ref_s / bwd_s:>8.2f}{vllm_s / fwd_s:>9.2f}{compiled_s / fwd_s:>9.2f}"
        f"{eager_s / fwd_s:>8.2f}{compiled_bwd_s / bwd_s:>12.2f}",
        flush=True,
    )
    check(ref_s / fwd_s >= 0.92, f"{dtype} forward >= 92% of the reference at T={T} d={d}: {ref_s / fwd_s:.2f}")
    check(ref_s / bwd_s >= 0.80, f"{dtype} backward >= 80% of the reference at T={T} d={d}: {ref_s / bwd_s:.2f}")


def bandwidth() -> None:
    print("\n4. bandwidth (GB/s = 4 T d bytes / median time); of ref = time(ref) / time(ours); vs X = time(X) / ours")
    try:
        import vllm._custom_ops  # noqa: F401

        has_vllm = hasattr(torch.ops._C, "fused_add_rms_norm")
    except Exception:  # vLLM absent or not built for this GPU
        has_vllm = False
    torch._functorch.config.donated_buffer = False  # the compiled backward is timed on one retained graph
    compiled_ref = torch.compile(fused_add_steer_rms_norm_reference)
    compiled_ref_ = torch.compile(reference_)
    print(
        f"{'dtype':<9}{'T':>7}{'d':>6}{'ref':>8}{'fwd':>9}{'of ref':>8}{'bwd':>9}{'of ref':>8}"
        f"{'vs vllm':>9}{'vs comp':>9}{'vs eag':>8}{'bwd vs comp':>12}"
    )
    for dtype in (torch.bfloat16, torch.float32):
        for T, d in ((8192, 3584), (8192, 5120), (32768, 3584), (32768, 5120)):
            bandwidth_row(dtype, T, d, has_vllm, compiled_ref, compiled_ref_)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch.manual_seed(0)
    correctness()
    int64_offsets()
    cuda_graph()
    bandwidth()
    print(f"\n{len(failures)} check(s) failed" + "".join(f"\n  {f}" for f in failures))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
