"""The learner's forward: an HF transformers decoder (the families ``steering_vllm.engine.families`` names),
frozen, with the steering vectors trainable.

It runs the model's own submodules (embeddings, attention, MLP, norms, rotary) but carries ``(hidden,
residual)`` across layers the way vLLM does, so that "residual add + steering vector + next RMSNorm" is one
call of the fused op in its autograd form, the same op the rollout engine runs in place. Layer ``l``'s
vector enters layer ``l+1``'s input norm (the final norm for the last layer); see DESIGN.md §2.

Family differences it follows: per-layer attention masks (sliding windows) and, for Gemma 3, per-layer-type
rotary embeddings; Gemma's norms on both branches of a layer and its ``1 + weight`` norms; attention logit
soft-capping (Gemma 2: eager attention, as SDPA drops the cap) and final logit soft-capping.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from steering_vllm.engine.families import FAMILIES, norm_weight_offset

logger = logging.getLogger(__name__)

SUPPORTED = tuple(FAMILIES)
LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class SteeredLearner(nn.Module):
    """``model`` frozen; the steering vectors (float32) the only parameters that train.

    ``runs`` > 1 holds several training runs' vectors side by side (a sweep): ``run_vectors[r]``
    ([num_layers, hidden_size]) is run r's, and each sequence of a batch reads its own run's rows through the
    fused op's per-token ``index``, so one forward and backward serves every run and each run's gradient lands
    in its own parameter only. ``steering``: the initial vectors, [num_layers, hidden_size] (every run) or
    [runs, num_layers, hidden_size]; None: zeros.
    """

    def __init__(
        self,
        model: nn.Module,
        steering: torch.Tensor | None = None,
        gradient_checkpointing: bool = False,
        runs: int = 1,
    ):
        super().__init__()
        check_steerable(model)
        self.model = model.requires_grad_(False)
        config = model.config
        if getattr(config, "attn_logit_softcapping", None) and config._attn_implementation not in _SOFTCAP_ATTENTION:
            # SDPA ignores the cap, so the learner would score other logits than the engine samples from
            logger.info("learner: %s attention drops attn_logit_softcapping; using eager", config._attn_implementation)
            model.set_attn_implementation("eager")
        shape = (config.num_hidden_layers, config.hidden_size)
        steering = torch.zeros(shape) if steering is None else steering
        initial = [steering] * runs if steering.dim() == 2 else list(steering)
        for number, vectors in enumerate(initial):
            if tuple(vectors.shape) != shape:
                raise ValueError(f"learner: run {number}'s steering has shape {tuple(vectors.shape)}, the model "
                                 f"needs {shape}")  # fmt: skip
        if len(initial) != runs:
            raise ValueError(f"learner: {len(initial)} runs' initial vectors for {runs} runs")
        device = model.get_input_embeddings().weight.device
        self.run_vectors = nn.ParameterList(
            nn.Parameter(vectors.detach().to(device=device, dtype=torch.float32).clone()) for vectors in initial
        )
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def steering(self) -> nn.Parameter:
        """The vectors [num_layers, hidden_size] of a learner with one run."""
        if len(self.run_vectors) != 1:
            raise RuntimeError(f"learner: {len(self.run_vectors)} runs' vectors; use run_vectors[run]")
        return self.run_vectors[0]

    def table(self) -> torch.Tensor:
        """[num_layers, runs, hidden_size]: layer l's rows, one per run (a view when there is one run)."""
        if len(self.run_vectors) == 1:
            return self.run_vectors[0].unsqueeze(1)
        return torch.stack(list(self.run_vectors), dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, runs: torch.Tensor | None = None):
        """Final hidden states [B, T, d] (after the steered final norm), right-padded batches. ``runs`` [B]: the
        run whose vectors each sequence reads (None: run 0 for every sequence)."""
        return steered_hidden_states(self.model, self.table(), input_ids, attention_mask, self.gradient_checkpointing,
                                     runs)  # fmt: skip

    def token_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        temperature: float = 1.0,
        runs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p(token t | tokens < t) at ``temperature``, [B, T-1] float32 (entry t-1 scores token t)."""
        return _logprobs_of_next_tokens(self.model, self(input_ids, attention_mask, runs), input_ids, temperature)

    @torch.no_grad()
    def unsteered_token_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        """``token_logprobs`` of the base model (every vector zero), without gradient: the KL penalty's reference."""
        table = torch.zeros_like(self.run_vectors[0]).unsqueeze(1)
        hidden = steered_hidden_states(self.model, table, input_ids, attention_mask)
        return _logprobs_of_next_tokens(self.model, hidden, input_ids, temperature)


def check_steerable(model) -> None:
    """Raise unless ``model`` is a transformers decoder of a family the learner's forward runs."""
    architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
    if not set(architectures) & set(SUPPORTED):
        raise ValueError(f"learner: model is {architectures}; steering supports {list(SUPPORTED)}")
    for index, layer in enumerate(model.model.layers):
        missing = [part for part in LAYER_PARTS if not hasattr(layer, part)]
        if missing:
            raise ValueError(f"learner: model.layers.{index} ({type(layer).__name__}) has no {missing}")


def _logprobs_of_next_tokens(model, hidden, input_ids, temperature: float) -> torch.Tensor:
    logits = output_logits(model, hidden[:, :-1]) / temperature
    return logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]


_SOFTCAP_ATTENTION = ("eager", "flex_attention")  # HF attention implementations that apply the cap


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits of final hidden states, at least float32, soft-capped where the model caps them."""
    logits = model.get_output_embeddings()(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def steered_hidden_states(
    model, table, input_ids, attention_mask, gradient_checkpointing=False, runs=None, streams: list | None = None
):
    """``table`` [num_layers, R, d]: layer l's vectors for each of R runs; ``runs`` [B]: each sequence's row
    (None: row 0, the fused op's single-row path). ``streams``: a list that receives the residual stream at the
    end of each decoder layer l, its vector added ([B, T, d], l = 0 .. num_layers-1: where ``layers.{l}`` acts)."""
    if streams is not None and gradient_checkpointing and torch.is_grad_enabled():
        raise ValueError(
            "learner: streams are read without gradient checkpointing (its recompute would add them twice)"
        )
    decoder = model.model
    index = None if runs is None else runs.to(input_ids.device)[:, None].expand(input_ids.shape).reshape(-1)
    embeds = decoder.embed_tokens(input_ids)  # Gemma's embedding module scales by sqrt(d) itself
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    types = layer_types(decoder.config)
    masks = attention_masks(decoder.config, types, embeds, attention_mask, position_ids)
    rotaries = rotary_embeddings(decoder.rotary_emb, types, embeds, position_ids)
    hidden, residual = None, embeds
    for number, (layer, mask, rotary) in enumerate(zip(decoder.layers, masks, rotaries, strict=True)):
        rows = table[number - 1] if number > 0 else None
        if gradient_checkpointing and torch.is_grad_enabled():
            hidden, residual = checkpoint(
                _layer, layer, hidden, residual, rows, index, mask, rotary, position_ids, use_reentrant=False
            )
        else:
            hidden, residual = _layer(layer, hidden, residual, rows, index, mask, rotary, position_ids, streams)
    out, last = steered_norm(hidden, residual, table[-1], decoder.norm, index)
    if streams is not None:
        streams.append(last)
    return out


def layer_types(config) -> list[str]:
    """Each layer's attention type: ``config.layer_types``, or for Mistral's single ``sliding_window`` every
    layer sliding."""
    types = list(getattr(config, "layer_types", None) or [])
    if not types:
        sliding = getattr(config, "sliding_window", None) is not None
        types = ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("learner: use_bidirectional_attention models are not causal decoders; not supported")
    return types


def attention_masks(config, types, embeds, attention_mask, position_ids) -> list:
    """Each layer's attention mask, as the HF model builds them: causal, or causal within a sliding window for
    the layers whose type is ``sliding_attention``."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    arguments = dict(config=config, inputs_embeds=embeds, attention_mask=attention_mask, past_key_values=None,
                     position_ids=position_ids)  # fmt: skip
    builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    unknown = set(types) - set(builders)
    if unknown:
        raise ValueError(f"learner: layer types {sorted(unknown)} are not supported (only {sorted(builders)})")
    built = {kind: builders[kind](**arguments) for kind in set(types)}
    return [built[kind] for kind in types]


def rotary_embeddings(rotary_emb, types, embeds, position_ids) -> list:
    """Each layer's (cos, sin): one for all layers, or one per layer type where the model has a RoPE per type
    (Gemma 3: local and global bases)."""
    if "layer_type" not in inspect.signature(rotary_emb.forward).parameters:
        return [rotary_emb(embeds, position_ids)] * len(types)
    built = {kind: rotary_emb(embeds, position_ids, kind) for kind in set(types)}
    return [built[kind] for kind in types]


def _layer(layer, hidden, residual, rows, index, mask, rotary, position_ids, streams=None):
    if rows is None:  # layer 0: its input is the embeddings, never steered
        hidden = layer.input_layernorm(residual)
    else:
        hidden, residual = steered_norm(hidden, residual, rows, layer.input_layernorm, index)
        if streams is not None:  # the previous layer's output, its vector added
            streams.append(residual)
    attention = layer.self_attn(
        hidden_states=hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids
    )[0]
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: each branch normed before its add
        residual = residual + layer.post_attention_layernorm(attention)
        hidden = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(residual)))
    else:
        residual = residual + attention
        hidden = layer.mlp(layer.post_attention_layernorm(residual))
        if isinstance(hidden, tuple):  # GPT-OSS's MoE block also returns its router scores
            hidden = hidden[0]
    return hidden, residual


def steered_norm(hidden, residual, rows, norm, index=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(hidden + residual + vector), hidden + residual + vector) with the fused op; [B, T, d] in and out.
    ``rows`` [R, d]; ``index`` [B*T]: each token's row (None: row 0)."""
    shape = residual.shape
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    y, residual_out = kernels.fused_add_steer_rms_norm(
        hidden.reshape(-1, shape[-1]),
        residual.reshape(-1, shape[-1]),
        rows,
        index,
        norm.weight,
        eps,
        norm_weight_offset(norm),
    )
    return y.view(shape), residual_out.view(shape)
