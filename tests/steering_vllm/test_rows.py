"""The workers' row assigner against the model runner's view of a batch (requests, their token ranges):
each token reads its request's row, rows are shared by configuration, kept while used, and reused after."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from steering_vllm.per_request.rows import RowAssigner
from steering_vllm.per_request.sets import CONFIG_KEY
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


def _runner(batch: dict[str, int], hashes: dict[str, str | None]):
    """A runner whose batch schedules ``batch[request_id]`` tokens of each request, in that order."""
    counts = np.array(list(batch.values()))
    ends = np.cumsum(counts)
    requests = {
        rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args={CONFIG_KEY: h} if h else None))
        for rid, h in hashes.items()
    }
    return SimpleNamespace(
        requests=requests,
        input_batch=SimpleNamespace(num_reqs=len(batch), req_ids=list(batch)),
        query_start_loc=SimpleNamespace(np=np.concatenate([[0], ends, [ends[-1]] * 4])),
        req_indices=SimpleNamespace(np=np.repeat(np.arange(len(batch)), counts)),
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
