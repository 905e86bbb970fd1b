"""Without vectors the steered model serves what stock vLLM serves (with all-zero vectors too: every family's
parity engine swapped to zeros, in test_engine_parity.py); bad vectors stop the engine before it starts, with the
file and the problem in the error."""

import pytest
import torch
from engine_utils import (
    ENGINE_KWARGS,
    greedy,
    greedy_runs_in_subprocess,
    max_abs_diff,
    model_class_name,
    random_prompts,
    shutdown,
    start_engine,
)
from tiny_models import FAMILIES as TINY_FAMILIES
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE

from steering_vllm import SteeringVectors, SteeringVectorsError

pytestmark = [pytest.mark.engine, pytest.mark.slow]

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(3, 200, VOCAB_SIZE, seed=3)


# Qwen2 and Llama here, without the option; every family (Qwen2 compiled included) is also compared with stock in
# test_engine_parity.py, by its parity engine swapped to zero vectors (each engine costs 20-45 s)
FAMILIES = ("qwen2", "llama")
STOCK_CLASS = {family: model_class for family, (_, model_class, _) in TINY_FAMILIES.items()}
# fp32: measured at most 9.5e-7 between stock and unsteered, eager and compiled, and at most 1.4e-6 between stock
# engines run in-process (the reference, engine_utils.greedy_runs_in_subprocess) and in vLLM's processes
LOGPROB_TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def stock_runs(tiny_model_dirs, prompts):
    # VLLM_PLUGINS names the general plugins to load; '' loads none, so these are vLLM's own model classes.
    runs = [(tiny_model_dirs[family], prompts, MAX_TOKENS) for family in FAMILIES]
    return dict(zip(FAMILIES, greedy_runs_in_subprocess(runs, {"VLLM_PLUGINS": ""}, enforce_eager=True), strict=True))


@pytest.fixture(scope="module")
def stock(stock_runs, family):
    return stock_runs[family]


@pytest.fixture(scope="module")
def steered_runs(tiny_model_dirs, prompts, family):
    """The plugin's model class started without the option (no vectors at all), eager."""
    llm = start_engine(tiny_model_dirs[family], enforce_eager=True)
    runs = {"absent": {"class": model_class_name(llm), "outputs": greedy(llm, prompts, MAX_TOKENS)}}
    shutdown(llm)
    return runs


def test_stock_run_really_is_stock(stock, family):
    assert stock["model_class"] == STOCK_CLASS[family]


def test_no_steering_gives_stock_output(stock, steered_runs, family):
    assert steered_runs
    for run in steered_runs.values():
        assert run["class"] == "Steered" + STOCK_CLASS[family]
        for ours, theirs in zip(run["outputs"], stock["outputs"], strict=True):
            assert ours["tokens"] == theirs["tokens"]
            assert max_abs_diff(ours["logprobs"], theirs["logprobs"]) < LOGPROB_TOLERANCE


def _bad_vectors(tmp_path, num_layers, hidden_size):
    return str(SteeringVectors.from_tensor(torch.randn(num_layers, hidden_size)).save(tmp_path / "bad.safetensors"))


@pytest.mark.parametrize(
    "num_layers, hidden_size, message",
    [
        (NUM_LAYERS, 64, rf"bad\.safetensors: hidden_size 64 does not match the model's {HIDDEN_SIZE}"),
        (NUM_LAYERS + 2, HIDDEN_SIZE, rf"bad\.safetensors: num_layers {NUM_LAYERS + 2} does not match the model's"),
    ],
)
def test_vectors_that_do_not_fit_stop_the_engine_before_it_starts(
    tiny_model_dirs, tmp_path, num_layers, hidden_size, message
):
    from vllm import LLM

    with pytest.raises(SteeringVectorsError, match=message):
        LLM(
            str(tiny_model_dirs["qwen2"]),
            **ENGINE_KWARGS,
            additional_config={"steering_vectors": _bad_vectors(tmp_path, num_layers, hidden_size)},
        )


def test_misspelt_option_is_an_error(tiny_model_dirs):
    from vllm import LLM

    with pytest.raises(ValueError, match=r"unknown steering option\(s\) \['steering_vector'\]"):
        LLM(str(tiny_model_dirs["qwen2"]), **ENGINE_KWARGS, additional_config={"steering_vector": "v.safetensors"})
