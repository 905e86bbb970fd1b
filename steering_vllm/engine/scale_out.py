"""Which ways of scaling vLLM out the plugin serves exactly, and refusing the others at start-up.

Per-request sets live in the engine's front end (``steering_vllm.per_request.frontend``): the sets, their versions and
the row budget are that process's books. That is exact when one front end feeds every engine rank:

- one API server (the default without data parallelism), with any tensor / pipeline parallel size;
- data parallel with internal load balancing and ``--api-server-count 1``: the one front end sends each
  configuration to every rank (vLLM's DP client broadcasts utility calls) and admits against one budget.

It is not exact with several front ends (``--api-server-count N > 1``, which vLLM picks by itself with
``--data-parallel-size N``; hybrid or external load balancing, where each rank has its own server): each
would keep its own sets and budget, and a set replaced through one would be unknown to the others. Those
are refused here, before any engine starts, as vLLM itself refuses runtime LoRA updating with several API
servers. The engine core refuses any request that still slips through unresolved (``per_request.guard``).

Per-request row assignment hooks vLLM's V1 model runner; the plugin selects it for such engines and refuses
an explicit ``VLLM_USE_V2_MODEL_RUNNER=1``.
"""

from __future__ import annotations

import logging
import os

from steering_vllm.config import per_request_options
from steering_vllm.vectors.steering_vectors import SteeringVectorsError

logger = logging.getLogger("vllm.steering_vllm")  # under vLLM's logger: printed with its handler

V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
PER_REQUEST_FLAGS = "per-request steering sets (--steering-sets / --max-steering-configs)"


def front_end_count(parallel_config) -> int:
    """How many API-server processes feed the engine(s): vLLM sets ``_api_process_count`` from
    ``--api-server-count`` (and raises it to ``--data-parallel-size`` when the flag is not given)."""
    return int(getattr(parallel_config, "_api_process_count", 1) or 1)


def check_serving_mode(vllm_config) -> None:
    """Raise SteeringVectorsError, naming the flag and what to use instead, for a mode that could serve a
    request other vectors than it asked for; select the V1 runner for per-request engines."""
    if per_request_options(vllm_config.additional_config) is None:
        return
    parallel = vllm_config.parallel_config
    count = front_end_count(parallel)
    if count > 1:
        dp = parallel.data_parallel_size
        hint = (
            f" (with --data-parallel-size {dp}, vLLM starts {dp} API servers unless told otherwise)" if dp > 1 else ""
        )
        raise SteeringVectorsError(
            f"{PER_REQUEST_FLAGS} need one API server, got --api-server-count {count}{hint}: each front end "
            "would keep its own sets and row budget. Start with --api-server-count 1; one API server feeds "
            "every data-parallel rank."
        )
    flag = _per_rank_balancing(parallel)
    if flag is not None:
        raise SteeringVectorsError(
            f"{PER_REQUEST_FLAGS} are not served with {flag} (or --data-parallel-rank / --data-parallel-start-rank): "
            "each rank's server would keep its own sets. Use internal load balancing: --data-parallel-size N "
            "--api-server-count 1."
        )
    if os.environ.get(V2_RUNNER_ENV, "").strip().lower() in ("1", "true"):
        raise SteeringVectorsError(
            f"{PER_REQUEST_FLAGS} hook vLLM's V1 model runner, and {V2_RUNNER_ENV}=1 asks for V2: unset it or set 0"
        )
    os.environ[V2_RUNNER_ENV] = "0"  # the workers this process starts inherit the choice
    logger.info("steering: per-request sets run on vLLM's V1 model runner (%s=0)", V2_RUNNER_ENV)


def serves_one_rank_of_many(parallel_config) -> bool:
    """True for a server that is one of several externally balanced data-parallel ranks: a swap through it
    would reach its own rank only."""
    return parallel_config.data_parallel_size > 1 and _per_rank_balancing(parallel_config) is not None


def _per_rank_balancing(parallel_config) -> str | None:
    """The flag of a load-balancing mode that gives each data-parallel rank (or node) a server of its own."""
    if getattr(parallel_config, "data_parallel_external_lb", False):
        return "--data-parallel-external-lb"
    if getattr(parallel_config, "data_parallel_hybrid_lb", False):
        return "--data-parallel-hybrid-lb"
    return None
