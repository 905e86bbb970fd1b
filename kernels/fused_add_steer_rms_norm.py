"""Fused residual add + steering bias + RMSNorm (DESIGN.md section 3).

    residual_out = hidden + residual + table[index[t]]      (index None: row 0)
    y            = residual_out * rsqrt(mean(residual_out^2) + eps) * (weight_offset + weight)

weight_offset is 0 (the default) for RMSNorm and 1 for Gemma's norm, which stores w and multiplies by 1 + w:
the op forms the sum in fp32, so nothing is materialised per call and a bf16 weight is not rounded after it.

Three ops in the `steering` namespace, their schemas and CPU kernels defined in
csrc/fused_add_steer_rms_norm.cpp; this file adds the Triton kernels for CUDA,
the fake kernels (torch.compile) and autograd:

    torch.ops.steering.fused_add_steer_rms_norm_      in place, inference
    torch.ops.steering.fused_add_steer_rms_norm_fwd   functional, -> (y, residual_out, rstd)
    torch.ops.steering.fused_add_steer_rms_norm_bwd   its backward

Set STEERING_KERNELS_TRITON_ON_CPU=1 before importing to run CPU tensors through
the Triton kernels under Triton's interpreter instead of the C++ kernels (for
testing the Triton code without a GPU; it sets TRITON_INTERPRET=1).
"""

import os
import warnings

import torch

from kernels import cpu_op

TRITON_ON_CPU = os.environ.get("STEERING_KERNELS_TRITON_ON_CPU", "0") == "1"
if TRITON_ON_CPU:
    # Triton reads this when a kernel is decorated, i.e. when this module is imported.
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

CPU_CAPABILITY = cpu_op.load()  # defines the torch.ops.steering schemas

MAX_FUSED_SIZE = 65536  # widest row a program holds in registers


# ---------------------------------------------------------------------------
# Triton kernels


# Triton's interpreter truncates fp32 -> bf16 whatever the rounding asked for; the GPU rounds to nearest even.
_INTERPRETED = tl.constexpr(TRITON_ON_CPU or os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even on the GPU and under the interpreter alike."""
    if dtype == tl.float32:
        return x
    elif dtype == tl.bfloat16 and _INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _fused_add_steer_rms_norm_fwd_kernel(
    hidden_ptr,
    residual_ptr,
    table_ptr,
    index_ptr,
    weight_ptr,
    y_ptr,
    residual_out_ptr,
    rstd_ptr,
    n_cols,
    eps,
    weight_offset,
    HAS_INDEX: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # one program per row; rows are contiguous, offsets in int64 (T * d may exceed 2^31)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    offsets = row * n_cols + cols

    if HAS_INDEX:
        table_row = tl.load(index_ptr + row).to(tl.int64)
    else:
        table_row = 0
    # sums in fp32
    x = tl.load(hidden_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(table_ptr + table_row * n_cols + cols, mask=mask, other=0.0)

    # variance in fp32
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset

    # the outputs may alias hidden and residual: each element was read above. y is the norm of residual_out
    # as stored (rounded to its dtype), like the C++ op, vLLM's own op and the HF models
    residual_out = _round_to(x, residual_out_ptr.dtype.element_ty)
    tl.store(residual_out_ptr + offsets, residual_out, mask=mask)
    tl.store(y_ptr + offsets, _round_to(residual_out.to(tl.float32) * rstd * w, y_ptr.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(rstd_ptr + row, rstd)


@triton.jit
def _fused_add_steer_rms_norm_bwd_kernel(
    grad_y_ptr,
    grad_residual_out_ptr,
    x_ptr,
    rstd_ptr,
    index_ptr,
    weight_ptr,
    grad_input_ptr,
    table_partials_ptr,
    weight_partials_ptr,
    n_rows,
    n_cols,
    rows_per_program,
    table_partial_stride,
    weight_offset,
    HAS_GRAD_RESIDUAL: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    TABLE_GRAD: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # Persistent: program p owns a contiguous block of rows and one fp32 partial
    # of d_table / d_weight; a second kernel sums the partials in a fixed order.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset
    table_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    weight_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    table_partial = table_partials_ptr + pid.to(tl.int64) * table_partial_stride

    row_start = pid.to(tl.int64) * rows_per_program  # int64 loop variable, so int64 offsets
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        offsets = row * n_cols + cols
        dy = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        w_dy = w * dy
        # g = rstd * (w*dy - x_hat * mean(w*dy*x_hat)) + d_residual_out
        g = rstd * (w_dy - x_hat * (tl.sum(w_dy * x_hat, axis=0) / n_cols))
        if HAS_GRAD_RESIDUAL:
            g += tl.load(grad_residual_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_input_ptr + offsets, _round_to(g, grad_input_ptr.dtype.element_ty), mask=mask)
        if TABLE_GRAD:
            if HAS_INDEX:
                # this program alone owns its partial: a plain read-modify-write, no atomics
                slot = table_partial + tl.load(index_ptr + row).to(tl.int64) * n_cols + cols
                tl.store(slot, tl.load(slot, mask=mask, other=0.0) + g, mask=mask)
            else:
                table_acc += g
        if WEIGHT_GRAD:
            weight_acc += dy * x_hat

    if TABLE_GRAD and not HAS_INDEX:
        tl.store(table_partial + cols, table_acc, mask=mask)
    if WEIGHT_GRAD:
        tl.store(weight_partials_ptr + pid.to(tl.int64) * n_cols + cols, weight_acc, mask=mask)


@triton.jit
def _sum_partials_kernel(partials_ptr, out_ptr, n_parts, n_elements, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # out[j] = sum over p of partials[p, j]. Each program owns BLOCK_N columns and walks the parts BLOCK_P at a
    # time: a [BLOCK_P, BLOCK_N] tile a load, so a few hundred partials cost a few dependent loads, not one
    # each (the one-part-a-step loop this replaces is the likely cause of the fixed ~0.3 ms an H200 run saw in
    # the backward; not yet measured since). The order of the additions depends only on the shapes:
    # deterministic.
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_elements
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = (parts[:, None] < n_parts) & col_mask[None, :]
        acc += tl.load(partials_ptr + parts[:, None].to(tl.int64) * n_elements + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, _round_to(tl.sum(acc, axis=0), out_ptr.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------
# launchers


def _launch_settings(n_cols: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a row of n_cols: fixed, no autotuning (CUDA-graph safe)."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise RuntimeError(f"fused_add_steer_rms_norm: hidden size {n_cols} exceeds the {MAX_FUSED_SIZE} supported")
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32
    return block, num_warps


def _num_programs(device: torch.device, n_rows: int, floats_per_program: int) -> int:
    """Persistent program count for the backward on this device (see backward_programs)."""
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return backward_programs(n_rows, sm_count, floats_per_program)


def backward_programs(n_rows: int, sm_count: int, floats_per_program: int) -> int:
    """Two persistent programs per SM, each a few rows in flight; partials bounded to 256 MiB.

    Two are enough to cover DRAM latency (each holds a whole row of dy, x and d_residual_out) and keep the
    partials, which the second stage reads back, at 2 * SMs rows.
    """
    return max(1, min(n_rows, 2 * sm_count, (1 << 26) // max(floats_per_program, 1)))


def sum_partials_settings(n_parts: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_N) of the second stage: tiles of up to 64 parts x 32 columns (8 KB of fp32)."""
    return min(64, max(2, triton.next_power_of_2(n_parts))), 32


def _check_forward_args(hidden, residual, table, index, weight) -> None:
    """Same checks, same messages as csrc/ (the C++ op checks its own inputs)."""
    if hidden.dim() != 2:
        raise ValueError(f"fused_add_steer_rms_norm: hidden must be 2-D [T, d], got shape {list(hidden.shape)}")
    n_rows, d = hidden.shape
    if residual.shape != hidden.shape:
        raise ValueError(
            f"fused_add_steer_rms_norm: residual shape {list(residual.shape)} does not match hidden shape "
            f"{list(hidden.shape)}"
        )
    if table.dim() != 2 or table.shape[1] != d or table.shape[0] < 1:
        raise ValueError(f"fused_add_steer_rms_norm: table must be [R >= 1, d={d}], got shape {list(table.shape)}")
    if weight.dim() != 1 or weight.shape[0] != d:
        raise ValueError(f"fused_add_steer_rms_norm: weight must be [d={d}], got shape {list(weight.shape)}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"fused_add_steer_rms_norm: hidden dtype must be float32, bfloat16 or float16 (float64 runs on the CPU op "
            f"only), got {hidden.dtype}"
        )
    for name, t in (("residual", residual), ("weight", weight)):
        if t.dtype != hidden.dtype:
            raise TypeError(
                f"fused_add_steer_rms_norm: {name} dtype {t.dtype} does not match hidden dtype {hidden.dtype}"
            )
    if table.dtype != torch.float32:
        raise TypeError(f"fused_add_steer_rms_norm: table must be float32, got {table.dtype}")
    for name, t in (("hidden", hidden), ("residual", residual), ("table", table), ("weight", weight)):
        if not t.is_contiguous():
            raise ValueError(f"fused_add_steer_rms_norm: {name} must be contiguous")
        if t.device != hidden.device:
            raise ValueError(f"fused_add_steer_rms_norm: {name} is on {t.device}, hidden on {hidden.device}")
    if index is not None:
        if index.dim() != 1 or index.shape[0] != n_rows:
            raise ValueError(f"fused_add_steer_rms_norm: index must be [T={n_rows}], got shape {list(index.shape)}")
        if index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"fused_add_steer_rms_norm: index must be int64 or int32, got {index.dtype}")
        if not index.is_contiguous():
            raise ValueError("fused_add_steer_rms_norm: index must be contiguous")
        # A range check needs the values: a host sync, which CUDA-graph capture forbids.
        # CPU tensors are checked; on CUDA the caller builds the index and owns its range.
        if index.device.type == "cpu" and index.numel() > 0:
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= table.shape[0]:
                raise IndexError(
                    f"fused_add_steer_rms_norm: index values must lie in [0, {table.shape[0]}) (table rows), "
                    f"got min {lo} max {hi}"
                )


def _launch_forward(hidden, residual, table, index, weight, eps, weight_offset, y, residual_out, rstd) -> None:
    n_rows, n_cols = hidden.shape
    if n_rows == 0:
        return
    block, num_warps = _launch_settings(n_cols)
    _fused_add_steer_rms_norm_fwd_kernel[(n_rows,)](
        hidden,
        residual,
        table,
        index if index is not None else table,  # unused pointer when HAS_INDEX is False
        weight,
        y,
        residual_out,
        rstd if rstd is not None else table,
        n_cols,
        eps,
        weight_offset,
        HAS_INDEX=index is not None,
        STORE_RSTD=rstd is not None,
        BLOCK_SIZE=block,
        num_warps=num_warps,
    )


def triton_forward_(hidden, residual, table, index, weight, eps, weight_offset=0.0) -> None:
    """In place: hidden <- y, residual <- residual_out. No allocation, no host sync on CUDA."""
    _check_forward_args(hidden, residual, table, index, weight)
    _launch_forward(hidden, residual, table, index, weight, eps, weight_offset, hidden, residual, None)


def triton_forward(hidden, residual, table, index, weight, eps, weight_offset=0.0):
    """-> (y, residual_out, rstd[T] fp32)."""
    _check_forward_args(hidden, residual, table, index, weight)
    y = torch.empty_like(hidden)
    residual_out = torch.empty_like(residual)
    rstd = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    _launch_forward(hidden, residual, table, index, weight, eps, weight_offset, y, residual_out, rstd)
    return y, residual_out, rstd


def _sum_partials(partials: torch.Tensor, out: torch.Tensor) -> None:
    n_elements = out.numel()
    block_p, block_n = sum_partials_settings(partials.shape[0])
    _sum_partials_kernel[(triton.cdiv(n_elements, block_n),)](
        partials, out, partials.shape[0], n_elements, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4
    )


def triton_backward(
    grad_y,
    grad_residual_out,
    residual_out,
    rstd,
    index,
    weight,
    num_table_rows,
    table_grad,
    weight_grad,
    weight_offset=0.0,
):
    """-> (grad_input [T, d] = d_hidden = d_residual, d_table [R, d] fp32 or [0, d], d_weight [d] or [0])."""
    n_rows, n_cols = residual_out.shape
    grad_y = grad_y.contiguous()
    x = residual_out.contiguous()
    dres = grad_residual_out.contiguous() if grad_residual_out is not None else None
    grad_input = torch.empty_like(x)
    d_table = torch.zeros((num_table_rows if table_grad else 0, n_cols), dtype=torch.float32, device=x.device)
    d_weight = torch.zeros((n_cols if weight_grad else 0,), dtype=weight.dtype, device=x.device)
    if n_rows == 0:
        return grad_input, d_table, d_weight

    # without an index only row 0 of the table receives gradient; the other rows stay zero
    partial_table_rows = (num_table_rows if index is not None else 1) if table_grad else 0
    table_floats = partial_table_rows * n_cols
    n_programs = _num_programs(x.device, n_rows, table_floats + n_cols)
    # index partials are read-modify-written, so they start at zero; the others are fully overwritten
    alloc = torch.zeros if index is not None else torch.empty
    table_partials = alloc((n_programs, table_floats), dtype=torch.float32, device=x.device)
    weight_partials = torch.empty((n_programs, n_cols if weight_grad else 0), dtype=torch.float32, device=x.device)
    block, num_warps = _launch_settings(n_cols)
    _fused_add_steer_rms_norm_bwd_kernel[(n_programs,)](
        grad_y,
        dres if dres is not None else grad_y,
        x,
        rstd,
        index if index is not None else rstd,
        weight,
        grad_input,
        table_partials if table_grad else x,  # unused pointers when the grad is not wanted
        weight_partials if weight_grad else x,
        n_rows,
        n_cols,
        triton.cdiv(n_rows, n_programs),
        table_floats,
        weight_offset,
        HAS_GRAD_RESIDUAL=dres is not None,
        HAS_INDEX=index is not None,
        TABLE_GRAD=table_grad,
        WEIGHT_GRAD=weight_grad,
        BLOCK_SIZE=block,
        num_warps=num_warps,
    )
    if table_grad:
        _sum_partials(table_partials, d_table[:partial_table_rows])
    if weight_grad:
        _sum_partials(weight_partials, d_weight)
    return grad_input, d_table, d_weight


# ---------------------------------------------------------------------------
# registration: Triton for CUDA (and for CPU under the switch), fakes, autograd

_lib = torch.library.Library("steering", "IMPL")  # kept alive: it owns the registrations
with warnings.catch_warnings():
    # the switch overrides the C++ CPU kernels on purpose
    warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
    for _key in ("CUDA", "CPU") if TRITON_ON_CPU else ("CUDA",):
        _lib.impl("fused_add_steer_rms_norm_", triton_forward_, _key)
        _lib.impl("fused_add_steer_rms_norm_fwd", triton_forward, _key)
        _lib.impl("fused_add_steer_rms_norm_bwd", triton_backward, _key)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("steering::fused_add_steer_rms_norm_")
def _(hidden, residual, table, index, weight, eps, weight_offset=0.0) -> None:
    return None


@torch.library.register_fake("steering::fused_add_steer_rms_norm_fwd")
def _(hidden, residual, table, index, weight, eps, weight_offset=0.0):
    rstd = hidden.new_empty((hidden.shape[0],), dtype=_acc_dtype(hidden.dtype))
    return torch.empty_like(hidden), torch.empty_like(residual), rstd


@torch.library.register_fake("steering::fused_add_steer_rms_norm_bwd")
def _(
    grad_y,
    grad_residual_out,
    residual_out,
    rstd,
    index,
    weight,
    num_table_rows,
    table_grad,
    weight_grad,
    weight_offset=0.0,
):
    d = residual_out.shape[1]
    d_table = residual_out.new_empty((num_table_rows if table_grad else 0, d), dtype=_acc_dtype(residual_out.dtype))
    return torch.empty_like(residual_out), d_table, weight.new_empty((d if weight_grad else 0,))


def _setup_context(ctx, inputs, output):
    # inputs holds weight_offset only where a caller passed it: torch leaves out trailing defaults
    hidden, residual, table, index, weight, eps, *weight_offset = inputs
    _, residual_out, rstd = output
    ctx.save_for_backward(residual_out, rstd, index, weight)
    ctx.num_table_rows = table.shape[0]
    ctx.weight_offset = weight_offset[0] if weight_offset else 0.0
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(rstd)


def _backward(ctx, grad_y, grad_residual_out, _grad_rstd):
    residual_out, rstd, index, weight = ctx.saved_tensors
    need_hidden, need_residual, need_table, _, need_weight, *_ = ctx.needs_input_grad
    grad_input, d_table, d_weight = torch.ops.steering.fused_add_steer_rms_norm_bwd(
        grad_y,
        grad_residual_out,
        residual_out,
        rstd,
        index,
        weight,
        ctx.num_table_rows,
        need_table,
        need_weight,
        ctx.weight_offset,
    )
    grads = (
        grad_input if need_hidden else None,
        grad_input if need_residual else None,
        d_table if need_table else None,
        None,
        d_weight if need_weight else None,
    )
    return grads + (None,) * (ctx.num_inputs - len(grads))


torch.library.register_autograd("steering::fused_add_steer_rms_norm_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# public functions


def _as_rows(t: torch.Tensor | None, d: int | None = None) -> torch.Tensor | None:
    """[..., d] -> [T, d] (index: [...] -> [T]); 2-D (1-D) tensors pass through so the op can check them."""
    if t is None:
        return None
    if d is None:
        return t if t.dim() == 1 else t.reshape(-1)
    return t if t.dim() == 2 else t.reshape(-1, d)


def fused_add_steer_rms_norm(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    table: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional form with autograd (the learner's).

    hidden, residual: [..., d] (bf16 / fp16 / fp32; fp64 on CPU); table: [R, d] fp32 (fp64 with
    fp64 activations); index: [...] int32/int64 rows of table, or None for row 0; weight: [d];
    weight_offset: 1.0 for Gemma's norm (multiplies by 1 + weight), else 0.0.
    Returns (y, residual_out), both shaped like hidden. Gradients flow to hidden, residual,
    table and weight; d_hidden and d_residual are the same tensor.
    """
    d = hidden.shape[-1]
    y, residual_out, _ = torch.ops.steering.fused_add_steer_rms_norm_fwd(
        _as_rows(hidden, d), _as_rows(residual, d), table, _as_rows(index), weight, eps, weight_offset
    )
    return y.view(hidden.shape), residual_out.view(residual.shape)


def fused_add_steer_rms_norm_(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    table: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    weight_offset: float = 0.0,
) -> None:
    """In-place form (the inference engine's): hidden <- y, residual <- residual_out.

    Same arguments as fused_add_steer_rms_norm; hidden and residual must be contiguous.
    Allocates nothing and, on CUDA, never syncs with the host, so it is safe inside CUDA
    graphs (on CUDA, index values are not range-checked: the caller owns them).
    """
    d = hidden.shape[-1]
    if hidden.dim() != 2 and hidden.is_contiguous() and residual.is_contiguous():
        hidden, residual = hidden.view(-1, d), residual.view(-1, d)
    torch.ops.steering.fused_add_steer_rms_norm_(hidden, residual, table, _as_rows(index), weight, eps, weight_offset)
