"""Replace the steering vectors of a running engine in place, without reloading anything.

``update_steering`` serves ``vllm.LLM``; ``update_steering_async`` serves ``AsyncLLM``, the engine behind
``vllm serve``, where requests may be running during the swap.

An engine started with per-request sets (``steering_sets`` / ``max_steering_configs``) keeps its sets in
its front end: ``update_steering(llm, vectors, name="a")`` adds or replaces set ``a`` (no name: the
default set) and ``remove_steering(llm, "a")`` removes it. New requests resolve to the new vectors;
running ones keep what they were admitted with, and the prefix cache needs no reset (it is keyed by each
request's vectors).
"""

from __future__ import annotations

import functools
import os

from steering_vllm.vectors.steering_vectors import SteeringVectors, SteeringVectorsError


def update_steering(llm, vectors: SteeringVectors | str | os.PathLike, name: str | None = None) -> str:
    """Swap ``llm``'s steering vectors for ``vectors`` (an object or any readable file); returns their hash.

    With per-request sets, this adds or replaces set ``name`` (None: the default set) instead.

    The vectors are checked against the model first, so a bad update raises ``SteeringVectorsError`` and
    changes nothing. Then every worker stages them, and only when all have, copies them into its buffers in
    place (addresses unchanged, so compiled graphs and CUDA graphs stay valid). The prefix cache is reset:
    its blocks were computed with the old vectors and must never be reused. Call it between ``generate``
    calls (``LLM`` runs no request then); a request never sees half a swap.
    """
    vectors = _checked(llm.llm_engine.vllm_config, vectors)
    if _put_set(llm.llm_engine, vectors, name):
        return vectors.content_hash()
    expected = vectors.content_hash()
    try:
        _check_hashes(
            "stage", llm.collective_rpc("steering_stage", args=(vectors.to_bytes(), vectors.source)), expected
        )
    except BaseException:
        llm.collective_rpc("steering_discard")
        raise
    _check_hashes("commit", llm.collective_rpc("steering_commit", args=(expected,)), expected)
    if not llm.reset_prefix_cache(reset_connector=True):  # a KV connector's blocks hold the old vectors too
        raise RuntimeError("steering update: the prefix cache could not be reset (requests still running?)")
    return vectors.content_hash()


async def update_steering_async(engine, vectors: SteeringVectors | str | os.PathLike, name: str | None = None) -> str:
    """``update_steering`` for ``vllm.v1.engine.async_llm.AsyncLLM``, safe while requests run.

    The swap lands between engine steps: generation is paused with running requests kept, the prefix
    cache and the running requests' KV are dropped (they were computed with the old vectors), the vectors
    are copied, and generation resumes. A request that spans the swap keeps the tokens it already produced
    with the old vectors and continues with the new ones, its context recomputed under them.
    """
    vectors = _checked(engine.vllm_config, vectors)
    if _put_set(engine, vectors, name):
        return vectors.content_hash()
    expected = vectors.content_hash()
    try:  # a pause that fails after pausing (a KV connector's reset) must not leave generation paused
        await engine.pause_generation(mode="keep", clear_cache=True)
        await swap_every_rank(functools.partial(rpc_every_rank, engine), vectors.to_bytes(), vectors.source, expected)
    finally:
        await engine.resume_generation()
    return expected


async def swap_every_rank(rpc, payload: bytes, source: str, expected: str) -> None:
    """Stage the vectors on every worker of every engine rank, then commit them; a rank that fails to stage
    fails the swap with the old vectors kept everywhere. ``rpc(method, *args)`` answers one result a worker."""
    try:
        _check_hashes("stage", await rpc("steering_stage", payload, source), expected)
    except BaseException:
        await rpc("steering_discard")
        raise
    _check_hashes("commit", await rpc("steering_commit", expected), expected)


async def rpc_every_rank(engine, method: str, *args) -> list:
    """``engine.collective_rpc`` on every data-parallel engine's workers, one result per worker. (vLLM's DP
    client sends a utility call to every engine but returns the first engine's answer alone.)"""
    call_all = getattr(engine.engine_core, "call_utility_all_async", None)
    if call_all is None:  # in-process client: one engine
        return await engine.collective_rpc(method, args=args)
    per_engine = await call_all("collective_rpc", method, None, args, None)
    return [result for results in per_engine for result in results]


def remove_steering(llm_or_engine, name: str) -> None:
    """Remove set ``name`` from an engine with per-request sets (``vllm.LLM`` or ``AsyncLLM``). Requests that
    use it keep their vectors until they end; new ones naming it are refused."""
    sets = steering_sets(getattr(llm_or_engine, "llm_engine", llm_or_engine))
    if sets is None:
        raise SteeringVectorsError(NO_SETS_MESSAGE)
    sets.remove(name)


def steering_sets(engine):
    """The engine's ``SteeringSets`` (``steering_vllm.per_request.sets``), or None without per-request steering."""
    return getattr(engine, "steering_sets", None)


NO_SETS_MESSAGE = (
    "this engine serves one set of vectors to every request; start it with steering_sets or max_steering_configs "
    "(--steering-sets / --max-steering-configs) to serve named sets"
)


def _put_set(engine, vectors: SteeringVectors, name: str | None) -> bool:
    """Put ``vectors`` in the engine's sets if it has per-request steering; False if it serves one set."""
    sets = steering_sets(engine)
    if sets is None:
        if name is not None:
            raise SteeringVectorsError(NO_SETS_MESSAGE)
        return False
    sets.put(name, vectors)
    return True


def _checked(vllm_config, vectors) -> SteeringVectors:
    from steering_vllm.engine.families import vectors_for_model
    from steering_vllm.serve.worker import has_steering_extension

    vectors = vectors_for_model(vectors, vllm_config.model_config)
    extension = vllm_config.parallel_config.worker_extension_cls
    if not has_steering_extension(extension):
        raise SteeringVectorsError(
            f"{vectors.source}: this engine's workers lack the steering extension (worker_extension_cls is "
            f"{extension!r}); the plugin sets it for the steered families unless another extension was given: extend "
            "steering_vllm.serve.worker.SteeringWorkerExtension"
        )
    return vectors


def _check_hashes(phase: str, hashes: list[str], expected: str) -> None:
    if not hashes or any(h != expected for h in hashes):
        raise RuntimeError(f"steering update ({phase}): workers report {hashes}, expected {expected}")
