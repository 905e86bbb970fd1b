"""The model families the plugin steers: vLLM architecture names and the classes that serve them."""

# Architecture name (a checkpoint's config.json) -> vLLM's module and class for it. Each is served by a steered
# subclass built by ``steering_vllm.models`` (one mechanism for all: the norms are found from the model's own
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
ARCHITECTURES = {name: f"steering_vllm.models:Steered{cls}" for name, (_, cls) in FAMILIES.items()}

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
