"""The kernel benchmark measures what it says: cold pools really exceed the cache, every set is used, and the
in-place contenders (eager and compiled) compute the op, so a ratio against them compares equal work."""

import pytest
import torch

from benchmarks import bench_kernel
from kernels import fused_add_steer_rms_norm_reference


def test_cold_pools_span_four_times_the_last_level_cache():
    llc = bench_kernel.last_level_cache_bytes()
    assert llc >= 1 << 20
    for set_bytes in (16 * 1536 * 2 * 2, 512 * 3584 * 4 * 2, 4096 * 5120 * 4 * 2):
        n = bench_kernel.pool_size("cold", set_bytes)
        assert n >= 2 and n * set_bytes >= 4 * llc
        assert bench_kernel.pool_size("hot", set_bytes) == 1


def test_every_sample_walks_the_whole_pool():
    seen = {"a": [], "b": []}
    fns = {name: (lambda buffers, name=name: seen[name].append(buffers)) for name in seen}
    sets = list(range(7))
    bench_kernel.interleaved_medians(fns, sets, samples=3, min_sample_seconds=0)
    for calls in seen.values():
        assert set(calls) == set(sets)
        assert len(calls) >= 3 * len(sets)  # each sample goes once around at least


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_in_place_contenders_compute_the_op(dtype):
    T, d = 5, 96
    hidden, residual = torch.randn(T, d, dtype=dtype), torch.randn(T, d, dtype=dtype)
    table, weight = torch.randn(1, d) * 0.5, (1 + 0.3 * torch.randn(d)).to(dtype)
    y_ref, x_ref = fused_add_steer_rms_norm_reference(hidden, residual, table, None, weight, bench_kernel.EPS)
    for contender in (bench_kernel.reference_, bench_kernel.compile_inplace_reference()):
        h, r = hidden.clone(), residual.clone()
        contender(h, r, table, weight, bench_kernel.EPS)
        torch.testing.assert_close(r, x_ref, rtol=0, atol=0)
        torch.testing.assert_close(h, y_ref, rtol=2**-7, atol=2**-7)
    a, b = hidden.clone(), residual.clone()
    torch.ops.steering.bandwidth_reference_(a, b)
    assert torch.equal(a, residual) and torch.equal(b, hidden)
