"""The steered vLLM model against an independent HF implementation (forward hooks), every family, eager and
torch.compile, tensor parallel, prompts spanning several KV-cache blocks (DESIGN.md §2 and §5); the same engine
after a hot-swap (compiled graphs and every rank see the new vectors, the prefix cache is on); and, swapped to
zero vectors, against stock vLLM (no plugin) for the families test_engine_stock.py does not start apart."""

import os

import pytest
import torch
from engine_utils import (
    greedy,
    greedy_runs_in_subprocess,
    hf_reference,
    max_abs_diff,
    model_class_name,
    random_prompts,
    shutdown,
    start_engine,
)
from tiny_models import FAMILIES, HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE

from steering_vllm import SteeringVectors, update_steering

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PROMPT_LENGTH = 300  # > 2 blocks of 128 (vLLM CPU's block size); checked below
MAX_TOKENS = 12
# torch.compile (vLLM's default) costs ~35 s an engine here, so it runs for the families whose compiled graph differs
# most (MoE, Gemma's four norms a layer, gpt-oss's sinks, and Qwen2 from GGUF); Qwen3, Mistral and Gemma2 wire the
# same op the same way as a compiled sibling and run eager. Llama runs compiled in test_real_model_engine.py.
CASES = {
    # family, torch.compile, steered layers, file extension, steering_scale, tensor parallel size
    "qwen2-eager": ("qwen2", False, [0, 1, 3], ".safetensors", 1.0, 1),
    "llama-eager": ("llama", False, [0, 2, 3], ".safetensors", 1.0, 1),
    "qwen2-compiled-gguf": ("qwen2", True, [1, 2, 3], ".gguf", 0.5, 1),  # GGUF has no slot for layer 0
    "qwen3-eager": ("qwen3", False, [0, 1, 2, 3], ".safetensors", 1.0, 1),
    "qwen3_moe-compiled": ("qwen3_moe", True, [0, 1, 3], ".safetensors", 1.0, 1),
    "mistral-eager": ("mistral", False, [0, 1, 2, 3], ".safetensors", 1.0, 1),
    "gemma2-eager": ("gemma2", False, [0, 1, 2, 3], ".safetensors", 1.0, 1),
    "gemma3-compiled": ("gemma3", True, [0, 1, 3], ".safetensors", 1.0, 1),
    "gpt_oss-compiled": ("gpt_oss", True, [0, 1, 2, 3], ".safetensors", 1.0, 1),
    # two ranks, one core each (vLLM CPU binds one NUMA node per rank unless told otherwise)
    "llama-tp2-eager": ("llama", False, [0, 1, 2, 3], ".safetensors", 1.0, 2),
}


# cases whose engine, swapped to zero vectors, is also compared with stock vLLM: one engine per family serves
# both checks (test_engine_stock.py compares Qwen2 and Llama without vectors, eager)
STOCK_CASES = {"qwen2-compiled-gguf", "qwen3-eager", "qwen3_moe-compiled", "mistral-eager", "gemma2-eager",
               "gemma3-compiled", "gpt_oss-compiled"}  # fmt: skip

SWAPPED = SteeringVectors.from_tensor(
    torch.randn(NUM_LAYERS, HIDDEN_SIZE, generator=torch.Generator().manual_seed(3)) * 0.3
)


@pytest.fixture(scope="module")
def stock(tiny_model_dirs):
    """Stock vLLM's greedy output for each family in STOCK_CASES, all in one interpreter (VLLM_PLUGINS names the
    general plugins to load; '' loads none, so these are vLLM's own model classes)."""
    families = sorted({CASES[case][0] for case in STOCK_CASES})
    prompts = random_prompts(3, PROMPT_LENGTH, VOCAB_SIZE, seed=2)
    runs = [(tiny_model_dirs[family], prompts, MAX_TOKENS) for family in families]
    return dict(zip(families, greedy_runs_in_subprocess(runs, {"VLLM_PLUGINS": ""}, enforce_eager=True), strict=True))


@pytest.fixture(scope="module", params=list(CASES))
def run(request, tiny_model_dirs, tmp_path_factory, stock):
    family, compiled, layers, extension, scale, tp = CASES[request.param]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tp:
        pytest.skip(f"tensor parallel {tp} needs {tp} cores")
    g = torch.Generator().manual_seed(1)
    vectors = SteeringVectors.from_tensor(torch.randn(NUM_LAYERS, HIDDEN_SIZE, generator=g) * 0.3)
    vectors = vectors.select_layers(layers)
    path = vectors.save(tmp_path_factory.mktemp("vectors") / f"v{extension}")
    prompts = random_prompts(3, PROMPT_LENGTH, VOCAB_SIZE, seed=2)
    with pytest.MonkeyPatch.context() as patch:
        if tp > 1:
            patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(core) for core in cores[:tp]))
        llm = start_engine(
            tiny_model_dirs[family],
            enforce_eager=not compiled,
            additional_config={"steering_vectors": str(path), "steering_scale": scale},
            tensor_parallel_size=tp,
        )
        outputs = greedy(llm, prompts, MAX_TOKENS)
        config = llm.llm_engine.vllm_config
        info = {
            "class": model_class_name(llm),
            "block_size": config.cache_config.block_size,
            "prefix_caching": config.cache_config.enable_prefix_caching,
            "compile_mode": config.compilation_config.mode,
            "swap_hash": update_steering(llm, SWAPPED),  # the same prompts again: their blocks are cached
            "swapped_outputs": greedy(llm, prompts, MAX_TOKENS),
            "rank_tables": [SteeringVectors.from_bytes(t).to_tensor() for t in llm.collective_rpc("steering_table")],
        }
        if request.param in STOCK_CASES:
            update_steering(llm, SteeringVectors.zeros(NUM_LAYERS, HIDDEN_SIZE))
            info["zero_outputs"] = greedy(llm, prompts, MAX_TOKENS)
        shutdown(llm)
    model_dir = tiny_model_dirs[family]
    if request.param in STOCK_CASES:
        info["stock"] = stock[family]
    steered = hf_reference(model_dir, vectors.to_tensor() * scale, prompts, outputs)
    unsteered = hf_reference(model_dir, None, prompts, outputs)
    info["swapped_reference"] = hf_reference(model_dir, SWAPPED.to_tensor(), prompts, info["swapped_outputs"])
    return dict(family=family, compiled=compiled, tp=tp, outputs=outputs, steered=steered, unsteered=unsteered, **info)


# fp32 on both sides: measured at most 1.5e-6 (eager and compiled, every family, norm weights random)
LOGPROB_TOLERANCE = 1.5e-5
# fp32: measured at most 9.5e-7 between stock and unsteered, eager and compiled, and at most 1.4e-6 between stock
# engines run in-process (the reference, engine_utils.greedy_runs_in_subprocess) and in vLLM's processes
STOCK_TOLERANCE = 1e-5


def test_greedy_tokens_and_logprobs_match_hf_with_hooks(run):
    for output, reference in zip(run["outputs"], run["steered"], strict=True):
        assert output["tokens"] == reference["argmax"]
        assert max_abs_diff(output["logprobs"], reference["logprobs"]) < LOGPROB_TOLERANCE


def test_the_steered_class_served_the_engine(run):
    assert run["class"] == "Steered" + FAMILIES[run["family"]][1]  # e.g. SteeredQwen3MoeForCausalLM
    assert (run["compile_mode"] != 0) == run["compiled"]  # 0 = CompilationMode.NONE


def test_prompts_span_several_kv_blocks(run):
    assert PROMPT_LENGTH > 2 * run["block_size"]


def test_the_vectors_change_the_output(run):
    """Without this the parity above would prove nothing: the unsteered model must disagree."""
    diffs = [max_abs_diff(o["logprobs"], u["logprobs"]) for o, u in zip(run["outputs"], run["unsteered"], strict=True)]
    assert max(diffs) > 0.05


def test_after_a_hot_swap_every_rank_and_compiled_graph_serves_the_new_vectors(run):
    assert run["prefix_caching"], "the swap must be tested with vLLM's prefix cache on"
    assert run["swap_hash"] == SWAPPED.content_hash()
    assert len(run["rank_tables"]) == run["tp"]
    assert all(torch.equal(table, SWAPPED.to_tensor()) for table in run["rank_tables"])
    for output, reference in zip(run["swapped_outputs"], run["swapped_reference"], strict=True):
        assert output["tokens"] == reference["argmax"]
        assert max_abs_diff(output["logprobs"], reference["logprobs"]) < LOGPROB_TOLERANCE


def test_zero_vectors_give_stock_output(run):
    if "stock" not in run:
        pytest.skip("this family's stock comparison runs in another case or in test_engine_stock.py")
    assert run["stock"]["model_class"] == FAMILIES[run["family"]][1]  # vLLM's own class: really stock
    for ours, theirs in zip(run["zero_outputs"], run["stock"]["outputs"], strict=True):
        assert ours["tokens"] == theirs["tokens"]
        assert max_abs_diff(ours["logprobs"], theirs["logprobs"]) < STOCK_TOLERANCE
