"""Worker-side half of the hot-swap: methods vLLM mixes into every worker (``worker_extension_cls``).

The plugin sets this extension on every engine it steers, so ``LLM.collective_rpc("steering_update", ...)``
reaches each tensor- and pipeline-parallel rank. Vectors travel as safetensors bytes: vLLM's RPC serializer
does not carry tensors faithfully (DESIGN.md §5).
"""

from steering_vllm.vectors import SteeringVectors

EXTENSION = "steering_vllm.worker.SteeringWorkerExtension"


class SteeringWorkerExtension:
    def steering_update(self, payload: bytes, source: str = "update_steering") -> str:
        """Validate, then copy into this rank's buffers in place; returns the content hash."""
        vectors = SteeringVectors.from_bytes(payload, source=source)
        self.model_runner.get_model().set_steering(vectors)
        return vectors.content_hash()

    def steering_table(self) -> bytes:
        """This rank's vectors (zero rows for layers held by other pipeline ranks), as safetensors bytes."""
        return SteeringVectors.from_tensor(self.model_runner.get_model().get_steering()).to_bytes()

    def steering_status(self) -> dict:
        """What ``GET /v1/steering`` reports: the active vectors' summary, when they were set, the last swaps."""
        return self.model_runner.get_model().steering_status()
