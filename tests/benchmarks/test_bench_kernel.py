"""The kernel benchmark measures what it says: cold pools really exceed the cache, every set is used, and the
in-place contenders (eager and compiled) compute the op, so a ratio against them compares equal work; a run records
its two tables, a row per ISA and case, under names of their own for one ISA or other shapes."""

import itertools

import pytest
import torch

from benchmarks import bench_kernel, results
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


def _cells(name: str, row: int = 0) -> dict:
    """{header: cell} of a row of the recorded table ``name``."""
    lines = results.markdown(results.load(name)).splitlines()
    header, cells = (line.split("|")[1:-1] for line in (lines[0], lines[2 + row]))
    return dict(zip([c.strip() for c in header], [c.strip() for c in cells], strict=True))


def _results(isa: str, args, with_vllm: bool = True) -> dict:
    """What run_isa returns for ``args``' rows, with made-up times."""
    results_ = {"isa": isa, "threads": 2, "forward": [], "backward": []}
    for kind, names in (("forward", bench_kernel.FORWARD), ("backward", bench_kernel.BACKWARD)):
        for dtype, d, T, cache in itertools.product(args.dtypes, args.hidden, args.tokens, args.cache):
            times = {n: (i + 1) * 1e-6 if with_vllm or "vllm" not in n and n != "naive" else None
                     for i, n in enumerate(names)}  # fmt: skip
            results_[kind].append({"cache": cache, "dtype": dtype, "T": T, "d": d, **times})
    return results_


def test_the_tables_divide_each_contender_by_ours_and_the_a_a_control_by_vllm():
    forward = {"cache": "cold", "dtype": "float32", "T": 16, "d": 1536, "ours": 2e-6, "vllm": 3e-6, "naive": 4e-6}
    forward |= {"eager": 5e-6, "compiled": 6e-6, "ref": 1e-6, "vllm_again": 3.3e-6}
    backward = {"cache": "cold", "dtype": "float32", "T": 16, "d": 1536, "ours": 4e-6, "eager": 8e-6}
    backward |= {"compiled": 6e-6, "ref": 2e-6}
    args, parser = bench_kernel.arguments([])
    run = {"isa": "AVX2", "threads": 2, "forward": [forward], "backward": [backward]}
    (forward_name, _), (backward_name, _) = bench_kernel.record_tables([run], args, parser)
    assert (forward_name, backward_name) == ("kernel_cpu_forward", "kernel_cpu_backward")
    cells = _cells(forward_name)
    assert cells["of ref"] == "0.50" and cells["vs compiled"] == "3.00" and cells["vs eager"] == "2.50"
    assert cells["vs naive"] == "2.00" and cells["vs vllm"] == "1.50"
    assert cells["vllm A/A"] == "1.10"  # vllm_again / vllm, not / ours
    assert cells["ours µs"] == "2.0" and cells["ours GB/s"] == f"{4 * 16 * 1536 * 4 / 2e-6 / 1e9:.1f}"
    cells = _cells(backward_name)
    assert cells["of ref"] == "0.38" and cells["vs eager"] == "2.00" and cells["vs compiled"] == "1.50"  # 0.75 x 2/4
    assert cells["ours GB/s"] == f"{3 * 16 * 1536 * 4 / 4e-6 / 1e9:.1f}"
    assert results.load(forward_name)["rows"][0]["seconds"]["vllm_again"] == 3.3e-6  # every contender's time kept


def test_a_run_records_both_tables_a_row_per_isa_and_case():
    argv = ["--tokens", "16", "512", "--hidden", "1536", "--dtypes", "bfloat16", "float32", "--samples", "3"]
    args, parser = bench_kernel.arguments(argv)
    runs = [_results("AVX2", args), _results("DEFAULT", args, with_vllm=False)]
    made = bench_kernel.record_tables(runs, args, parser)
    assert [name for name, _ in made] == ["kernel_cpu_forward_tokens16-512_hidden1536",
                                          "kernel_cpu_backward_tokens16-512_hidden1536"]  # fmt: skip
    cases = 2 * 2 * 1 * 2  # T x dtype x d x cache
    for (name, title), columns in zip(made, (bench_kernel.FORWARD_COLUMNS, bench_kernel.BACKWARD_COLUMNS), strict=True):
        recorded = results.load(name)
        assert [tuple(c) for c in recorded["columns"]] == columns and recorded["title"] == title
        assert len(recorded["rows"]) == 2 * cases and "medians of 3 samples" in title
        assert [r["isa"] for r in recorded["rows"]] == ["AVX2"] * cases + ["DEFAULT"] * cases
    assert _cells(made[0][0], cases)["vs vllm"] == "-"  # no vLLM library for DEFAULT


@pytest.mark.parametrize(
    "argv, name",
    [([], "kernel_cpu_forward"), (["--repeats", "3", "--samples", "5"], "kernel_cpu_forward"),
     (["--isa", "avx2"], "kernel_cpu_forward_isaAVX2"), (["--quick"], "kernel_cpu_forward_tokens16-4096_hidden3584"),
     (["--cache", "cold"], "kernel_cpu_forward_cachecold")],
)  # fmt: skip
def test_a_run_of_other_isas_or_shapes_than_the_docs_table_has_a_name_of_its_own(argv, name):
    args, parser = bench_kernel.arguments(argv)
    ((forward, _), _) = bench_kernel.record_tables([_results("AVX2", args)], args, parser)
    assert forward == name


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


def test_the_summary_gives_each_groups_smallest_median_and_largest_ratio_and_the_rows_meeting_the_target():
    from benchmarks import kernel_summary

    def row(isa, dtype, T, cache, vs_vllm):
        return {"isa": isa, "dtype": dtype, "T": T, "cache": cache, "vs_vllm": vs_vllm, "vllm_a_a": 1.0,
                "of_ref": 0.9, "vs_naive": 1.5}  # fmt: skip

    forward = [row("AVX2", "bfloat16", 512, "hot", 1.2), row("AVX2", "bfloat16", 4096, "hot", 1.05),
               row("AVX512", "bfloat16", 512, "hot", 1.4), row("AVX512", "bfloat16", 16, "hot", None)]  # fmt: skip
    backward = [{"isa": "AVX2", "vs_compiled": 3.0, "vs_eager": 9.0}, {"isa": "AVX512", "vs_compiled": 5.0,
                                                                        "vs_eager": 20.0}]  # fmt: skip
    rows = kernel_summary.summary_rows(forward, backward)
    groups = len(kernel_summary.GROUPS)
    assert [r["isa"] for r in rows[:groups]] == ["all"] * groups  # group i's row over every ISA is row i
    assert [r["rows"] for r in rows[:groups]] == [what for what, *_ in kernel_summary.GROUPS]
    cached = [r for r in rows if r["rows"] == "bf16, T >= 512, rows in cache"]
    assert [r["isa"] for r in cached] == ["all", "AVX2", "AVX512"]
    assert (cached[1]["min"], cached[1]["max"], cached[1]["meeting"]) == (1.05, 1.2, "1 of 2")
    assert (cached[0]["min"], cached[0]["median"], cached[0]["max"], cached[0]["meeting"]) == (1.05, 1.2, 1.4, "2 of 3")
    small = [r for r in rows if r["rows"] == "bf16, T = 16"]  # no vLLM time there: only the (empty) all row
    assert len(small) == 1 and small[0]["median"] is None and small[0]["meeting"] == "0 of 0"
    compiled = [r for r in rows if r["ratio"] == "vs compiled"]
    assert [(r["isa"], r["median"]) for r in compiled] == [("all", 4.0), ("AVX2", 3.0), ("AVX512", 5.0)]
