"""Table 3's learner measurements on the shipped toy model (no engine): counts and optimizer bytes are exact."""

import pytest
import torch

from benchmarks.bench_training import TOY, build_model, build_trainable, table, time_learner


@pytest.mark.parametrize("kind", ["steering", "full", "lora"])
def test_the_learner_step_is_measured_with_the_trainers_parameters(kind):
    model = build_model(TOY, torch.float32, torch.device("cpu"))
    config, total = model.config, sum(p.numel() for p in model.parameters())
    trainable = build_trainable(kind, model, lora_rank=1)
    expected = {
        "steering": config.num_hidden_layers * config.hidden_size,
        "full": total,
        "lora": config.num_hidden_layers * (config.intermediate_size + config.hidden_size),
    }[kind]
    parameters = sum(p.numel() for p in trainable.parameters())
    assert parameters == expected
    before = [p.detach().clone() for p in trainable.parameters()]
    result = time_learner(trainable, batch=4, tokens=16, steps=1, device=torch.device("cpu"))
    assert result["optimizer_bytes"] == 2 * 4 * parameters  # AdamW: exp_avg and exp_avg_sq, fp32
    assert result["step"] == pytest.approx(result["forward"] + result["backward"] + result["optimizer"])
    assert min(result["forward"], result["backward"], result["optimizer"]) > 0
    # the timed steps really trained: every trainable tensor moved (LoRA's A waits for B to leave zero)
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, trainable.parameters(), strict=True)]
    assert any(moved) if kind == "lora" else all(moved)


def test_the_table_puts_ratios_against_steering_side_by_side():
    common = {"shape": "toy", "dtype": "float32", "batch": "2x8", "model_parameters": 1000, "peak_gib": None}
    rows = [
        {**common, "kind": "steering", "parameters": 10, "optimizer_bytes": 80, "forward": 1.0, "backward": 2.0,
         "optimizer": 0.001, "step": 3.001, "sync": 0.01},
        {**common, "kind": "full", "parameters": 1000, "optimizer_bytes": 8000, "forward": 1.0, "backward": 3.0,
         "optimizer": 0.1, "step": 4.1, "sync": 0.5},
    ]  # fmt: skip
    text = table(rows)
    assert "| trainable parameters | 10 | 1,000 | 100.0x |" in text
    assert "| sync into vLLM (s) | 0.0100 | 0.5000 | 50.0x |" in text
    assert "peak memory" not in text  # CPU: not measured, so not shown
