"""The model families the plugin steers (vLLM architecture names and the classes that serve them), and the
checks of vectors against a model."""

from __future__ import annotations

import os

from steering_vllm.config import per_request_options, steering_options
from steering_vllm.vectors import SteeringVectors, SteeringVectorsError
from steering_vllm.vectors.foreign import IBM_SVEC, REPENG_GGUF, check_model_hint
from steering_vllm.vectors.foreign.hints import is_hf_model_type

# Architecture name (a checkpoint's config.json) -> vLLM's module and class for it. Each is served by a steered
# subclass built by ``steering_vllm.engine.models`` (one mechanism for all: the norms are found from the model's own
# modules). Every family here keeps the residual as (hidden, residual) and opens each decoder layer with
# ``input_layernorm(hidden, residual)``: DESIGN.md §2.
FAMILIES = {
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("mistral", "MistralForCausalLM"),
    "Ministral3ForCausalLM": ("mistral", "MistralForCausalLM"),  # vLLM serves it with the Mistral class
    # Gemma's norms multiply by 1 + weight (vLLM's GemmaRMSNorm); their layers also norm each branch before its
    # add (post-attention / pre- and post-feedforward norms), which leaves the block output at hidden + residual.
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "GptOssForCausalLM": ("gpt_oss", "GptOssForCausalLM"),
}
ARCHITECTURES = {name: f"steering_vllm.engine.models:Steered{cls}" for name, (_, cls) in FAMILIES.items()}

# Hugging Face norm classes that multiply by ``1 + weight`` (the learner and the logit lens read their weight so);
# every other family's RMSNorm multiplies by ``weight``.
ONE_PLUS_WEIGHT_NORMS = ("Gemma2RMSNorm", "Gemma3RMSNorm")


def norm_weight_offset(norm) -> float:
    """1.0 for a norm that multiplies by ``1 + weight`` (Gemma's), else 0.0: the op's ``weight_offset``."""
    return 1.0 if type(norm).__name__ in ONE_PLUS_WEIGHT_NORMS else 0.0


def architectures(model_config) -> list[str]:
    """The architecture names of a vLLM ``ModelConfig``'s checkpoint."""
    return list(getattr(model_config.hf_config, "architectures", None) or [])


def is_steered(model_config) -> bool:
    """Whether the plugin serves this model (a vLLM ``ModelConfig``) with its steered class."""
    return bool(set(architectures(model_config)) & set(ARCHITECTURES))


def check_vectors_against_model(vllm_config) -> None:
    """Raise SteeringVectorsError unless the configured vectors and sets fit the model (architecture, layers,
    width)."""
    additional_config = vllm_config.additional_config
    path, _ = steering_options(additional_config)
    per_request = per_request_options(additional_config)
    if path is None and per_request is None:
        return
    model_config = vllm_config.model_config
    if not is_steered(model_config):
        what = path if path is not None else "per-request steering sets"
        raise SteeringVectorsError(
            f"{what}: model {model_config.model} is {architectures(model_config)}; "
            f"steering supports {sorted(ARCHITECTURES)}"
        )
    if path is not None:
        vectors_for_model(path, model_config)
    for name, set_path in (per_request or ({}, 0))[0].items():
        try:
            vectors_for_model(set_path, model_config)
        except SteeringVectorsError as e:
            raise SteeringVectorsError(f"steering set {name!r}: {e}") from None


def vectors_for_model(vectors: SteeringVectors | str | os.PathLike, model_config) -> SteeringVectors:
    """``vectors`` (an object or any readable file), checked against the model's layer count and width."""
    text_config = model_config.hf_text_config
    if not isinstance(vectors, SteeringVectors):
        vectors = SteeringVectors.load(vectors, num_layers=text_config.num_hidden_layers)
    vectors.check_compatible(text_config.num_hidden_layers, text_config.hidden_size, model_config.model)
    hint = _model_type_hint(vectors)
    if hint:
        model_types = {getattr(model_config.hf_config, "model_type", None), getattr(text_config, "model_type", None)}
        check_model_hint(hint, sorted(filter(None, model_types)), vectors.source)
    return vectors


def _model_type_hint(vectors: SteeringVectors) -> str | None:
    """The HF model type a file read in another library's format says it was made for, where that library writes
    one: repeng's GGUF (``config.model_type``) and IBM's .svec. llama.cpp's own hints are its architecture names
    ("llama" for Mistral too), a name or path in our writer's GGUF identifies no type, and a converted file is
    not checked again (converting, with ``--expected-model`` if wanted, is the way to use a file elsewhere)."""
    provenance = vectors.provenance
    if provenance.get("source_file") != vectors.source:
        return None
    hint = {IBM_SVEC: provenance.get("model_type"), REPENG_GGUF: provenance.get("model_hint")}.get(
        provenance.get("format")
    )
    return hint if hint and is_hf_model_type(hint) else None
