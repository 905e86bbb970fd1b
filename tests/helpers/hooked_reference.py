"""The learner's reference: HF forward hooks adding s_l to decoder layer l's output (the method's definition),
and the check of ``SteeredLearner``'s logprobs and gradient against it."""

import torch

from trainer.learner import SteeredLearner


def hooked_logprobs(model, table, ids, mask, temperature=1.0):
    """The method's definition: s_l added to decoder layer l's output (forward hooks), plain HF forward; the
    logprobs of log softmax(logits / temperature)."""
    handles = [
        block.register_forward_hook(lambda module, args, out, v=table[layer]: out + v)
        for layer, block in enumerate(model.model.layers)
    ]
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    finally:
        for handle in handles:
            handle.remove()
    return (logits / temperature).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]


def check_against_hooks(model, checkpointing, atol=1e-6):
    config = model.config
    table = torch.randn(config.num_hidden_layers, config.hidden_size, dtype=torch.float64) * 0.3
    ids = torch.randint(1, config.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding
    mask[2, 9:] = 0

    reference_table = table.clone().requires_grad_(True)
    reference = hooked_logprobs(model, reference_table, ids, mask)
    valid = mask[:, 1:].bool()
    (reference * valid).sum().backward()

    learner = SteeredLearner(model, table.float(), gradient_checkpointing=checkpointing)
    learner.steering.data = table.clone()  # float64 throughout for the comparison
    ours = learner.token_logprobs(ids, mask)
    (ours * valid).sum().backward()

    # HF's RMSNorm computes in float32 even in a float64 model: differences of ~1e-7 are its rounding; a
    # vector in the wrong place or a broken gradient is off by orders of magnitude more.
    assert torch.allclose(ours[valid], reference[valid], atol=atol, rtol=0)
    assert torch.allclose(learner.steering.grad, reference_table.grad, atol=atol, rtol=1e-5)
    assert reference_table.grad.abs().max() > 0.1
    assert not any(p.requires_grad for p in model.parameters())
