"""Per-request steering's books, without an engine: what a choice resolves to, which choices are refused,
how the prefix cache is salted, and how configurations are admitted and released."""

import pytest
import torch

from steering_vllm import SteeringVectors
from steering_vllm.config import per_request_options
from steering_vllm.per_request.sets import SteeringRowsExhausted, SteeringSets, parse_choice, parse_phase, salted

L, D = 3, 8


def _vectors(seed):
    return SteeringVectors.from_tensor(torch.randn(L, D, generator=torch.Generator().manual_seed(seed)))


A, B = _vectors(1), _vectors(2)


@pytest.fixture
def sets():
    sets = SteeringSets(L, D, max_configs=2)
    sets.put("a", A)
    sets.put("b", B)
    return sets


def test_a_choice_resolves_to_the_weighted_sum_of_its_sets(sets):
    assert torch.equal(sets.resolve({"steering": "a"}).table, A.to_tensor())
    assert torch.allclose(sets.resolve({"steering": "a", "steering_scale": 0.5}).table, 0.5 * A.to_tensor())
    mixed = sets.resolve({"steering": ["a", "b"], "steering_scale": [1.0, -0.5]}).table
    assert torch.allclose(mixed, A.to_tensor() - 0.5 * B.to_tensor(), atol=1e-6)
    assert sets.resolve({"steering": "none"}).is_zero
    assert sets.resolve(None).is_zero and sets.resolve({"other": 1}).is_zero  # no default given: zeros


def test_equal_vectors_share_a_configuration_whatever_the_names(sets):
    sets.put("a-copy", SteeringVectors.from_tensor(A.to_tensor()))
    assert sets.resolve({"steering": "a"}).content_hash == sets.resolve({"steering": "a-copy"}).content_hash
    assert sets.resolve({"steering": "a"}).content_hash != sets.resolve({"steering": "b"}).content_hash
    doubled = sets.resolve({"steering": ["a", "a-copy"]}).content_hash
    assert doubled == sets.resolve({"steering": "a", "steering_scale": 2.0}).content_hash


def test_the_default_set_is_what_a_request_without_a_choice_gets(sets):
    sets.put(None, B)
    assert sets.resolve({}).content_hash == sets.resolve({"steering": "b"}).content_hash
    assert sets.resolve({"steering": "none"}).is_zero


@pytest.mark.parametrize(
    "extra_args, message",
    [
        ({"steering": "c"}, r"unknown steering set 'c' \(sets: a, b\)"),
        ({"steering": "no/slash"}, "malformed"),
        ({"steering": ""}, "malformed"),
        ({"steering": 3}, "must be a set name or a non-empty list"),
        ({"steering": []}, "must be a set name or a non-empty list"),
        ({"steering": "a", "steering_scale": float("nan")}, "finite number"),
        ({"steering": "a", "steering_scale": "2"}, "finite number"),
        ({"steering": "a", "steering_scale": [1.0]}, "must be one number"),
        ({"steering": ["a", "b"], "steering_scale": [1.0]}, "list of 2 numbers"),
        ({"steering": ["a", "none"]}, "reserved"),
        ({"steering_scale": 2.0}, "without 'steering'"),
        ({"steering": "a", "steering_scale": 1e300}, "overflows float32"),
        ({"steering": "a", "steering_scale": 10**400}, "finite number"),  # an int beyond float's range
        ({"steering": "none", "steering_scale": "x"}, "finite number"),
        ({"steering": ["a", "b", "a"]}, "names a set more than once"),
        ({"steering": "a\n"}, "malformed"),
    ],
)
def test_bad_choices_are_refused_with_a_message_naming_the_problem(sets, extra_args, message):
    with pytest.raises(ValueError, match=message):
        sets.resolve(extra_args)


def test_a_sum_that_overflows_float32_is_refused(sets):
    sets.put("large", SteeringVectors.from_tensor(torch.full((L, D), 5e18)))  # D x (5e18)^2 = 2e38: still finite
    with pytest.raises(ValueError, match="overflows float32"):  # 5e18 x 1e30 is not a float32
        sets.resolve({"steering": "large", "steering_scale": 1e30})
    sets.put("large2", SteeringVectors.from_tensor(torch.full((L, D), 5e18)))
    with pytest.raises(ValueError, match="too large"):  # the sum's squares overflow: the norm's variance would too
        sets.resolve({"steering": ["large", "large2"]})


def test_replacing_or_removing_a_set_changes_what_new_choices_resolve_to(sets):
    before = sets.resolve({"steering": "a"})
    sets.put("a", B)
    assert sets.resolve({"steering": "a"}).content_hash == B.content_hash()
    assert before.content_hash == A.content_hash()  # what an admitted request holds is its own
    sets.remove("a")
    with pytest.raises(ValueError, match="unknown steering set 'a'"):
        sets.resolve({"steering": "a"})
    with pytest.raises(KeyError, match="no steering set named 'a'"):
        sets.remove("a")


def test_sets_of_another_shape_and_bad_names_are_refused(sets):
    with pytest.raises(ValueError, match="hidden_size 4 does not match the model's 8"):
        sets.put("c", SteeringVectors.zeros(L, 4))
    for name in ("none", "a b", ""):
        with pytest.raises(ValueError, match="reserved|malformed"):
            sets.put(name, A)


def test_the_salt_keys_the_cache_by_configuration_and_keeps_the_users_salt():
    assert salted("abc", None) == "steering:abc"
    assert salted("abc", "tenant-1") == "steering:abc|tenant-1"
    assert salted("abc", "t") != salted("abd", "t")


def test_a_phase_keys_the_cache_with_the_prompts_length_and_is_checked():
    """A phase-limited request's blocks depend on where its steered positions start: the salt holds the phase and
    the prompt's length (another request's prompt may be this one's prompt plus some of its generation)."""
    assert salted("abc", None, "all", 300) == "steering:abc"  # every position: blocks shared as before
    assert salted("abc", None, "generation", 300) == "steering:abc:generation:300"
    assert salted("abc", "t", "prompt", 12) == "steering:abc:prompt:12|t"
    assert len({salted("abc", None, p, n) for p in ("all", "prompt", "generation") for n in (300, 301)}) == 5
    assert parse_phase(None) == "all" and parse_phase({}, "generation") == "generation"
    assert parse_phase({"steering_phase": "prompt"}, "generation") == "prompt"
    with pytest.raises(
        ValueError, match=r"'steering_phase' must be one of \['all', 'prompt', 'generation'\], got 'decode'"
    ):
        parse_phase({"steering_phase": "decode"})


def test_admission_counts_distinct_live_configurations(sets):
    a, b = sets.resolve({"steering": "a"}), sets.resolve({"steering": "b"})
    c = sets.resolve({"steering": "a", "steering_scale": 2.0})
    assert sets.admit("r1", a) is True  # new: its vectors must be sent to the workers
    sets.mark_stored(a)
    assert sets.admit("r2", a) is False  # already there
    assert sets.admit("r3", b) is True
    assert sets.admit("z", sets.zero) is False  # unsteered requests take row 0, not a configuration
    assert not sets.can_admit(c)
    with pytest.raises(SteeringRowsExhausted, match="all 2 steering configurations are in use"):
        sets.admit("r4", c)
    assert sets.release(["r1"]) is False  # r2 still uses a
    assert sets.release(["r2", "unknown"]) is True
    assert sets.can_admit(c) and sets.admit("r4", c) is True
    assert sets.live_requests() == 3


def test_the_workers_are_told_to_forget_stored_configurations_no_request_uses():
    sets = SteeringSets(L, D, max_configs=1)
    forgotten = []
    for i in range(5):
        configuration = sets._configuration(torch.full((L, D), float(i + 1)))
        sets.admit(f"r{i}", configuration)
        forgotten += sets.mark_stored(configuration)
        sets.release([f"r{i}"])
    assert len(sets.stored) == 2 and len(forgotten) == 3  # 2 x max_configs kept, oldest forgotten first


def test_per_request_steering_is_on_only_when_asked_for():
    assert per_request_options({"steering_vectors": "v.safetensors"}) is None
    assert per_request_options({"steering_sets": {"a": "a.safetensors"}}) == ({"a": "a.safetensors"}, 32)
    assert per_request_options({"max_steering_configs": 4}) == ({}, 4)
    assert per_request_options({"steering_vectors": "v.safetensors", "steering_phase": "all"}) is None
    assert per_request_options({"steering_vectors": "v.safetensors", "steering_phase": "generation"}) == ({}, 32)
    for bad, message in [
        ({"steering_phase": "decode"}, "must be one of"),
        ({"steering_sets": ["a"]}, "must map set names"),
        ({"steering_sets": {"none": "x"}}, "reserved"),
        ({"max_steering_configs": 0}, "positive integer"),
        ({"max_steering_config": 4}, "unknown steering option"),
        ({"steering_sets": {"a": "a.safetensors"}, "steering_scale": 2}, "scales 'steering_vectors', which is not"),
    ]:
        with pytest.raises(ValueError, match=message):
            per_request_options(bad)


def test_parse_choice_normalises_one_name_and_lists():
    assert parse_choice(None) is None
    assert parse_choice({"steering": "a"}) == (("a", 1.0),)
    assert parse_choice({"steering": ["a", "b"], "steering_scale": [2, -1]}) == (("a", 2.0), ("b", -1.0))
    assert parse_choice({"steering": "none"}) == ()


def test_an_http_requests_choice_is_pinned_for_all_its_prompts_while_its_set_is_replaced(sets):
    from steering_vllm.per_request.frontend import PINNED_CHOICE, resolve_pinned

    assert resolve_pinned(sets, {"steering": "a"}).content_hash == A.content_hash()  # no pin: plain resolution
    token = PINNED_CHOICE.set({})
    try:
        first = resolve_pinned(sets, {"steering": "a"})  # the first prompt pins the choice
        sets.put("a", B)  # replaced while the request's other prompts are being processed
        assert resolve_pinned(sets, {"steering": "a", "other": 1}) is first  # the same choice: the pinned vectors
        assert resolve_pinned(sets, {"steering": "b"}).content_hash == B.content_hash()  # another choice: its own
    finally:
        PINNED_CHOICE.reset(token)
    assert resolve_pinned(sets, {"steering": "a"}).content_hash == B.content_hash()  # a new request: the new "a"


def test_the_front_end_gives_each_request_its_phase_or_the_engines_default(sets):
    """``SteeringFrontEnd.resolve`` (what vLLM's input processor passes every request through): the phase a request
    chose, else the engine's ``steering_phase``; all for unsteered requests; the salt keyed accordingly."""
    from types import SimpleNamespace

    from vllm import SamplingParams

    from steering_vllm.per_request.frontend import SteeringChoiceError, SteeringFrontEnd

    front = SteeringFrontEnd(sets, engine=object(), phase="generation")

    def resolve(extra_args):
        request = SimpleNamespace(sampling_params=SamplingParams(extra_args=extra_args), cache_salt=None,
                                  prompt_token_ids=[1, 2, 3], prompt_embeds=None, request_id="r")  # fmt: skip
        front.resolve(request)
        return request.sampling_params.extra_args["steering_phase"], request.cache_salt

    a = sets.resolve({"steering": "a"}).content_hash
    assert resolve({"steering": "a"}) == ("generation", f"steering:{a}:generation:3")
    assert resolve({"steering": "a", "steering_phase": "all"}) == ("all", f"steering:{a}")
    assert resolve({"steering": "none", "steering_phase": "prompt"})[0] == "all"  # nothing to limit
    with pytest.raises(SteeringChoiceError, match="'steering_phase' must be one of"):
        resolve({"steering": "a", "steering_phase": "both"})


def test_the_resolved_choices_kept_are_bounded(sets):
    """Requests with ever new scales must not grow the front end's memory (a table per choice) without bound."""
    from steering_vllm.per_request.sets import RESOLVED_KEPT

    first = sets.resolve({"steering": "a", "steering_scale": 0.5})
    for i in range(RESOLVED_KEPT + 10):
        sets.resolve({"steering": "a", "steering_scale": 1.0 + i / 1000})
    assert len(sets._resolved) == RESOLVED_KEPT
    again = sets.resolve({"steering": "a", "steering_scale": 0.5})  # resolved anew, to the same configuration
    assert again is not first and again.content_hash == first.content_hash
