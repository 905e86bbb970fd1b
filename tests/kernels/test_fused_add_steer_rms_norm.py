"""The fused op against its float64 reference, in every form and on both backends.

Backends: "cpp" is the C++ CPU op (csrc/), "triton" the Triton kernels, run on
the GPU when there is one and under TRITON_INTERPRET=1 on the CPU otherwise
(tests/conftest.py sets it); Triton tests keep shapes small for the interpreter.
"""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import fused_add_steer_rms_norm, fused_add_steer_rms_norm_, fused_add_steer_rms_norm_reference

# the package re-exports a function of the module's name, so fetch the module itself
op_module = importlib.import_module("kernels.fused_add_steer_rms_norm")
EPS = 1e-6
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One unit in the last place of each dtype, relative. Forward outputs are one
# rounding of an fp32 result; the backward starts from the rounded residual_out
# and grad_y, so its error is a few roundings deep.
ULP = {torch.float32: 2**-20, torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float64: 2**-45}
FWD_ULPS, BWD_ULPS = 2, 8


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """|actual - expected| <= rel * (|expected| + rms(expected)), elementwise, with a useful message."""
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    a, e = actual.double(), expected.double()
    scale = e.pow(2).mean().sqrt().item() if e.numel() else 0.0
    err = (a - e).abs()
    bad = err > rel * (e.abs() + scale)
    if bad.any():
        worst = int(err.argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.numel()} elements differ beyond rel={rel:.2e} (rms {scale:.3g}); "
            f"worst at {where}: got {a.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g}"
        )


def make_inputs(T, d, R, dtype, device="cpu", with_index=True):
    """Random inputs, never zeros; table rows are distinct so a wrong row shows."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    hidden = torch.randn(T, d, dtype=dtype, device=device)
    residual = torch.randn(T, d, dtype=dtype, device=device) * 2
    table = torch.randn(R, d, dtype=acc, device=device) * 0.5 + torch.arange(R, device=device, dtype=acc)[:, None]
    index = torch.randint(0, R, (T,), device=device) if with_index else None
    weight = (1 + 0.3 * torch.randn(d, device=device)).to(dtype)
    return hidden, residual, table, index, weight


def reference(hidden, residual, table, index, weight, weight_offset=0.0):
    """float64 (y, residual_out, rstd)."""
    y, x = fused_add_steer_rms_norm_reference(
        hidden.double(), residual.double(), table.double(), index, weight.double(), EPS, weight_offset
    )
    return y, x, torch.rsqrt(x.pow(2).mean(-1) + EPS)


def reference_grads(hidden, residual, table, index, weight, grad_y, grad_residual_out, weight_offset=0.0):
    leaves = [t.detach().double().requires_grad_() for t in (hidden, residual, table, weight)]
    h, r, t, w = leaves
    y, x = fused_add_steer_rms_norm_reference(h, r, t, index, w, EPS, weight_offset)
    loss = (y * grad_y.double()).sum()
    if grad_residual_out is not None:
        loss = loss + (x * grad_residual_out.double()).sum()
    loss.backward()
    return [leaf.grad for leaf in leaves]


# backend adapters: (forward functional, forward in place, backward)
def _cpp_ops():
    ops = torch.ops.steering
    return ops.fused_add_steer_rms_norm_fwd, ops.fused_add_steer_rms_norm_, ops.fused_add_steer_rms_norm_bwd


def _triton_ops():
    return op_module.triton_forward, op_module.triton_forward_, op_module.triton_backward


BACKENDS = {"cpp": ("cpu", _cpp_ops), "triton": (TRITON_DEVICE, _triton_ops)}
# (T, d, R, with_index): T=1, odd d, d not a multiple of any vector width, several table rows
CPP_SHAPES = [(1, 64, 1, False), (1, 67, 3, True), (16, 1536, 1, False), (37, 1000, 4, True), (300, 5120, 2, True)]
TRITON_SHAPES = [(1, 64, 1, False), (1, 67, 3, True), (9, 130, 1, False), (13, 96, 4, True)]
CASES = [("cpp", s) for s in CPP_SHAPES] + [("triton", s) for s in TRITON_SHAPES]


def _case_id(case):
    backend, (T, d, R, with_index) = case
    return f"{backend}-T{T}-d{d}-R{R}{'-index' if with_index else ''}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_matches_reference(case, dtype):
    backend, (T, d, R, with_index) = case
    device, ops = BACKENDS[backend]
    forward, _, _ = ops()
    inputs = make_inputs(T, d, R, dtype, device, with_index)
    y, residual_out, rstd = forward(*inputs, EPS)
    y_ref, x_ref, rstd_ref = reference(*[t.cpu() if t is not None else None for t in inputs])
    assert y.dtype == dtype and residual_out.dtype == dtype and rstd.dtype == torch.float32
    assert_close(residual_out.cpu(), x_ref, FWD_ULPS * ULP[dtype], "residual_out")
    assert_close(y.cpu(), y_ref, FWD_ULPS * ULP[dtype], "y")
    assert_close(rstd.cpu(), rstd_ref, 1e-5, "rstd")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_writes_outputs_into_inputs_and_nothing_else(backend, dtype):
    device, ops = BACKENDS[backend]
    forward, forward_, _ = ops()
    T, d, R, pad = 11, 131, 3, 97
    hidden, residual, table, index, weight = make_inputs(T, d, R, dtype, device)
    y_expected, x_expected, _ = forward(hidden, residual, table, index, weight, EPS)

    # hidden and residual live inside guarded buffers: the op must not write past them
    sentinel = torch.randn(2 * pad, dtype=dtype, device=device)
    buffers = []
    for src in (hidden, residual):
        buf = torch.cat([sentinel[:pad], src.flatten(), sentinel[pad:]])
        buffers.append(buf)
    h_view = buffers[0][pad : pad + T * d].view(T, d)
    r_view = buffers[1][pad : pad + T * d].view(T, d)
    read_only = [t.clone() for t in (table, index, weight)]

    forward_(h_view, r_view, table, index, weight, EPS)

    assert torch.equal(h_view, y_expected), "hidden must hold y, bitwise equal to the functional form"
    assert torch.equal(r_view, x_expected), "residual must hold residual_out, bitwise equal to the functional form"
    for buf in buffers:
        assert torch.equal(buf[:pad], sentinel[:pad]) and torch.equal(buf[-pad:], sentinel[pad:]), "wrote outside"
    for before, after in zip(read_only, (table, index, weight), strict=True):
        assert torch.equal(before, after), "an input other than hidden/residual changed"


@pytest.mark.parametrize("with_grad_residual", [True, False], ids=["grad_residual", "no_grad_residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_matches_reference(case, dtype, with_grad_residual):
    backend, (T, d, R, with_index) = case
    device, ops = BACKENDS[backend]
    forward, _, backward = ops()
    hidden, residual, table, index, weight = make_inputs(T, d, R, dtype, device, with_index)
    _, residual_out, rstd = forward(hidden, residual, table, index, weight, EPS)
    grad_y = torch.randn_like(hidden)
    grad_res = torch.randn_like(hidden) if with_grad_residual else None

    g, d_table, d_weight = backward(grad_y, grad_res, residual_out, rstd, index, weight, R, True, True)

    cpu = [t.cpu() if t is not None else None for t in (hidden, residual, table, index, weight, grad_y, grad_res)]
    dh_ref, dr_ref, dt_ref, dw_ref = reference_grads(*cpu)
    torch.testing.assert_close(dh_ref, dr_ref)  # one g serves both inputs
    assert g.dtype == dtype and d_table.dtype == torch.float32 and d_weight.dtype == dtype
    assert_close(g.cpu(), dh_ref, BWD_ULPS * ULP[dtype], "grad hidden/residual")
    assert_close(d_table.cpu(), dt_ref, BWD_ULPS * ULP[dtype], "grad table")
    assert_close(d_weight.cpu(), dw_ref, BWD_ULPS * ULP[dtype], "grad weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_outputs_round_to_nearest_even_and_y_is_the_norm_of_the_stored_residual(backend):
    """residual_out is torch's round-to-nearest-even of the fp32 sum, bit for bit (ties included: bf16 + bf16
    sums tie often), and y is computed from residual_out as stored, not from the unrounded sum."""
    device, ops = BACKENDS[backend]
    forward, _, _ = ops()
    T, d = (64, 1000) if backend == "cpp" else (8, 67)  # full vector chunks and a tail on every ISA
    hidden, residual, table, index, weight = make_inputs(T, d, 3, torch.bfloat16, device)
    y, residual_out, rstd = forward(hidden, residual, table, index, weight, EPS)
    x = hidden.cpu().float() + residual.cpu().float() + table.cpu()[index.cpu()]
    assert torch.equal(residual_out.cpu(), x.to(torch.bfloat16)), "residual_out is not the RNE of the fp32 sum"
    from_stored = (residual_out.cpu().double() * rstd.cpu().double()[:, None] * weight.cpu().double()).bfloat16()
    from_unrounded = (x.double() * rstd.cpu().double()[:, None] * weight.cpu().double()).bfloat16()
    differ_stored = (y.cpu() != from_stored).float().mean().item()
    differ_unrounded = (y.cpu() != from_unrounded).float().mean().item()
    # rstd's summation order may flip a rare rounding; the unrounded sum moves about a third of them
    assert differ_stored < 0.01, f"{differ_stored:.1%} of y differ from the norm of the stored residual_out"
    assert differ_unrounded > 0.05, "the check above cannot tell the two definitions of y apart"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nans_stay_nans(dtype):
    """A NaN in the table, whatever its payload, or in hidden makes residual_out NaN there and the row's y
    NaN; other rows are untouched. (The bf16 stores of the AVX2 / AVX-512 builds round with integer ops
    that would turn a NaN with payload 0x7fffffff into -0.0 or 0x7f800001 into inf: the op guards them.)"""
    T, d, R = 16, 203, 2  # 8 rows a thread: the even/odd bf16 path of the AVX2 / AVX-512 builds too
    hidden, residual, table, _, weight = make_inputs(T, d, R, dtype)
    index = torch.arange(T) % 2
    table.view(torch.int32)[1, 5] = 0x7FFFFFFF
    table.view(torch.int32)[1, 200] = 0x7F800001  # in the row's tail
    hidden[3, 77] = float("nan")
    y, residual_out, _ = torch.ops.steering.fused_add_steer_rms_norm_fwd(hidden, residual, table, index, weight, EPS)
    for row in range(1, T, 2):
        cols = [5, 77, 200] if row == 3 else [5, 200]
        assert torch.isnan(residual_out[row]).nonzero().flatten().tolist() == cols, f"row {row}"
        assert torch.isnan(y[row]).all(), f"row {row}: y must be NaN throughout"
    assert torch.isfinite(residual_out[0::2]).all() and torch.isfinite(y[0::2]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bandwidth_reference_swaps_in_place(dtype):
    """benchmarks/bench_kernel.py's reference moves the forward's bytes: it must really read and write both."""
    a, b = torch.randn(5, 131, dtype=dtype), torch.randn(5, 131, dtype=dtype)
    a0, b0 = a.clone(), b.clone()
    torch.ops.steering.bandwidth_reference_(a, b)
    assert torch.equal(a, b0) and torch.equal(b, a0)
    with pytest.raises(ValueError, match="one shape and dtype"):
        torch.ops.steering.bandwidth_reference_(a, b[:, :7].contiguous())


def test_triton_backward_launch_settings_follow_shapes_and_device():
    """Two persistent programs per SM, never more than rows, partials bounded; second-stage tiles."""
    assert op_module.backward_programs(n_rows=8192, sm_count=132, floats_per_program=2 * 3584) == 264
    assert op_module.backward_programs(n_rows=7, sm_count=132, floats_per_program=3584) == 7
    assert op_module.backward_programs(n_rows=8192, sm_count=132, floats_per_program=1 << 20) == 64
    assert op_module.sum_partials_settings(264) == (64, 32)
    assert op_module.sum_partials_settings(3) == (4, 32)


@pytest.mark.parametrize("n_parts, n", [(1, 7), (3, 40), (130, 67)], ids=["1part", "3parts", "130parts"])
def test_triton_second_stage_sums_the_partials_in_a_fixed_order(n_parts, n):
    """Partials summed over a part count that is not a multiple of the tile, columns with a tail."""
    partials = torch.randn(n_parts, n, device=TRITON_DEVICE)
    out = torch.empty(n, device=TRITON_DEVICE)
    op_module._sum_partials(partials, out)
    torch.testing.assert_close(out.cpu().double(), partials.cpu().double().sum(0), rtol=1e-6, atol=1e-5)
    again = torch.empty_like(out)
    op_module._sum_partials(partials, again)
    assert torch.equal(out, again)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_index_reads_the_rows_int64_reads(backend):
    """Both index dtypes, forward (functional and in place) and backward, against the reference's rows."""
    device, ops = BACKENDS[backend]
    forward, forward_, backward = ops()
    T, d, R = 13, 96, 4
    hidden, residual, table, index, weight = make_inputs(T, d, R, torch.float32, device)
    index32 = index.to(torch.int32)
    y_ref, x_ref, _ = reference(*[t.cpu() for t in (hidden, residual, table, index, weight)])
    y, x, rstd = forward(hidden, residual, table, index32, weight, EPS)
    assert_close(x.cpu(), x_ref, FWD_ULPS * ULP[torch.float32], "residual_out with an int32 index")
    assert_close(y.cpu(), y_ref, FWD_ULPS * ULP[torch.float32], "y with an int32 index")
    h, r = hidden.clone(), residual.clone()
    forward_(h, r, table, index32, weight, EPS)
    assert torch.equal(h, y) and torch.equal(r, x)
    grad_y = torch.randn_like(hidden)
    grads32 = backward(grad_y, None, x, rstd, index32, weight, R, True, True)
    grads64 = backward(grad_y, None, x, rstd, index, weight, R, True, True)
    for a, b in zip(grads32, grads64, strict=True):
        assert torch.equal(a, b), "the backward groups d_table by the same rows whatever the index dtype"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_computes_only_requested_grads(backend):
    device, ops = BACKENDS[backend]
    forward, _, backward = ops()
    hidden, residual, table, index, weight = make_inputs(5, 64, 2, torch.float32, device)
    _, residual_out, rstd = forward(hidden, residual, table, index, weight, EPS)
    g_all, dt_all, _ = backward(torch.ones_like(hidden), None, residual_out, rstd, index, weight, 2, True, True)
    g, d_table, d_weight = backward(torch.ones_like(hidden), None, residual_out, rstd, index, weight, 2, False, False)
    assert d_table.shape == (0, 64) and d_weight.shape == (0,)
    torch.testing.assert_close(g, g_all, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_weight_offset_multiplies_by_offset_plus_weight(case, dtype):
    """Gemma's norm: y = rmsnorm(x) * (1 + w) with w stored, 1 + w formed in fp32; forward, in place, backward."""
    backend, (T, d, R, with_index) = case
    device, ops = BACKENDS[backend]
    forward, forward_, backward = ops()
    hidden, residual, table, index, _ = make_inputs(T, d, R, dtype, device, with_index)
    weight = (0.3 * torch.randn(d, device=device)).to(dtype)  # Gemma's weights sit around 0, not 1
    y, residual_out, rstd = forward(hidden, residual, table, index, weight, EPS, 1.0)
    grad_y, grad_res = torch.randn_like(hidden), torch.randn_like(hidden)
    g, d_table, d_weight = backward(grad_y, grad_res, residual_out, rstd, index, weight, R, True, True, 1.0)

    cpu = [t.cpu() if t is not None else None for t in (hidden, residual, table, index, weight, grad_y, grad_res)]
    y_ref, x_ref, _ = reference(*cpu[:5], weight_offset=1.0)
    assert_close(residual_out.cpu(), x_ref, FWD_ULPS * ULP[dtype], "residual_out")
    assert_close(y.cpu(), y_ref, FWD_ULPS * ULP[dtype], "y")
    dh_ref, _, dt_ref, dw_ref = reference_grads(*cpu, weight_offset=1.0)
    assert_close(g.cpu(), dh_ref, BWD_ULPS * ULP[dtype], "grad hidden/residual")
    assert_close(d_table.cpu(), dt_ref, BWD_ULPS * ULP[dtype], "grad table")
    assert_close(d_weight.cpu(), dw_ref, BWD_ULPS * ULP[dtype], "grad weight")

    h, r = hidden.clone(), residual.clone()
    forward_(h, r, table, index, weight, EPS, 1.0)
    assert torch.equal(h, y) and torch.equal(r, residual_out)


def test_autograd_matches_reference_with_frozen_weight():
    """The learner's case: only the table trains; hidden/residual carry gradients through."""
    T, d, R = 23, 96, 3
    hidden, residual, table, index, weight = make_inputs(T, d, R, torch.float32)
    shape = (T // 23, 23, d)  # [B, S, d] activations, index [B, S]
    h = hidden.view(shape).requires_grad_()
    r = residual.view(shape).requires_grad_()
    t = table.clone().requires_grad_()
    y, residual_out = fused_add_steer_rms_norm(h, r, t, index.view(shape[:2]), weight, EPS)
    assert y.shape == shape and residual_out.shape == shape
    grad_y, grad_res = torch.randn_like(y), torch.randn_like(residual_out)
    torch.autograd.backward([y, residual_out], [grad_y, grad_res])
    dh_ref, _, dt_ref, _ = reference_grads(
        hidden, residual, table, index, weight, grad_y.view(T, d), grad_res.view(T, d)
    )
    assert weight.grad is None
    assert_close(h.grad.view(T, d), dh_ref, BWD_ULPS * ULP[torch.float32], "grad hidden")
    assert_close(r.grad.view(T, d), dh_ref, BWD_ULPS * ULP[torch.float32], "grad residual")
    assert_close(t.grad, dt_ref, BWD_ULPS * ULP[torch.float32], "grad table")


@pytest.mark.parametrize("with_index", [True, False], ids=["index", "no_index"])
def test_gradcheck_float64_cpu_op(with_index):
    hidden, residual, table, index, weight = make_inputs(4, 19, 3, torch.float64, with_index=with_index)
    inputs = [t.requires_grad_() for t in (hidden, residual, table)] + [index, weight.requires_grad_(), EPS]
    assert torch.autograd.gradcheck(fused_add_steer_rms_norm, inputs, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(fused_add_steer_rms_norm, inputs + [1.0], eps=1e-6, atol=1e-7)  # Gemma's norm


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_and_weight_grads_are_bitwise_repeatable(backend):
    device, ops = BACKENDS[backend]
    forward, _, backward = ops()
    T, d, R = (517, 1536, 4) if device == "cuda" or backend == "cpp" else (37, 96, 4)
    hidden, residual, table, index, weight = make_inputs(T, d, R, torch.bfloat16, device)
    _, residual_out, rstd = forward(hidden, residual, table, index, weight, EPS)
    grad_y, grad_res = torch.randn_like(hidden), torch.randn_like(hidden)

    def run():
        return backward(grad_y, grad_res, residual_out, rstd, index, weight, R, True, True)

    first = run()
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):  # the partition of tokens must not depend on the thread count
            torch.set_num_threads(n)
            again = run()
            for a, b, name in zip(first, again, ("g", "d_table", "d_weight"), strict=True):
                assert torch.equal(a, b), f"{name} differs between two identical backward calls ({n} threads)"
    finally:
        torch.set_num_threads(threads)


def _opcheck_samples(device):
    samples = []
    for dtype, with_index, offset in ((torch.float32, True, 0.0), (torch.bfloat16, False, 1.0)):
        hidden, residual, table, index, weight = make_inputs(6, 64, 2, dtype, device, with_index)
        samples.append((hidden, residual, table, index, weight, EPS, offset))
    return samples


def test_opcheck_inplace_and_functional_ops():
    for args in _opcheck_samples("cpu"):
        torch.library.opcheck(
            torch.ops.steering.fused_add_steer_rms_norm_.default,
            [a.clone() if isinstance(a, torch.Tensor) else a for a in args],
        )
        hidden, residual, table, index, weight, eps, offset = args
        grad_args = (
            hidden.requires_grad_(),
            residual.requires_grad_(),
            table.requires_grad_(),
            index,
            weight,
            eps,
            offset,
        )
        torch.library.opcheck(torch.ops.steering.fused_add_steer_rms_norm_fwd.default, grad_args)
        _, residual_out, rstd = torch.ops.steering.fused_add_steer_rms_norm_fwd(*args)
        bwd_args = (torch.randn_like(hidden), None, residual_out.detach(), rstd, index, weight, 2, True, True, offset)
        torch.library.opcheck(torch.ops.steering.fused_add_steer_rms_norm_bwd.default, bwd_args)


def test_torch_compile_fullgraph_inplace():
    hidden, residual, table, index, weight = make_inputs(8, 96, 3, torch.bfloat16)

    def layer_boundary(h, r):
        # what a vLLM decoder layer does around the op: it is followed by more work
        fused_add_steer_rms_norm_(h, r, table, index, weight, EPS)
        return h * 2, r

    compiled = torch.compile(layer_boundary, fullgraph=True, dynamic=False)
    expected = layer_boundary(hidden.clone(), residual.clone())
    got = compiled(hidden.clone(), residual.clone())
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_fullgraph_functional_with_backward():
    hidden, residual, table, index, weight = make_inputs(8, 96, 3, torch.float32)

    def step(h, r, t):
        y, x = fused_add_steer_rms_norm(h, r, t, index, weight, EPS)
        return (y.square().sum() + x.sum()) / 2

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    leaves = [t.clone().requires_grad_() for t in (hidden, residual, table)]
    compiled_leaves = [t.clone().requires_grad_() for t in (hidden, residual, table)]
    step(*leaves).backward()
    compiled(*compiled_leaves).backward()
    for a, b in zip(compiled_leaves, leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def _bad_arguments(device):
    """(name, mutate(args) -> args, exception, message fragment)."""
    f32 = torch.float32

    def replace(i, value):
        return lambda a: a[:i] + (value,) + a[i + 1 :]

    return [
        ("residual_shape", lambda a: (a[0], a[1][:, :-1].contiguous()) + a[2:], ValueError, "does not match hidden"),
        ("table_width", replace(2, torch.zeros(2, 63, device=device)), ValueError, "table must be [R >= 1, d=64]"),
        ("weight_shape", replace(4, torch.ones(63, dtype=f32, device=device)), ValueError, "weight must be [d=64]"),
        ("hidden_1d", lambda a: (a[0][0], a[1][0]) + a[2:], ValueError, "hidden must be 2-D"),
        ("residual_dtype", lambda a: (a[0], a[1].half()) + a[2:], TypeError, "residual dtype"),
        ("table_dtype", replace(2, torch.zeros(2, 64, dtype=torch.float16, device=device)), TypeError, "table must be"),
        (
            "index_dtype",
            replace(3, torch.zeros(6, dtype=f32, device=device)),
            TypeError,
            "index must be int64 or int32",
        ),
        ("index_shape", replace(3, torch.zeros(5, dtype=torch.long, device=device)), ValueError, "index must be [T=6]"),
        ("index_range", replace(3, torch.tensor([0, 1, 2, 0, 1, 0], device=device)), IndexError, "got min 0 max 2"),
        ("index_negative", replace(3, torch.tensor([0, -1, 0, 0, 1, 0], device=device)), IndexError, "[0, 2)"),
        (
            "residual_noncontiguous",
            lambda a: (a[0], a[1].t().contiguous().t()) + a[2:],
            ValueError,
            "residual must be contiguous",
        ),
    ]


BAD_ARGUMENT_CASES = [case[0] for case in _bad_arguments("cpu")]


@pytest.mark.parametrize("case_name", BAD_ARGUMENT_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise_clear_errors(backend, case_name):
    device, ops = BACKENDS[backend]
    _, mutate, exc, fragment = next(c for c in _bad_arguments(device) if c[0] == case_name)
    if device == "cuda" and exc is IndexError:
        pytest.skip("index values are not range-checked on CUDA (that would need a host sync)")
    args = mutate(make_inputs(6, 64, 2, torch.float32, device)) + (EPS,)
    forward, forward_, _ = ops()
    for fn in (forward, forward_):
        with pytest.raises(exc) as info:
            fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        assert fragment in str(info.value), f"{case_name}: message {str(info.value)!r} lacks {fragment!r}"


@pytest.mark.slow
def test_int64_offsets_past_2_pow_31_elements():
    """T * d > 2^31: the last rows are computed from the right addresses (8.6 GB of bf16)."""
    d = 4096
    T = 2**31 // d + 3
    hidden = torch.empty(T, d, dtype=torch.bfloat16)  # rows are independent: only the last ones are checked
    residual = torch.empty(T, d, dtype=torch.bfloat16)
    tail_h, tail_r, table, index, weight = make_inputs(4, d, 3, torch.bfloat16)
    hidden[-4:], residual[-4:] = tail_h, tail_r
    full_index = torch.zeros(T, dtype=torch.long)
    full_index[-4:] = index
    fused_add_steer_rms_norm_(hidden, residual, table, full_index, weight, EPS)
    y_ref, x_ref, _ = reference(tail_h, tail_r, table, index, weight)
    assert_close(hidden[-4:], y_ref, FWD_ULPS * ULP[torch.bfloat16], "y of the last rows")
    assert_close(residual[-4:], x_ref, FWD_ULPS * ULP[torch.bfloat16], "residual_out of the last rows")


def test_triton_on_cpu_switch_routes_the_ops_through_triton():
    """STEERING_KERNELS_TRITON_ON_CPU=1 makes torch.ops.steering.* on CPU tensors run the Triton kernels."""
    script = textwrap.dedent(
        """
        import torch
        from kernels import fused_add_steer_rms_norm, fused_add_steer_rms_norm_reference as ref
        h, r, t = (torch.randn(5, 80, requires_grad=True) for _ in range(3))
        w, index = torch.rand(80) + 0.5, torch.tensor([0, 2, 1, 2, 0])
        y, x = fused_add_steer_rms_norm(h, r, t, index, w, 1e-6)
        (y.sum() + x.square().sum()).backward()
        leaves = [v.detach().double().requires_grad_() for v in (h, r, t)]
        y_ref, x_ref = ref(*leaves[:3], index, w.double(), 1e-6)
        (y_ref.sum() + x_ref.square().sum()).backward()
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip((h, r, t), leaves):
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-4)
        # only the Triton path refuses float64 (the C++ op computes it in float64)
        try:
            fused_add_steer_rms_norm(h.double(), r.double(), t.double(), None, w.double(), 1e-6)
        except TypeError as e:
            assert "float64 runs on the CPU op only" in str(e), e
            print("TRITON-PATH-OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["STEERING_KERNELS_TRITON_ON_CPU"] = "1"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "TRITON-PATH-OK" in result.stdout, result.stderr[-3000:]
