"""Which table row each scheduled token reads (the workers' half of per-request steering).

Every steered norm holds a table of ``max_configs + 1`` rows; row 0 stays zero (unsteered requests and
padded tokens read it). Before each forward, ``RowAssigner.fill`` gives each scheduled request the row
of its configuration (the content hash the front end put in its ``extra_args``), writing the
configuration's vectors into a free row the first time, and fills the per-token index the norms read:
one numpy gather over the batch's token-to-request map, no loop over tokens.

A request limited to a phase (``steering_phase``: ``prompt`` or ``generation``) reads its row at its prompt's
positions only (position < prompt length) or at its generated tokens' only, and row 0 elsewhere: positions are
the runner's own (computed tokens + offset in the chunk), so chunked prefill, preemption and recomputation
keep each position in its phase.

A row stays with a configuration while any request using it is still known to the model runner, so a
request keeps its vectors for its whole life even when its set is replaced or removed meanwhile; rows no
request uses are reused, least recently used first. Every tensor- and pipeline-parallel rank sees the same
requests in the same order, so all ranks make the same choices.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from steering_vllm.config import PHASE_KEY, PHASES
from steering_vllm.per_request.sets import CONFIG_KEY
from steering_vllm.vectors.steering_vectors import table_hash

PHASE_CODES = {phase: code for code, phase in enumerate(PHASES)}  # all: 0, so phases.any() finds the others
PROMPT, GENERATION = PHASE_CODES["prompt"], PHASE_CODES["generation"]


class RowAssigner:
    def __init__(self, model, index: torch.Tensor, num_rows: int):
        self.model = model
        self.index = index  # the [max_tokens] int32 buffer every steered norm slices
        self.host_index = index.numpy() if index.device.type == "cpu" else np.zeros(index.shape[0], np.int32)
        self.zero_hash = table_hash(torch.zeros(model.steering_num_layers, model.steering_hidden_size))
        self.store: dict[str, torch.Tensor] = {}  # configuration hash -> [L, d] vectors, sent by the front end
        self.request_row: dict[str, int] = {}
        self.request_phase: dict[str, int] = {}  # PHASE_CODES
        self.row_users = [0] * num_rows
        self.row_config: list[str | None] = [None] * num_rows
        self.config_row: dict[str, int] = {}
        self.idle_rows: OrderedDict[int, None] = OrderedDict((row, None) for row in range(1, num_rows))
        self.forwards = 0  # batches filled: proof that the runner in use calls the hooked forward

    def store_configuration(self, content_hash: str, table: torch.Tensor) -> None:
        self.store[content_hash] = table

    def forget(self, hashes) -> None:
        for content_hash in hashes:
            self.store.pop(content_hash, None)

    def fill(self, runner, num_tokens: int) -> None:
        """Point every token of the batch ``runner`` is about to run at its request's row."""
        self.forwards += 1
        requests = runner.requests
        self.release_ended(requests)
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        rows = np.fromiter(
            (self._row(request_id, requests[request_id]) for request_id in batch.req_ids[:num_reqs]),
            dtype=np.int32,
            count=num_reqs,
        )
        scheduled = int(runner.query_start_loc.np[num_reqs])
        host = self.host_index
        token_requests = runner.req_indices.np[:scheduled]
        np.take(rows, token_requests, out=host[:scheduled])
        phases = np.fromiter(
            (self.request_phase[request_id] for request_id in batch.req_ids[:num_reqs]), dtype=np.int8, count=num_reqs
        )
        if phases.any():
            self._limit_to_phases(runner, phases, token_requests, host[:scheduled])
        host[scheduled:num_tokens] = 0
        if self.index.device.type != "cpu":
            self.index[:num_tokens].copy_(torch.from_numpy(host[:num_tokens]), non_blocking=True)

    @staticmethod
    def _limit_to_phases(runner, phases, token_requests, host) -> None:
        """Row 0 for the tokens outside their request's phase; positions as the runner computes them."""
        batch = runner.input_batch
        positions = batch.num_computed_tokens_cpu[token_requests] + runner.query_pos.np[: len(token_requests)]
        in_prompt = positions < batch.num_prompt_tokens[token_requests]
        token_phases = phases[token_requests]
        outside = ((token_phases == PROMPT) & ~in_prompt) | ((token_phases == GENERATION) & in_prompt)
        host[outside] = 0

    def release_ended(self, requests) -> None:
        """Give up the rows of requests the runner no longer knows (finished or aborted)."""
        for request_id in [r for r in self.request_row if r not in requests]:
            self._release(request_id)

    def _row(self, request_id: str, state) -> int:
        row = self.request_row.get(request_id)
        if row is not None:
            return row
        params = state.sampling_params
        extra_args = (params.extra_args or {}) if params is not None else {}
        content_hash = extra_args.get(CONFIG_KEY)
        row = 0 if content_hash in (None, self.zero_hash) else self._acquire(content_hash, request_id)
        self.request_row[request_id] = row
        self.request_phase[request_id] = PHASE_CODES[extra_args.get(PHASE_KEY, "all")]
        if row:
            self.row_users[row] += 1
        return row

    def _acquire(self, content_hash: str, request_id: str) -> int:
        row = self.config_row.get(content_hash)
        if row is not None:
            self.idle_rows.pop(row, None)
            return row
        table = self.store.get(content_hash)
        if table is None:
            raise RuntimeError(
                f"steering: request {request_id} asks for configuration {content_hash[:12]}, which this worker "
                "was never sent"
            )
        if not self.idle_rows:
            raise RuntimeError(
                f"steering: no free table row for request {request_id}: every row serves running requests "
                "(the front end admits at most max_steering_configs configurations)"
            )
        row, _ = self.idle_rows.popitem(last=False)
        previous = self.row_config[row]
        if previous is not None:
            del self.config_row[previous]
        self.model.write_steering_row(row, table)
        self.row_config[row] = content_hash
        self.config_row[content_hash] = row
        return row

    def _release(self, request_id: str) -> None:
        self.request_phase.pop(request_id, None)
        row = self.request_row.pop(request_id)
        if row == 0:
            return
        self.row_users[row] -= 1
        if self.row_users[row] == 0:
            self.idle_rows[row] = None  # keeps its vectors until reused: a returning configuration finds them

    def status(self) -> dict:
        return {
            "rows": {
                row: {"content_hash": self.row_config[row], "requests": self.row_users[row]}
                for row in range(1, len(self.row_config))
                if self.row_config[row] is not None
            },
            "stored": sorted(self.store),
            "forwards": self.forwards,
        }
