"""Per-request steering in the real engine (``vllm.LLM``; eager, compiled, tensor parallel 2; prefix cache on):
named sets side by side, chosen per request in one batch, each request served exactly what the HF-hooks
reference gives under the vectors it chose; the prefix cache shared within a configuration and never across;
sets added, replaced and removed at run time; bad choices and too many configurations refused without harm."""

import os

import pytest
import torch
from engine_utils import hf_reference, max_abs_diff, random_prompts, shutdown, start_engine
from tiny_models import HIDDEN_SIZE, NUM_LAYERS, VOCAB_SIZE

from steering_vllm import SteeringVectors, SteeringVectorsError, remove_steering, update_steering

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PROMPT_LENGTH = 300  # two full KV blocks of 128 are cached, and reused by a later request with the same vectors
MAX_TOKENS = 8
MAX_CONFIGS = 4
PHASE_TOKENS = 96  # 300 + 96 tokens fill a third KV block, whose last 84 positions were generated
EXTEND = 90  # a later prompt: the first one plus 90 of its generated tokens, three full blocks
TOLERANCE = 1e-5  # engine vs reference logprobs; measured <= 1e-6 (fp32)


def _vectors(seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors.from_tensor(torch.randn(NUM_LAYERS, HIDDEN_SIZE, generator=g) * scale)


A, B, DEFAULT, C = _vectors(20), _vectors(21), _vectors(22), _vectors(23)
A2 = _vectors(24)  # what set "a" is replaced with
IBM = _vectors(26).select_layers([1, 2, 3])  # as IBM activation-steering saves it: directions[i] at block i's input


def _ibm_svec(path):
    """IBM activation-steering's ``SteeringVector.save`` JSON (``{"model_type", "directions", ...}``): its
    ``directions[i]`` is added at block i's input, i.e. our ``layers.{i-1}``."""
    import json

    directions = {str(layer): vector.tolist() for layer, vector in IBM.vectors.items()}
    path.write_text(json.dumps({"model_type": "qwen2", "directions": directions, "explained_variances": {}}))
    return str(path)


def _generate(llm, prompts, choices, max_tokens=MAX_TOKENS):
    """One ``generate`` call: prompt i with ``extra_args`` choices[i]; tokens, logprobs and cached tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [
        SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True, extra_args=choice)
        for choice in choices
    ]
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    results = []
    for output in llm.generate(requests, params, use_tqdm=False):
        completion = output.outputs[0]
        logprobs = [e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs, strict=True)]
        results.append({"tokens": list(completion.token_ids), "logprobs": logprobs, "cached": output.num_cached_tokens})
    return results


@pytest.fixture(scope="module", params=["compiled", "eager", "tp2-eager"])
def served(request, tiny_model_dirs, tmp_path_factory):
    tp = 2 if request.param.startswith("tp2") else 1
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tp:
        pytest.skip(f"tensor parallel {tp} needs {tp} cores")
    directory = tmp_path_factory.mktemp("sets")
    model_dir = tiny_model_dirs["qwen2"]
    monkeypatch = pytest.MonkeyPatch()
    if tp > 1:  # two ranks, one core each
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(core) for core in cores[:tp]))
    llm = start_engine(
        model_dir,
        enforce_eager=request.param != "compiled",
        tensor_parallel_size=tp,
        additional_config={
            "steering_vectors": str(DEFAULT.save(directory / "default.safetensors")),
            "steering_sets": {
                "a": str(A.save(directory / "a.safetensors")),
                "b": str(B.save(directory / "b.safetensors")),
                "ibm": _ibm_svec(directory / "behavior.svec"),
            },
            "max_steering_configs": MAX_CONFIGS,
        },
    )
    config = llm.llm_engine.vllm_config
    prompts = random_prompts(3, PROMPT_LENGTH, VOCAB_SIZE, seed=25)
    p = prompts[0]
    run = {"mode": config.compilation_config.mode, "prefix_caching": config.cache_config.enable_prefix_caching}
    run["block_size"] = config.cache_config.block_size
    # One batch, five configurations (four non-zero, the limit) and the same prompt under several of them.
    run["mixed_choices"] = [
        {"steering": "a"},
        {"steering": "b"},
        {"steering": "none"},
        None,  # the default set
        {"steering": ["a", "b"], "steering_scale": [1.0, -0.5]},
        {"steering": "a"},
        {"steering": "b"},
    ]
    run["mixed_prompts"] = [p, p, p, p, p, prompts[1], prompts[2]]
    run["mixed_tables"] = [
        A.to_tensor(),
        B.to_tensor(),
        None,
        DEFAULT.to_tensor(),
        A.to_tensor() - 0.5 * B.to_tensor(),
        A.to_tensor(),
        B.to_tensor(),
    ]
    run["mixed"] = _generate(llm, run["mixed_prompts"], run["mixed_choices"])
    # The same prompt again, one configuration at a time: cache hits only within a configuration.
    run["again_a"] = _generate(llm, [p], [{"steering": "a"}])[0]
    run["b_scaled"] = _generate(llm, [p], [{"steering": "b", "steering_scale": 0.5}])[0]  # new configuration
    # Phases: "a" at the generated tokens only and at the prompt only, beside "b" everywhere, in one batch; then the
    # same prompt again, and a prompt that is the first plus part of its generation (same vectors, same phase).
    phase_choices = [{"steering": "a", "steering_phase": "generation"}, {"steering": "a", "steering_phase": "prompt"},
                     {"steering": "b", "steering_phase": "all"}]  # fmt: skip
    run["phases"] = _generate(llm, [p, p, p], phase_choices, max_tokens=PHASE_TOKENS)
    run["phase_again"] = _generate(llm, [p], phase_choices[:1])[0]
    run["extended_prompt"] = p + run["phases"][0]["tokens"][:EXTEND]
    run["phase_extended"] = _generate(llm, [run["extended_prompt"]], phase_choices[:1])[0]
    run["ibm"] = _generate(llm, [p], [{"steering": "ibm"}])[0]  # another library's file as a set
    # Replace "a", add "c", remove "b"; then the same prompt under each.
    run["hashes"] = [update_steering(llm, A2, name="a"), update_steering(llm, C, name="c")]
    remove_steering(llm, "b")
    run["after"] = _generate(llm, [p, p], [{"steering": "a"}, {"steering": "c"}])
    run["errors"] = {}
    for label, choice in {
        "unknown": {"steering": "b"},
        "malformed": {"steering": "a/../b"},
        "scale": {"steering": "a", "steering_scale": float("inf")},
        "count": {"steering": ["a", "c"], "steering_scale": [1.0]},
    }.items():
        with pytest.raises(ValueError) as error:
            _generate(llm, [p], [choice])
        run["errors"][label] = str(error.value)
    too_many = [{"steering": "a", "steering_scale": 1.0 + i / 10} for i in range(MAX_CONFIGS + 1)]
    with pytest.raises(RuntimeError) as error:
        _generate(llm, [p] * len(too_many), too_many)
    run["errors"]["too_many"] = str(error.value)
    with pytest.raises(SteeringVectorsError) as error:
        update_steering(llm, SteeringVectors.zeros(NUM_LAYERS, 64), name="d")
    run["errors"]["shape"] = str(error.value)
    run["after_errors"] = _generate(llm, [p], [{"steering": "c"}])[0]
    run["status"] = llm.collective_rpc("steering_rows_status")
    shutdown(llm)
    monkeypatch.undo()
    run["model_dir"] = model_dir
    return run


def _reference(model_dir, table, prompt, generation, phase="all"):
    return hf_reference(model_dir, table, [prompt], [generation], phase)[0]


def _assert_served(run, output, table, prompt, phase="all"):
    reference = _reference(run["model_dir"], table, prompt, output, phase)
    assert output["tokens"] == reference["argmax"]
    assert max_abs_diff(output["logprobs"], reference["logprobs"]) < TOLERANCE


def test_each_request_in_a_mixed_batch_gets_the_vectors_it_chose(served):
    assert served["prefix_caching"] and PROMPT_LENGTH >= 2 * served["block_size"]
    for output, table, prompt in zip(served["mixed"], served["mixed_tables"], served["mixed_prompts"], strict=True):
        _assert_served(served, output, table, prompt)
    first = served["mixed"][:5]  # one prompt under five configurations: they really differ
    for i, x in enumerate(first):
        for y in first[i + 1 :]:
            assert x["tokens"] != y["tokens"] or max_abs_diff(x["logprobs"], y["logprobs"]) > 1e-2


def test_the_prefix_cache_is_shared_within_a_configuration_and_never_across(served):
    assert served["again_a"]["cached"] >= 2 * served["block_size"]  # same prompt, same vectors: reused
    _assert_served(served, served["again_a"], A.to_tensor(), served["mixed_prompts"][0])
    assert served["b_scaled"]["cached"] == 0  # same prompt, new vectors: computed afresh
    _assert_served(served, served["b_scaled"], 0.5 * B.to_tensor(), served["mixed_prompts"][0])


def test_a_phase_steers_only_the_prompt_or_only_the_generated_tokens(served):
    prompt = served["mixed_prompts"][0]
    generation, prompt_only, everywhere = served["phases"]
    _assert_served(served, generation, A.to_tensor(), prompt, "generation")
    _assert_served(served, prompt_only, A.to_tensor(), prompt, "prompt")
    _assert_served(served, everywhere, B.to_tensor(), prompt)
    for phase, output in [("all", generation), ("prompt", generation), ("all", prompt_only)]:  # the phases matter
        wrong = _reference(served["model_dir"], A.to_tensor(), prompt, output, phase)
        assert max_abs_diff(output["logprobs"], wrong["logprobs"]) > 1e-2, phase


def test_the_prefix_cache_is_shared_within_a_phase_and_never_across_a_phase_boundary(served):
    """The same prompt, vectors and phase again reuse the cached prompt blocks. A prompt that is the first one
    plus 90 of its generated tokens must not reuse the third block: there its last 84 positions were steered as
    generation, here they are prompt (vLLM caches generated tokens' blocks too): computed afresh, and right."""
    again, extended = served["phase_again"], served["phase_extended"]
    assert again["cached"] >= 2 * served["block_size"]
    _assert_served(served, again, A.to_tensor(), served["mixed_prompts"][0], "generation")
    assert len(served["extended_prompt"]) >= 3 * served["block_size"]
    assert extended["cached"] == 0
    _assert_served(served, extended, A.to_tensor(), served["extended_prompt"], "generation")


def test_another_librarys_file_is_served_where_that_library_adds_its_vectors(served):
    table = torch.zeros(NUM_LAYERS, HIDDEN_SIZE)
    for layer, vector in IBM.vectors.items():  # block i's input is block i-1's output
        table[layer - 1] = vector
    _assert_served(served, served["ibm"], table, served["mixed_prompts"][0])


def test_sets_are_replaced_added_and_removed_at_run_time(served):
    assert served["hashes"] == [A2.content_hash(), C.content_hash()]
    prompt = served["mixed_prompts"][0]
    after_a, after_c = served["after"]
    assert after_a["cached"] == 0  # the old version's blocks are not served to the new "a"
    _assert_served(served, after_a, A2.to_tensor(), prompt)
    _assert_served(served, after_c, C.to_tensor(), prompt)


def test_bad_choices_are_refused_before_scheduling_and_change_nothing(served):
    errors = served["errors"]
    assert "unknown steering set 'b' (sets: a, c, ibm)" in errors["unknown"]
    assert "'a/../b' is malformed" in errors["malformed"]
    assert "finite number" in errors["scale"]
    assert "list of 2 numbers" in errors["count"]
    assert f"all {MAX_CONFIGS} (max_steering_configs) are taken" in errors["too_many"]
    assert "hidden_size 64 does not match" in errors["shape"]
    _assert_served(served, served["after_errors"], C.to_tensor(), served["mixed_prompts"][0])


def test_every_row_holds_exactly_its_configurations_vectors_on_every_rank(served):
    first, *others = served["status"]
    assert first["rows"]
    for entry in first["rows"].values():
        assert entry["buffer_hash"] == entry["content_hash"]
        assert entry["requests"] == 0  # nothing is running now
    assert all(status == first for status in others)  # tensor-parallel ranks agree on every row


def test_the_runner_in_use_calls_the_forward_the_plugin_hooked(served):
    """Rows are assigned in a hook on vLLM's V1 model runner, which the plugin selects: under any other runner no
    batch would pass through the hook (and every request would read row 0)."""
    for status in served["status"]:
        assert status["runner"] in ("GPUModelRunner", "CPUModelRunner")
        assert status["forwards"] >= MAX_TOKENS
