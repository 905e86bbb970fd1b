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


def test_render_divides_each_contender_by_ours_and_the_a_a_control_by_vllm():
    forward = {"cache": "cold", "dtype": "float32", "T": 16, "d": 1536, "ours": 2e-6, "vllm": 3e-6, "naive": 4e-6}
    forward |= {"eager": 5e-6, "compiled": 6e-6, "ref": 1e-6, "vllm_again": 3.3e-6}
    backward = {"cache": "cold", "dtype": "float32", "T": 16, "d": 1536, "ours": 4e-6, "eager": 8e-6}
    backward |= {"compiled": 6e-6, "ref": 2e-6}
    table = bench_kernel.render([{"isa": "AVX2", "forward": [forward], "backward": [backward]}])
    lines = table.splitlines()
    header = next(line for line in lines if "vllm A/A" in line)
    row = lines[lines.index(header) + 2]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")], strict=True))
    assert cells["of ref"] == "0.50" and cells["vs compiled"] == "3.00" and cells["vs eager"] == "2.50"
    assert cells["vs naive"] == "2.00" and cells["vs vllm"] == "1.50"
    assert cells["vllm A/A"] == "1.10"  # vllm_again / vllm, not / ours
    assert cells["ours GB/s"] == f"{4 * 16 * 1536 * 4 / 2e-6 / 1e9:.1f}"


def test_runs_merge_into_each_contenders_median_per_row():
    def run(ours, vllm):
        row = {"cache": "hot", "dtype": "bfloat16", "T": 16, "d": 64, "ours": ours, "vllm": vllm, "naive": None}
        return {"isa": "AVX2", "threads": 2, "forward": [row], "backward": [dict(row, T=512)]}

    merged = bench_kernel.median_of_runs([run(1.0, 2.0), run(5.0, 4.0), run(3.0, 9.0)])
    assert merged["isa"] == "AVX2" and merged["threads"] == 2
    for kind, T in (("forward", 16), ("backward", 512)):
        (row,) = merged[kind]
        assert row["ours"] == 3.0 and row["vllm"] == 4.0  # per contender, not the run whose ours is the median
        assert row["naive"] is None and row["T"] == T and row["cache"] == "hot"
