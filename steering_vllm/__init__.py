"""steering-vllm: per-layer steering vectors for vLLM (serving) and transformers (training).

Importing this package does not import vLLM; the plugin (``steering_vllm.plugin.register``) does that
when vLLM loads it through the ``vllm.general_plugins`` entry point.
"""

from steering_vllm.serve.hot_swap import remove_steering, update_steering, update_steering_async
from steering_vllm.vectors.steering_vectors import SteeringVectors, SteeringVectorsError

__all__ = ["SteeringVectors", "SteeringVectorsError", "remove_steering", "update_steering", "update_steering_async"]
