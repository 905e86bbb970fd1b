"""Tiny checkpoints of each steered family (Qwen2, Qwen3, Qwen3-MoE, Llama, Mistral, Gemma 2, Gemma 3, GPT-OSS) built
from configs (random weights, norm weights and biases included; a BPE tokenizer trained here).

head_dim is 64 because vLLM's CPU attention does not support smaller heads (DESIGN.md §5).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB_SIZE = 512
HIDDEN_SIZE = 128
NUM_LAYERS = 4


def _corpus():
    words = "the a one two three four five six seven eight nine ten plus minus times equals answer is so".split()
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        idx = torch.randint(len(words), (12,), generator=g)
        yield " ".join(words[i] for i in idx) + f" {int(torch.randint(1000, (1,), generator=g))}."


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


GEMMA = {
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 64,
    "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
}
# family -> (HF config class, HF model class, config options beyond the common ones)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    # vLLM's CPU MoE kernels need hidden and expert sizes that are multiples of 32
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "norm_topk_prob": True}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    # Gemma: tied embeddings (vLLM's Gemma 2 has no lm_head), sliding windows shorter than the test prompts, and
    # soft caps low enough that dropping one moves the logprobs of a model this small
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {**GEMMA, "final_logit_softcapping": 3.0, "attn_logit_softcapping": 1.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**GEMMA, "final_logit_softcapping": None}),
    # GPT-OSS: unquantized (vLLM's CPU MXFP4 MoE needs AMX), attention sinks, biased MoE experts, sliding windows
    # shorter than the test prompts; eps 1e-5, which vLLM hard-codes for this family
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64, "rms_norm_eps": 1e-5,
                 "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 2}),
}  # fmt: skip


def build_tiny_model(directory: Path, family: str, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of ``family`` (a key of ``FAMILIES``) and its tokenizer to ``directory``."""
    import transformers

    directory = Path(directory)
    tokenizer = build_tokenizer(directory)
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=256,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.05,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    if family not in FAMILIES:
        raise ValueError(f"{family}: not one of {sorted(FAMILIES)}")
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**common, **extra})
    model_class = getattr(transformers, model_name)
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    randomise_norms_and_biases(model, seed)
    model.save_pretrained(directory)
    return directory


def randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    """Norm weights away from 1 and non-zero biases: with the defaults (ones, zeros) a norm wired to the wrong
    weight, or a bias dropped, gives the same numbers and passes every parity test."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # input / post-attention norms, model.norm, Qwen3's q_norm / k_norm
                # Gemma's norms multiply by 1 + weight: its weights sit around 0
                centre = 0.0 if type(model).__name__.startswith("Gemma") else 1.0
                p.copy_(centre + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith((".bias", "_bias")):  # Qwen2's q/k/v projections, GPT-OSS's attention and experts
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith(".sinks"):  # GPT-OSS's attention sinks (zeros would hide a sink left out)
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
