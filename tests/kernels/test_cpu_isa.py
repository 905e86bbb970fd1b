"""Which C++ op variant is built and loaded: one library per x86 ISA, the best the CPU runs.

The op's correctness tests run on every variant this machine supports: the loaded one in this
process (tests/kernels/test_fused_add_steer_rms_norm.py), each other one in a child pytest,
since a process can load only one (they register the same ops).
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import cpu_isa, cpu_op

op_module = importlib.import_module("kernels.fused_add_steer_rms_norm")
OP_TESTS = Path(__file__).with_name("test_fused_add_steer_rms_norm.py")
REPO = Path(__file__).resolve().parents[2]

AVX2_ONLY = {"avx", "avx2", "fma", "f16c", "sse4_2"}  # an AMD EPYC of the Zen 2 kind
AVX512 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}


@pytest.mark.parametrize(
    "flags, expected",
    [(set(), "DEFAULT"), (AVX2_ONLY, "AVX2"), (AVX512, "AVX512"), (AVX512_BF16, "AVX512_BF16")],
    ids=["no-avx", "avx2", "avx512", "avx512-bf16"],
)
def test_choose_loads_the_best_variant_the_cpu_runs(flags, expected, monkeypatch):
    monkeypatch.setattr(cpu_isa.platform, "machine", lambda: "x86_64")
    assert cpu_isa.choose(cpu_isa.CAPABILITIES, flags=flags) == expected
    # an install built without the best one falls back to the next that runs
    assert cpu_isa.choose(("DEFAULT", "AVX2"), flags=flags) == ("DEFAULT" if expected == "DEFAULT" else "AVX2")


def test_choose_refuses_a_requested_variant_the_cpu_lacks_or_the_build_skipped(monkeypatch):
    monkeypatch.setattr(cpu_isa.platform, "machine", lambda: "x86_64")
    with pytest.raises(ImportError, match="this CPU does not support AVX512"):
        cpu_isa.choose(cpu_isa.CAPABILITIES, "AVX512", flags=AVX2_ONLY)
    with pytest.raises(ImportError, match=r"not built for AVX2 \(built: DEFAULT, AVX512\)"):
        cpu_isa.choose(("DEFAULT", "AVX512"), "avx2", flags=AVX512)
    with pytest.raises(ImportError, match="none of which this CPU supports"):
        cpu_isa.choose(("AVX512",), flags=AVX2_ONLY)
    with pytest.raises(ImportError, match="name one ISA"):
        cpu_isa.choose(cpu_isa.CAPABILITIES, "AVX2,AVX512", flags=AVX512)
    with pytest.raises(ValueError, match="AVX3 is not one of DEFAULT, AVX2, AVX512, AVX512_BF16"):
        cpu_isa.choose(cpu_isa.CAPABILITIES, "AVX3", flags=AVX512)
    assert cpu_isa.choose(cpu_isa.CAPABILITIES, "avx2", flags=AVX512_BF16) == "AVX2"  # AVX-512 CPUs run AVX2


def test_non_x86_cpus_build_and_run_portable_code_only(monkeypatch):
    monkeypatch.setattr(cpu_isa.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv(cpu_isa.ISA_VARIABLE, raising=False)
    assert cpu_isa.build_capabilities() == ("DEFAULT",)
    assert cpu_isa.choose(cpu_isa.CAPABILITIES, flags=AVX512_BF16) == "DEFAULT"


def test_build_variable_selects_the_variants_to_build(monkeypatch):
    monkeypatch.setattr(cpu_isa.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv(cpu_isa.ISA_VARIABLE, "avx512, AVX2")
    assert cpu_isa.build_capabilities() == ("AVX2", "AVX512")  # in CAPABILITIES order
    monkeypatch.delenv(cpu_isa.ISA_VARIABLE)
    assert cpu_isa.build_capabilities() == cpu_isa.CAPABILITIES


def test_the_loaded_library_is_the_chosen_variant():
    import torch

    requested = os.environ.get(cpu_isa.ISA_VARIABLE)
    assert op_module.CPU_CAPABILITY == cpu_isa.choose(cpu_op.built_capabilities(), requested)
    assert torch.ops.steering.cpu_capability() == op_module.CPU_CAPABILITY  # the C++ side says so too
    if requested is None and cpu_isa.supported("AVX2"):
        assert op_module.CPU_CAPABILITY != "DEFAULT"


def test_an_install_builds_every_variant_it_can():
    """setup.py's default: every ISA on x86-64, whatever the build CPU has (the README's setup builds so)."""
    if os.environ.get(cpu_isa.ISA_VARIABLE):
        pytest.skip(f"${cpu_isa.ISA_VARIABLE} is set: the build may have been asked for fewer variants")
    assert cpu_op.built_capabilities() == cpu_isa.build_capabilities()


def _other_variants():
    loaded = op_module.CPU_CAPABILITY
    return [c for c in cpu_isa.CAPABILITIES if c != loaded]


@pytest.mark.parametrize("capability", _other_variants())
def test_op_matches_reference_on_every_other_variant_this_cpu_runs(capability):
    """The C++ op's tests with kernels/_C_<capability> loaded, so an AVX2 bug cannot hide on an AVX-512 CPU."""
    if capability not in cpu_op.built_capabilities():
        pytest.skip(f"this install has no {capability} build (built: {', '.join(cpu_op.built_capabilities())})")
    if not cpu_isa.supported(capability):
        pytest.skip(f"this CPU does not run {capability}")
    env = {**os.environ, cpu_isa.ISA_VARIABLE: capability}
    # the Triton tests do not touch the C++ op; the 8.6 GB int64-offset test runs on the loaded variant only
    selection = "not triton and not int64"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selection, str(OP_TESTS)]
    command += [f"{Path(__file__)}::test_the_loaded_library_is_the_chosen_variant"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"{capability}: {summary}\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert " passed" in summary and "failed" not in summary, summary
