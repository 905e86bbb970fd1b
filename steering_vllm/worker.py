"""Worker-side half of the hot-swap: methods vLLM mixes into every worker (``worker_extension_cls``).

The plugin sets this extension on every engine it steers, so ``LLM.collective_rpc("steering_update", ...)``
reaches each tensor- and pipeline-parallel rank. Vectors travel as safetensors bytes: vLLM's RPC serializer
does not carry tensors faithfully (DESIGN.md §5).
"""

import contextlib
import functools
import logging

from steering_vllm.rows import RowAssigner
from steering_vllm.vectors import SteeringVectors, table_hash

EXTENSION = "steering_vllm.worker.SteeringWorkerExtension"


class SteeringWorkerExtension:
    def steering_update(self, payload: bytes, source: str = "update_steering") -> str:
        """Validate, then copy into this rank's buffers in place; returns the content hash read back from them."""
        vectors = SteeringVectors.from_bytes(payload, source=source)
        return self.model_runner.get_model().set_steering(vectors)

    def steering_stage(self, payload: bytes, source: str = "update_steering") -> str:
        """First half of a swap on every rank: validate and hold the vectors; returns their content hash. The
        caller commits only once every rank (every data-parallel engine's workers) has staged them."""
        vectors = SteeringVectors.from_bytes(payload, source=source)
        model = self.model_runner.get_model()
        vectors.check_compatible(model.steering_num_layers, model.steering_hidden_size)
        self._steering_staged = vectors
        return vectors.content_hash()

    def steering_commit(self, content_hash: str) -> str:
        """Second half: copy the staged vectors into the buffers in place; returns the hash read back."""
        staged = getattr(self, "_steering_staged", None)
        if staged is None or staged.content_hash() != content_hash:
            raise RuntimeError(f"steering: vectors {content_hash[:12]} were not staged on this worker")
        self._steering_staged = None
        return self.model_runner.get_model().set_steering(staged)

    def steering_discard(self) -> None:
        """Drop staged vectors (another rank failed to stage them): the active ones stay."""
        self._steering_staged = None

    def steering_hash(self) -> str:
        """The content hash of the active vectors as last set (cheap: no read of the buffers)."""
        return self.model_runner.get_model().steering_hash

    def steering_table(self) -> bytes:
        """This rank's vectors (zero rows for layers held by other pipeline ranks), as safetensors bytes."""
        return SteeringVectors.from_tensor(self.model_runner.get_model().get_steering()).to_bytes()

    def steering_status(self) -> dict:
        """What ``GET /v1/steering`` reports: the active vectors' summary, when they were set, the last swaps."""
        return self.model_runner.get_model().steering_status()

    def steering_store_configuration(self, content_hash: str, payload: bytes) -> str:
        """Keep a per-request configuration's vectors until a request asks for it; returns their hash."""
        vectors = SteeringVectors.from_bytes(payload, source=f"configuration {content_hash[:12]}")
        received = vectors.content_hash()
        if received != content_hash:
            raise ValueError(f"steering: configuration {content_hash[:12]} arrived as {received[:12]}")
        self._steering_rows().store_configuration(content_hash, vectors.to_tensor())
        return received

    def steering_forget_configurations(self, hashes: list[str]) -> None:
        self._steering_rows().forget(hashes)

    def steering_rows_status(self) -> dict:
        """Each table row in use: the configuration it was given and the hash read back from the buffers."""
        rows = self._steering_rows()
        rows.release_ended(self.model_runner.requests)
        status = {**rows.status(), "runner": type(self.model_runner).__name__}
        model = self.model_runner.get_model()
        for row, entry in status["rows"].items():
            entry["buffer_hash"] = table_hash(model.steering_row(row))
        return status

    def _steering_rows(self) -> RowAssigner:
        """The row assigner, installed on first use: it fills the norms' index before every forward."""
        rows = getattr(self, "_steering_row_assigner", None)
        if rows is None:
            runner = self.model_runner
            model = runner.get_model()
            if getattr(model, "steering_index", None) is None:
                raise RuntimeError("steering: this engine was not started with per-request steering sets")
            if not hasattr(runner, "_model_forward") or not hasattr(runner, "req_indices"):
                raise RuntimeError(
                    f"steering: per-request sets need vLLM's V1 model runner, not {type(runner).__name__}; "
                    "unset VLLM_USE_V2_MODEL_RUNNER or set it to 0"
                )
            rows = RowAssigner(model, model.steering_index, model.steering_table_rows)
            forward = runner._model_forward

            @functools.wraps(forward)
            def steered_forward(*args, **kwargs):
                positions = kwargs.get("positions")
                rows.fill(runner, positions.shape[-1])
                return forward(*args, **kwargs)

            runner._model_forward = steered_forward
            self._steering_row_assigner = rows
        return rows

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
