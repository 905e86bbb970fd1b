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
}
ARCHITECTURES = {name: f"steering_vllm.models:Steered{cls}" for name, (_, cls) in FAMILIES.items()}
