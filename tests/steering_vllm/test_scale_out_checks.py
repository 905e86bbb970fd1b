"""The checks that keep a request from being served vectors it did not ask for, without an engine: the start-up
refusal of serving modes (steering_vllm.engine.scale_out), the engine core's check of each request
(steering_vllm.per_request.guard) and the front end's refusal of a choice an engine without sets cannot honour."""

from types import SimpleNamespace

import pytest

from steering_vllm.engine.scale_out import V2_RUNNER_ENV, check_serving_mode, serves_one_rank_of_many
from steering_vllm.per_request.frontend import refuse_choice
from steering_vllm.per_request.guard import check_request
from steering_vllm.vectors.steering_vectors import SteeringVectorsError

SETS = {"steering_sets": {"a": "a.safetensors"}}


def _config(additional_config=None, api_servers=1, dp=1, external_lb=False, hybrid_lb=False):
    parallel = SimpleNamespace(
        _api_process_count=api_servers,
        data_parallel_size=dp,
        data_parallel_external_lb=external_lb,
        data_parallel_hybrid_lb=hybrid_lb,
    )
    return SimpleNamespace(additional_config=additional_config, parallel_config=parallel)


@pytest.fixture(autouse=True)
def _runner_env(monkeypatch):
    monkeypatch.delenv(V2_RUNNER_ENV, raising=False)


def test_one_front_end_serves_per_request_sets_on_the_v1_runner(monkeypatch):
    import os

    check_serving_mode(_config(SETS))
    assert os.environ[V2_RUNNER_ENV] == "0"
    check_serving_mode(_config({"max_steering_configs": 4}, dp=2))  # DP behind one API server: exact


def test_without_per_request_sets_every_mode_starts():
    import os

    for config in [_config(None, api_servers=4, dp=4), _config({"steering_vectors": "v"}, dp=2, external_lb=True)]:
        check_serving_mode(config)
    assert V2_RUNNER_ENV not in os.environ


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(api_servers=2), "need one API server, got --api-server-count 2"),
        (dict(api_servers=2, dp=2), "with --data-parallel-size 2, vLLM starts 2 API servers"),
        (dict(dp=2, external_lb=True), "not served with --data-parallel-external-lb"),
        (dict(dp=2, hybrid_lb=True), "not served with --data-parallel-hybrid-lb"),
    ],
)
def test_several_front_ends_are_refused_with_the_flag_to_use(kwargs, message):
    with pytest.raises(SteeringVectorsError, match=message):
        check_serving_mode(_config(SETS, **kwargs))
    with pytest.raises(SteeringVectorsError, match="--api-server-count 1"):
        check_serving_mode(_config(SETS, **kwargs))


def test_an_explicit_v2_runner_is_refused(monkeypatch):
    monkeypatch.setenv(V2_RUNNER_ENV, "1")
    with pytest.raises(SteeringVectorsError, match=f"{V2_RUNNER_ENV}=1 asks for V2"):
        check_serving_mode(_config(SETS))


def test_a_rank_behind_an_external_balancer_is_one_of_many():
    parallel = _config(None, dp=2, external_lb=True).parallel_config
    assert serves_one_rank_of_many(parallel)
    assert not serves_one_rank_of_many(_config(None, dp=2).parallel_config)
    assert not serves_one_rank_of_many(_config(None).parallel_config)


def _params(extra_args):
    return SimpleNamespace(extra_args=extra_args)


def test_the_engine_core_refuses_an_unresolved_request_of_a_per_request_engine():
    check_request("r", _params({"steering_config": "f" * 64, "steering": "a"}), per_request=True)
    check_request("r", None, per_request=True)  # pooling
    for extra_args in [None, {}, {"steering": "a"}, {"steering_config": 3}]:
        with pytest.raises(ValueError, match="without a resolved steering configuration"):
            check_request("r", _params(extra_args), per_request=True)


def test_the_engine_core_refuses_a_phase_its_front_end_did_not_check():
    with pytest.raises(ValueError, match=r"request r: 'steering_phase' must be one of"):
        check_request("r", _params({"steering_config": "f" * 64, "steering_phase": "decode"}), per_request=True)
    check_request("r", _params({"steering_config": "f" * 64, "steering_phase": "generation"}), per_request=True)


def test_the_engine_core_refuses_a_choice_an_engine_without_sets_cannot_honour():
    check_request("r", _params(None), per_request=False)
    check_request("r", _params({"other": 1}), per_request=False)
    asked = [{"steering": "a"}, {"steering": "none"}, {"steering_scale": 0.5}, {"steering_phase": "prompt"},
             {"steering_config": "f"}]  # fmt: skip
    for extra_args in asked:
        with pytest.raises(ValueError, match="start the server with --steering-sets"):
            check_request("r", _params(extra_args), per_request=False)


def test_the_front_end_of_an_engine_without_sets_refuses_a_choice_before_scheduling():
    request = SimpleNamespace(sampling_params=_params({"other": 1}))
    assert refuse_choice(request) is request
    assert refuse_choice(SimpleNamespace(sampling_params=None)) is not None
    for extra_args in [{"steering": "a"}, {"steering": "none"}, {"steering_scale": 0.5}, {"steering_phase": "all"}]:
        with pytest.raises(ValueError, match=r"needs per-request steering.*--steering-sets NAME=PATH"):
            refuse_choice(SimpleNamespace(sampling_params=_params(extra_args)))


class _Ranks:
    """Workers of several data-parallel engines as ``swap_every_rank`` reaches them (one result a worker); rank
    ``failing`` cannot stage. Each keeps its active and staged hashes, as the worker extension does."""

    def __init__(self, count, failing=None):
        self.active, self.staged, self.failing = ["old"] * count, [None] * count, failing

    async def rpc(self, method, *args):
        if method == "steering_stage":
            for rank in range(len(self.active)):
                if rank == self.failing:
                    raise RuntimeError(f"rank {rank}: out of memory")
                self.staged[rank] = "new"
            return ["new"] * len(self.active)
        if method == "steering_discard":
            self.staged = [None] * len(self.active)
            return [None] * len(self.active)
        assert method == "steering_commit" and all(s == args[0] for s in self.staged)
        self.active, self.staged = list(self.staged), [None] * len(self.active)
        return self.active


def test_a_swap_commits_on_every_rank_only_after_every_rank_staged_it():
    import asyncio

    from steering_vllm.serve.hot_swap import swap_every_rank

    ranks = _Ranks(3)
    asyncio.run(swap_every_rank(ranks.rpc, b"", "v", "new"))
    assert ranks.active == ["new"] * 3
    ranks = _Ranks(3, failing=2)
    with pytest.raises(RuntimeError, match="rank 2: out of memory"):
        asyncio.run(swap_every_rank(ranks.rpc, b"", "v", "new"))
    assert ranks.active == ["old"] * 3 and ranks.staged == [None] * 3  # the old vectors everywhere, nothing pending
