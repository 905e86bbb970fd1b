"""Worker-side half of the hot-swap: methods vLLM mixes into every worker (``worker_extension_cls``).

The plugin sets this extension on every engine it steers, so ``LLM.collective_rpc("steering_update", ...)``
reaches each tensor- and pipeline-parallel rank. Vectors travel as safetensors bytes: vLLM's RPC serializer
does not carry tensors faithfully (DESIGN.md §5).
"""

import functools

from steering_vllm.per_request.rows import RowAssigner
from steering_vllm.vectors.steering_vectors import SteeringVectors, table_hash

EXTENSION = "steering_vllm.serve.worker.SteeringWorkerExtension"


def has_steering_extension(extension: str | type | None) -> bool:
    """Whether a ``worker_extension_cls`` (a qualified name or a class) is this extension or extends it."""
    if isinstance(extension, str) and extension:
        from vllm.utils.import_utils import resolve_obj_by_qualname

        extension = resolve_obj_by_qualname(extension)
    return isinstance(extension, type) and issubclass(extension, SteeringWorkerExtension)


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
