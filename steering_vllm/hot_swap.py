"""Replace the steering vectors of a running ``vllm.LLM`` in place, without reloading anything."""

from __future__ import annotations

import os

from steering_vllm.vectors import SteeringVectors, SteeringVectorsError


def update_steering(llm, vectors: SteeringVectors | str | os.PathLike) -> str:
    """Swap ``llm``'s steering vectors for ``vectors`` (an object or any readable file); returns their hash.

    The vectors are checked against the model first, so a bad update raises ``SteeringVectorsError`` and
    changes nothing. Then every worker copies them into its buffers in place (addresses unchanged, so
    compiled graphs and CUDA graphs stay valid), and the prefix cache is reset: its blocks were computed
    with the old vectors and must never be reused. Call it between ``generate`` calls (``LLM`` runs no
    request then); a request never sees half a swap.
    """
    engine = llm.llm_engine
    model_config = engine.vllm_config.model_config
    text_config = model_config.hf_text_config
    if not isinstance(vectors, SteeringVectors):
        vectors = SteeringVectors.load(vectors, num_layers=text_config.num_hidden_layers)
    vectors.check_compatible(text_config.num_hidden_layers, text_config.hidden_size, model_config.model)
    from steering_vllm.worker import EXTENSION

    if engine.vllm_config.parallel_config.worker_extension_cls != EXTENSION:
        raise SteeringVectorsError(
            f"{vectors.source}: this engine's workers lack the steering extension (worker_extension_cls is "
            f"{engine.vllm_config.parallel_config.worker_extension_cls!r}); the plugin sets it for Qwen2 / Llama "
            "models unless another extension was given"
        )
    expected = vectors.content_hash()
    hashes = llm.collective_rpc("steering_update", args=(vectors.to_bytes(),))
    if any(h != expected for h in hashes):
        raise RuntimeError(f"steering update: workers report {hashes}, expected {expected}")
    if not llm.reset_prefix_cache():
        raise RuntimeError("steering update: the prefix cache could not be reset (requests still running?)")
    return expected
