"""What the trainer trains (``--trainable``): the steering vectors, or, as baselines with everything else
identical, all weights (``full``) or a rank-r LoRA on the MLP down-projection (``lora``, the paper's App. D).

Each kind builds the learner's parameters, tells the rollout engine how to start, pushes new weights into it
after an optimizer step, saves what it trained, and checkpoints its own state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from steering_vllm import SteeringVectors
from trainer.learner import SteeredLearner

VECTORS_FILE = "steering_vectors.safetensors"


class Trainable(Protocol):
    learner: SteeredLearner

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates (and DDP all-reduces)."""

    def engine_kwargs(self) -> dict:
        """Extra ``vllm.LLM`` keyword arguments this kind needs (e.g. ``enable_lora``)."""

    def sync(self, engine) -> None:
        """Make the engine sample from the learner's current weights (in place; prefix cache consistent)."""

    def lora_request(self):
        """The ``LoRARequest`` to generate with, or None."""

    def save(self, output_dir: Path) -> Path:
        """Write what was trained into ``output_dir`` (atomically); returns the path."""

    def state_dict(self) -> dict:
        """The trained tensors, for checkpoints (CPU)."""

    def load_state_dict(self, state: dict) -> None: ...

    def metrics(self) -> dict:
        """Per-step numbers worth logging (e.g. per-layer vector norms)."""

    def reference_logprobs(self, input_ids, attention_mask, temperature: float) -> torch.Tensor:
        """Token logprobs of the untrained base model (the KL penalty's reference), without gradient."""


class SteeringTrainable:
    """The method: one vector per layer, the only trainable parameters; synced by ``update_steering``.

    In a sweep, several runs share one learner (``SteeredLearner(runs=R)``): each run's trainable is a view of
    its own row (``run``) and syncs it as its own per-request set (``set_name``) of the one engine.
    """

    def __init__(self, model, initial: torch.Tensor | None, gradient_checkpointing: bool, model_name: str,
                 learner: SteeredLearner | None = None, run: int = 0, set_name: str | None = None):  # fmt: skip
        self.learner = learner if learner is not None else SteeredLearner(model, initial, gradient_checkpointing)
        self.model_name = model_name
        self.set_name = set_name
        self.vector_parameter = self.learner.run_vectors[run]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.vector_parameter]

    def engine_kwargs(self) -> dict:
        return {}

    def sync(self, engine) -> None:
        engine.sync_steering(self.vector_parameter, self.set_name)

    def lora_request(self):
        return None

    def extra_args(self) -> dict | None:
        """What this run's requests ask the engine for: its own set in a sweep, else the engine's vectors."""
        return None if self.set_name is None else {"steering": self.set_name}

    def vectors(self) -> SteeringVectors:
        return SteeringVectors.from_tensor(self.vector_parameter.detach().cpu(), model=self.model_name)

    def save(self, output_dir: Path) -> Path:
        return self.vectors().save(output_dir / VECTORS_FILE)

    def state_dict(self) -> dict:
        return {"steering": self.vector_parameter.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.vector_parameter.copy_(state["steering"])

    def metrics(self) -> dict:
        return {"vector_norms": [round(float(n), 6) for n in self.vector_parameter.detach().norm(dim=1)]}

    def reference_logprobs(self, input_ids, attention_mask, temperature: float) -> torch.Tensor:
        return self.learner.unsteered_token_logprobs(input_ids, attention_mask, temperature)


def build_sweep(model, configs: list, model_name: str) -> list[SteeringTrainable]:
    """One learner holding every run's vectors, and each run's trainable (a view of its row, synced as the
    per-request set ``run{r}``)."""
    num_layers = model.config.num_hidden_layers
    shape = (num_layers, model.config.hidden_size)
    initial = torch.stack([SteeringVectors.load(c.init_vectors, num_layers).to_tensor() if c.init_vectors
                           else torch.zeros(shape) for c in configs])  # fmt: skip
    learner = SteeredLearner(model, initial, configs[0].gradient_checkpointing, runs=len(configs))
    return [SteeringTrainable(model, None, False, model_name, learner, run, f"run{run}") for run in range(len(configs))]


def build_trainable(kind: str, model, config, model_name: str, tokenizer=None) -> Trainable:
    num_layers = model.config.num_hidden_layers
    if kind == "steering":
        initial = SteeringVectors.load(config.init_vectors, num_layers).to_tensor() if config.init_vectors else None
        return SteeringTrainable(model, initial, config.gradient_checkpointing, model_name)
    from trainer import baselines

    if kind == "full":
        return baselines.FullTrainable(model, config.gradient_checkpointing, tokenizer)
    if kind == "lora":
        return baselines.LoraTrainable(model, config.gradient_checkpointing, config.lora_rank, config.lora_alpha)
    raise ValueError(f"unknown trainable {kind!r}; expected 'steering', 'full' or 'lora'")
