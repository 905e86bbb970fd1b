"""The Full-Tune baseline's worker extension: the steering extension plus an in-place reload of every base weight.

Only the trainer's ``--trainable full`` needs to push whole weights into a running engine, so this lives with the
trainer and is passed to vLLM as ``worker_extension_cls``; the plugin's hot-swap accepts it because it extends
the steering extension.
"""

import contextlib
import logging

from steering_vllm.serve.worker import SteeringWorkerExtension

EXTENSION = "trainer.full_weights_worker.FullWeightsWorkerExtension"


class FullWeightsWorkerExtension(SteeringWorkerExtension):
    def load_weights_bytes(self, payload: bytes) -> int:
        """Replace base weights in place from safetensors bytes (HF checkpoint names); returns the tensor count.

        Goes through the worker's ``reload_weights`` rather than ``model.load_weights``: after loading, vLLM
        repacks linear weights for its kernels (on CPU the plain weight is dropped for a packed copy), and
        only the layerwise reload re-runs that processing. Tensor addresses stay the same and the steering
        buffers are kept. The caller resets the prefix cache.
        """
        from safetensors.torch import load

        tensors = load(payload)
        with _quiet_partial_reload():
            self.reload_weights(weights_iterator=iter(tensors.items()))
        if any(name.endswith("embed_tokens.weight") for name in tensors):
            _reprocess_tied_lm_head(self.model_runner.get_model())
        return len(tensors)


@contextlib.contextmanager
def _quiet_partial_reload():
    """A payload may carry only some layers (``FullTrainable.sync`` sends buckets): the others keep their weights,
    which vLLM's layerwise reload logs as a warning per layer ("Failed to load weights"). Drop those lines."""
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")

    def drop(record: logging.LogRecord) -> bool:
        return "Failed to load weights" not in record.getMessage()

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _reprocess_tied_lm_head(model) -> None:
    """Tied embeddings: the reload processes the module it loaded (``embed_tokens``) but not ``lm_head``, which
    shares the weight and, on CPU, keeps a GEMM handle packed from the old values. Unquantized only, where the
    processing is a repacking that may run again (a no-op on GPU)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is None or getattr(lm_head, "weight", None) is not embed.weight:
        return
    if isinstance(getattr(lm_head, "quant_method", None), UnquantizedEmbeddingMethod):
        lm_head.quant_method.process_weights_after_loading(lm_head)
