import hashlib
import os
import random
import sys

import pytest
import torch

# Triton decides at decoration time (when kernels/ is imported) whether to
# interpret; without a GPU the Triton kernels run under its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Fresh random inputs each run; the seed is printed so a failure can be replayed
# with STEERING_TEST_SEED=<seed>.
SESSION_SEED = int(os.environ.get("STEERING_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"steering-vllm test seed: {SESSION_SEED} (replay with STEERING_TEST_SEED={SESSION_SEED})"


@pytest.fixture(autouse=True)
def _seed(request):
    digest = hashlib.sha256(f"{SESSION_SEED}:{request.node.nodeid}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little"))


# Shared test helpers (tests/helpers/) are imported by test modules as plain modules. Only that folder goes
# on sys.path: tests/ itself holds folders named like the packages, which would shadow them.
sys.path.append(os.path.join(os.path.dirname(__file__), "helpers"))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """{'qwen2': path, 'llama': path, ...}: a tiny random checkpoint of each steered family, built once per session."""
    from tiny_models import FAMILIES, build_tiny_model

    return {family: build_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family) for family in FAMILIES}


@pytest.fixture(scope="session")
def real_fixture():
    """The real-model fixture (``python -m trainer.real_model``: SmolLM2-135M-Instruct, GSM8K, AIME 2025), built
    once into its cache; skipped, with the reason, where its two PyPI packages are not installed."""
    from trainer.real_model import build

    try:
        return build()
    except FileNotFoundError as e:
        pytest.skip(f"real-model fixture: {e}")
