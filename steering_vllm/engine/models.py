"""Steered vLLM models: vLLM's own classes with the norms after layers 0..L-1 swapped for their steered forms.

One mechanism for every family in ``steering_vllm.engine.families``: ``Steered<Class>`` (e.g.
``SteeredQwen2ForCausalLM``) is vLLM's class with ``SteeringMixin`` mixed in, built on first use, and the
norms to steer are found from the model's own modules. Registered under the built-in architecture names by
``steering_vllm.plugin``, so those checkpoints are served steered, with the base checkpoint unchanged.
"""

from __future__ import annotations

import importlib
import time
from collections import deque

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.utils import PPMissingLayer

from steering_vllm.config import per_request_options, steering_options
from steering_vllm.engine.families import FAMILIES
from steering_vllm.engine.norm import SteeringBuffers, steered_norm
from steering_vllm.vectors.steering_vectors import SteeringVectors, table_hash

logger = init_logger(__name__)

HISTORY_LENGTH = 32  # swaps remembered for GET /v1/steering


class SteeringMixin:
    """Installs the steered norms this rank holds and loads the vectors named in ``additional_config``.

    With pipeline parallelism a rank holds layers [start, end): it steers the input norms of those layers
    (vectors start-1 .. end-2) and, on the last rank, the final norm (vector L-1). With tensor parallelism
    the residual stream is replicated, so every rank holds full vectors.
    """

    def _install_steering(self, vllm_config: VllmConfig) -> None:
        decoder = self.model
        text_config = vllm_config.model_config.hf_text_config
        self.steering_num_layers = text_config.num_hidden_layers
        self.steering_hidden_size = text_config.hidden_size
        per_request = per_request_options(vllm_config.additional_config)
        rows, self.steering_index = 1, None
        if per_request is not None:
            # Row 0 stays zero (unsteered requests, padded tokens); each live configuration takes another row.
            rows = per_request[1] + 1
            max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
            self.steering_index = torch.zeros(max_tokens, dtype=torch.int32)
        self.steering_table_rows = rows
        for idx in range(max(decoder.start_layer, 1), decoder.end_layer):
            layer = decoder.layers[idx]
            name = f"model.layers.{idx}.input_layernorm"
            layer.input_layernorm = steered_norm(
                getattr(layer, "input_layernorm", None), name, idx - 1, rows, self.steering_index
            )
        # Some families build the final norm on every pipeline rank; only the last rank runs it.
        if decoder.end_layer == self.steering_num_layers and not isinstance(decoder.norm, PPMissingLayer):
            decoder.norm = steered_norm(
                decoder.norm, "model.norm", self.steering_num_layers - 1, rows, self.steering_index
            )

        self._steering_history: deque[dict] = deque(maxlen=HISTORY_LENGTH)
        self._record_steering(SteeringVectors.zeros(self.steering_num_layers, self.steering_hidden_size))
        path, scale = steering_options(vllm_config.additional_config)
        if path is not None and per_request is None:  # per-request engines resolve the default in the front end
            model_name = vllm_config.model_config.model
            vectors = SteeringVectors.load(path, num_layers=self.steering_num_layers)
            if scale != 1.0:
                vectors = vectors.scale(scale)
            self.set_steering(vectors, model_name)
            logger.info("steering: %s (scale %s), content hash %s", path, scale, vectors.content_hash()[:12])

    def write_steering_row(self, row: int, table: torch.Tensor) -> None:
        """Copy a configuration's [L, d] vectors into row ``row`` of this rank's steered norms, in place."""
        with torch.no_grad():
            for norm in self.steering_norms():
                norm.steering_table[row].copy_(table[norm.steered_layer], non_blocking=True)

    def steering_row(self, row: int) -> torch.Tensor:
        """[L, d] float32: row ``row`` of this rank's tables (zero rows for layers other ranks hold)."""
        return self._with_buffers(torch.zeros(self.steering_num_layers, self.steering_hidden_size), row)

    def steering_norms(self) -> list[SteeringBuffers]:
        return [m for m in self.modules() if isinstance(m, SteeringBuffers)]

    def set_steering(self, vectors: SteeringVectors, model_name: str | None = None) -> str:
        """Copy ``vectors`` into this rank's steering buffers, in place (addresses never change).

        Returns the content hash of what the buffers hold afterwards (``active_steering_table``), so a copy
        that went wrong is reported, not the hash of what was meant to be copied."""
        vectors.check_compatible(self.steering_num_layers, self.steering_hidden_size, model_name)
        table = vectors.to_tensor()
        if self.steering_index is not None:
            raise RuntimeError("steering: this engine serves per-request sets; update them through its front end")
        with torch.no_grad():
            for norm in self.steering_norms():
                norm.steering_table[0].copy_(table[norm.steered_layer])
        self._record_steering(vectors)
        self.steering_hash = table_hash(self.active_steering_table())
        return self.steering_hash

    def _record_steering(self, vectors: SteeringVectors) -> None:
        # Every rank receives the full vectors, so every rank can describe them (and all agree).
        self._steering_received = vectors.to_tensor()
        self.steering_hash = vectors.content_hash()
        self._steering_status = {"source": vectors.source, "model": vectors.model, "set_at": time.time()}
        self._steering_history.append(
            {
                "content_hash": vectors.content_hash(),
                "source": vectors.source,
                "set_at": self._steering_status["set_at"],
            }
        )

    def steering_status(self) -> dict:
        """The active vectors' summary (hash, source, layers, norms), when they were set, and earlier swaps.

        Hash, layers and norms are read from the buffers at each call, so they describe what is served."""
        table = self.active_steering_table()
        summary = {
            "num_layers": self.steering_num_layers,
            "hidden_size": self.steering_hidden_size,
            "layers": [layer for layer, row in enumerate(table) if bool(row.any())],
            "norms": [float(v) for v in table.norm(dim=1)],
            "content_hash": table_hash(table),
        }
        return {**self._steering_status, **summary, "history": list(self._steering_history)}

    def get_steering(self) -> torch.Tensor:
        """[L, d] float32 copy of the vectors this rank holds (zero rows for layers held by other ranks)."""
        return self.steering_row(0)

    def active_steering_table(self) -> torch.Tensor:
        """[L, d]: this rank's buffers for the layers it holds, the vectors it was last sent for the others
        (held by other pipeline ranks). Equal on every rank, and to the sent vectors, unless a copy failed."""
        return self._with_buffers(self._steering_received.clone())

    def _with_buffers(self, table: torch.Tensor, row: int = 0) -> torch.Tensor:
        """``table`` with the rows of the layers this rank steers read from row ``row`` of its buffers."""
        for norm in self.steering_norms():
            table[norm.steered_layer] = norm.steering_table[row].cpu()
        return table


def steered_class(base: type) -> type:
    """``base`` (a vLLM model class) with the steering mixed in: same constructor, norms replaced after it."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self._install_steering(vllm_config)

    name = f"Steered{base.__name__}"
    return type(name, (SteeringMixin, base), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """``Steered<Class>`` for each vLLM class in ``FAMILIES``, built (and its vLLM module imported) on first use,
    so that ``steering_vllm.engine.models:SteeredQwen3ForCausalLM`` resolves as vLLM's registry expects."""
    bases = {f"Steered{cls}": (module, cls) for module, cls in FAMILIES.values()}
    if name not in bases:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CLASSES:
        module, cls = bases[name]
        base = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), cls)
        _CLASSES[name] = steered_class(base)
    return _CLASSES[name]
