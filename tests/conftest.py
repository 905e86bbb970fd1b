import hashlib
import os
import random
import sys
import time

import pytest
import torch

# Triton decides at decoration time (when kernels/ is imported) whether to
# interpret; without a GPU the Triton kernels run under its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Fresh random inputs each run; the seed is printed so a failure can be replayed
# with STEERING_TEST_SEED=<seed>.
SESSION_SEED = int(os.environ.get("STEERING_TEST_SEED", random.SystemRandom().randrange(2**31)))
# Test workers (pytest -n) and subprocesses inherit it: one seed for the whole run.
os.environ["STEERING_TEST_SEED"] = str(SESSION_SEED)


def pytest_report_header(config):
    return f"steering-vllm test seed: {SESSION_SEED} (replay with STEERING_TEST_SEED={SESSION_SEED})"


# With `pytest -n 2` (pytest-xdist, --dist loadfile in pyproject.toml) each module runs whole on one worker, and the
# workers take modules in collection order: the longest first keeps both busy to the end. Module times measured
# on 2 cores, longest first; modules not named here follow in their usual order.
LONGEST_FIRST = [
    "steering_vllm/test_engine_parity.py", "trainer/test_rloo_e2e.py", "steering_vllm/test_engine_stock.py",
    "steering_vllm/test_shutdown.py", "steering_vllm/test_scale_out.py", "trainer/test_toy_fixture.py",
    "steering_vllm/test_per_request.py", "trainer/test_baselines.py", "trainer/test_eval.py",
    "steering_vllm/test_real_model_engine.py", "trainer/test_real_model_training.py", "steering_vllm/test_serve.py",
    "steering_vllm/test_hot_swap.py", "steering_vllm/test_serve_under_load.py", "steering_vllm/test_hot_swap_async.py",
    "steering_vllm/test_endpoint_sets.py", "steering_vllm/test_endpoint.py", "trainer/test_eval_vectors.py",
]  # fmt: skip


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {f"tests/{name}": i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: a module keeps its order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """``STEERING_TEST_TIMELINE=FILE``: each test's worker, start and end appended to FILE, to see how the workers
    share a run (``python scripts/test_timeline.py FILE``)."""
    start = time.time()
    yield
    if path := os.environ.get("STEERING_TEST_TIMELINE"):
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(path, "a") as timeline:
            timeline.write(f"{worker}\t{item.nodeid}\t{start:.1f}\t{time.time():.1f}\n")


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
