"""The workers' row assigner against the model runner's view of a batch (requests, their token ranges):
each token reads its request's row, rows are shared by configuration, kept while used, and reused after."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from steering_vllm.per_request.rows import RowAssigner
from steering_vllm.per_request.sets import CONFIG_KEY, PHASE_KEY
from steering_vllm.vectors.steering_vectors import table_hash

L, D, ROWS, MAX_TOKENS = 2, 4, 3, 16  # rows 1 and 2 for configurations, row 0 zero


class Tables:
    """The model side: one [ROWS, D] table per steered layer, as the steered norms hold them."""

    steering_num_layers, steering_hidden_size = L, D

    def __init__(self):
        self.tables = torch.zeros(L, ROWS, D)
        self.writes = 0

    def write_steering_row(self, row, table):
        self.tables[:, row] = table
        self.writes += 1


def _runner(batch: dict[str, int], hashes: dict[str, str | None], phases=None, prompts=None, computed=None):
    """A runner whose batch schedules ``batch[request_id]`` tokens of each request, in that order; ``phases``,
    ``prompts`` and ``computed``: each request's phase, prompt length and tokens computed before this batch."""
    counts = np.array(list(batch.values()))
    ends = np.cumsum(counts)
    phases, prompts, computed = phases or {}, prompts or {}, computed or {}

    def extra_args(rid, h):
        args = {CONFIG_KEY: h} if h else {}
        if rid in phases:
            args[PHASE_KEY] = phases[rid]
        return args or None

    requests = {
        rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra_args(rid, h)))
        for rid, h in hashes.items()
    }
    return SimpleNamespace(
        requests=requests,
        input_batch=SimpleNamespace(
            num_reqs=len(batch),
            req_ids=list(batch),
            num_prompt_tokens=np.array([prompts.get(rid, 1000) for rid in batch]),
            num_computed_tokens_cpu=np.array([computed.get(rid, 0) for rid in batch]),
        ),
        query_start_loc=SimpleNamespace(np=np.concatenate([[0], ends, [ends[-1]] * 4])),
        req_indices=SimpleNamespace(np=np.repeat(np.arange(len(batch)), counts)),
        query_pos=SimpleNamespace(np=np.concatenate([np.arange(c) for c in counts] + [np.zeros(4, int)])),
    )


@pytest.fixture
def setup():
    model = Tables()
    index = torch.full((MAX_TOKENS,), -1, dtype=torch.int32)
    rows = RowAssigner(model, index, ROWS)
    configs = {name: torch.randn(L, D) for name in "xyz"}
    for name, table in configs.items():
        rows.store_configuration(name, table)
    return model, index, rows, configs


def test_each_token_reads_its_requests_row_and_padding_reads_row_zero(setup):
    model, index, rows, configs = setup
    hashes = {"r1": "x", "r2": None, "r3": "y", "r4": "x"}
    rows.fill(_runner({"r1": 3, "r2": 2, "r3": 1, "r4": 2}, hashes), num_tokens=10)
    row_x, row_y = index[0].item(), index[5].item()
    assert index[:10].tolist() == [row_x] * 3 + [0] * 2 + [row_y] + [row_x] * 2 + [0, 0]
    assert {row_x, row_y} == {1, 2}
    assert torch.equal(model.tables[:, row_x], configs["x"]) and torch.equal(model.tables[:, row_y], configs["y"])
    assert index[10:].tolist() == [-1] * 6  # beyond the padded batch nothing is written


def test_a_phase_limits_a_requests_row_to_its_prompt_or_its_generated_positions(setup):
    _, index, rows, _ = setup
    # r1: prompt of 5, 3 computed, 4 scheduled (positions 3-6); r2: prompt of 2, a first chunk of 3 (positions
    # 0-2); r3: every position; r4: a decode step at position 9 of a 9-token prompt
    batch = {"r1": 4, "r2": 3, "r3": 2, "r4": 1}
    hashes = {"r1": "x", "r2": "x", "r3": "y", "r4": "x"}
    phases = {"r1": "prompt", "r2": "generation", "r3": "all", "r4": "generation"}
    runner = _runner(batch, hashes, phases, prompts={"r1": 5, "r2": 2, "r3": 1, "r4": 9}, computed={"r1": 3, "r4": 9})
    rows.fill(runner, num_tokens=12)
    x, y = index[0].item(), index[7].item()
    assert {x, y} == {1, 2}
    assert index[:12].tolist() == [x, x, 0, 0] + [0, 0, x] + [y, y] + [x] + [0, 0]
    rows.fill(_runner({"r1": 1}, hashes, phases, prompts={"r1": 5}, computed={"r1": 7}), num_tokens=1)
    assert index[0].item() == 0  # r1 decoding past its prompt: unsteered


def test_the_zero_configuration_reads_row_zero_without_taking_a_row(setup):
    model, index, rows, _ = setup
    zero = table_hash(torch.zeros(L, D))
    rows.fill(_runner({"r1": 2}, {"r1": zero}), num_tokens=2)
    assert index[:2].tolist() == [0, 0] and model.writes == 0


def test_a_row_stays_while_its_requests_live_and_is_reused_after(setup):
    model, index, rows, configs = setup
    rows.fill(_runner({"r1": 1, "r2": 1}, {"r1": "x", "r2": "y"}), num_tokens=2)
    row_x = index[0].item()
    with pytest.raises(RuntimeError, match="no free table row for request r3"):
        rows.fill(_runner({"r1": 1, "r2": 1, "r3": 1}, {"r1": "x", "r2": "y", "r3": "z"}), num_tokens=3)
    rows.request_row.pop("r3", None)
    # r1 ends (the runner forgets it): x's row is free, and z takes it; y keeps its row
    rows.fill(_runner({"r2": 1, "r3": 1}, {"r2": "y", "r3": "z"}), num_tokens=2)
    assert index[1].item() == row_x and torch.equal(model.tables[:, row_x], configs["z"])
    writes = model.writes
    rows.fill(_runner({"r2": 1, "r3": 1}, {"r2": "y", "r3": "z"}), num_tokens=2)
    assert model.writes == writes  # a known request's row is not written again


def test_an_idle_row_keeps_its_vectors_for_the_configuration_coming_back(setup):
    model, index, rows, _ = setup
    rows.fill(_runner({"r1": 1}, {"r1": "x"}), num_tokens=1)
    rows.fill(_runner({"r2": 1}, {"r2": "y"}), num_tokens=1)  # r1 ended; y takes the never-used row
    writes = model.writes
    rows.fill(_runner({"r3": 1}, {"r3": "x"}), num_tokens=1)
    assert model.writes == writes  # x was still in its row


def test_a_configuration_never_sent_is_an_error_not_a_wrong_row(setup):
    _, _, rows, _ = setup
    with pytest.raises(RuntimeError, match="configuration unknown-hash"):
        rows.fill(_runner({"r1": 1}, {"r1": "unknown-hash"}), num_tokens=1)
