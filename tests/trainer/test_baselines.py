"""The ``full`` and ``lora`` trainables: the learner starts at the base model, trains what it should, keeps a base
reference, round-trips its state; and a real vLLM engine serves exactly the learner's weights after ``sync``."""

from __future__ import annotations

import json
import os
import shutil
import types

import pytest
import torch
from engine_utils import greedy, max_abs_diff, random_prompts, shutdown, start_engine, teacher_forced
from tiny_models import VOCAB_SIZE

from trainer.baselines import FullTrainable, LoraTrainable, layer_buckets
from trainer.full_weights_worker import EXTENSION as FULL_WEIGHTS_EXTENSION

KINDS = ("full", "lora")
RANK, ALPHA = 4, 8
PROMPT_LENGTH = 400  # three full KV blocks of 128: the second generate reuses cached prompt blocks
MAX_TOKENS = 8


def _model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def _trainable(kind, model, gradient_checkpointing=False):
    if kind == "full":
        return FullTrainable(model, gradient_checkpointing)
    return LoraTrainable(model, gradient_checkpointing, RANK, ALPHA)


def _batch(seed=0, batch=2, length=24):
    """Random tokens, right-padded: the second row has 5 padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB_SIZE, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -5:] = 0
    return ids, mask


def _hf_logprobs(model, ids, mask, temperature=1.0):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]


def _train(trainable, steps=3, lr=1e-2, seed=1):
    """A few Adam steps lowering the likelihood of random text (any direction would do)."""
    optimizer = torch.optim.Adam(trainable.parameters(), lr=lr)
    ids, mask = _batch(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        trainable.learner.token_logprobs(ids, mask).mean().backward()
        optimizer.step()


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _close(a, b, atol=1e-5):
    valid = _batch()[1][:, 1:].bool()
    return torch.allclose(a[valid], b[valid], atol=atol, rtol=0)


# --- learner side ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("kind", KINDS)
def test_starts_at_the_base_model(tiny_model_dirs, kind, family):
    base = _model(tiny_model_dirs[family])
    trainable = _trainable(kind, _model(tiny_model_dirs[family]))
    ids, mask = _batch()
    expected = _hf_logprobs(base, ids, mask)
    assert _close(trainable.learner.token_logprobs(ids, mask), expected)
    assert _close(trainable.reference_logprobs(ids, mask), expected)
    assert _close(trainable.reference_logprobs(ids, mask, temperature=0.7), _hf_logprobs(base, ids, mask, 0.7))
    assert list(trainable.metrics().values()) == [0.0]


def test_full_trains_every_weight_and_not_the_steering(tiny_model_dirs):
    model = _model(tiny_model_dirs["qwen2"])
    trainable = FullTrainable(model, gradient_checkpointing=False)
    assert {id(p) for p in trainable.parameters()} == {id(p) for p in model.parameters()}
    assert all(p is not trainable.learner.steering for p in trainable.parameters())
    assert trainable.lora_request() is None
    assert trainable.engine_kwargs() == {"worker_extension_cls": FULL_WEIGHTS_EXTENSION}
    before = _snapshot(model)
    _train(trainable)
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert moved == list(before)
    assert trainable.learner.steering.grad is None and not trainable.learner.steering.any()
    assert trainable.metrics()["weight_update_norm"] > 0


def test_lora_trains_only_the_adapters_on_down_proj(tiny_model_dirs):
    model = _model(tiny_model_dirs["qwen2"])
    trainable = LoraTrainable(model, gradient_checkpointing=False, rank=RANK, alpha=ALPHA)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert names == {name for name, _ in model.named_parameters() if ".lora_" in name}
    assert all(".mlp.down_proj.lora_" in name for name in names) and len(names) == 2 * model.config.num_hidden_layers
    assert {id(p) for p in trainable.parameters()} == {id(p) for name, p in model.named_parameters() if name in names}
    before = _snapshot(model)
    _train(trainable)  # B starts at zero, so A first moves in step 2
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in names), name
    assert trainable.learner.steering.grad is None and not trainable.learner.steering.any()
    assert trainable.metrics()["lora_update_norm"] > 0


@pytest.mark.parametrize("kind", KINDS)
def test_reference_stays_the_base_model_while_training(tiny_model_dirs, kind):
    base = _model(tiny_model_dirs["qwen2"])
    model = _model(tiny_model_dirs["qwen2"])
    trainable = _trainable(kind, model)
    _train(trainable)
    ids, mask = _batch(seed=5)
    trained = trainable.learner.token_logprobs(ids, mask).detach()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    after = _snapshot(model)
    reference = trainable.reference_logprobs(ids, mask)
    assert not reference.requires_grad
    assert _close(reference, _hf_logprobs(base, ids, mask))
    assert not _close(trained, reference, atol=1e-2)
    # the trained state is back, untouched
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(torch.equal(p, after[name]) for name, p in model.named_parameters())
    assert torch.equal(trainable.learner.token_logprobs(ids, mask).detach(), trained)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dirs, kind):
    ids, mask = _batch(seed=3)
    grads = []
    for checkpointing in (False, True):
        trainable = _trainable(kind, _model(tiny_model_dirs["qwen2"]), checkpointing)
        if kind == "lora":  # nonzero B, so that A has a gradient too
            torch.manual_seed(0)
            with torch.no_grad():
                for p in trainable.parameters():
                    p.normal_(0, 0.1)
        trainable.learner.token_logprobs(ids, mask).mean().backward()
        grads.append([p.grad.clone() for p in trainable.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(tiny_model_dirs, kind):
    ids, mask = _batch(seed=4)
    trained = _trainable(kind, _model(tiny_model_dirs["qwen2"]))
    _train(trained)
    state = trained.state_dict()
    expected = trained.learner.token_logprobs(ids, mask).detach()
    assert all(t.device.type == "cpu" for t in next(iter(state.values())).values())
    _train(trained, steps=1, seed=9)  # the saved state is a copy, not a view of the live weights
    assert not torch.equal(trained.learner.token_logprobs(ids, mask).detach(), expected)
    resumed = _trainable(kind, _model(tiny_model_dirs["qwen2"]))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.learner.token_logprobs(ids, mask).detach(), expected)
    assert _close(resumed.reference_logprobs(ids, mask), trained.reference_logprobs(ids, mask))
    with pytest.raises(ValueError, match="does not match"):
        resumed.load_state_dict({key: {} for key in state})


def test_full_save_is_a_loadable_checkpoint(tiny_model_dirs, tmp_path):
    trainable = FullTrainable(_model(tiny_model_dirs["qwen2"]), gradient_checkpointing=False)
    _train(trainable)
    trainable.save(tmp_path)
    _train(trainable, steps=1)
    path = trainable.save(tmp_path)  # over the previous one
    assert path == tmp_path / "model" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    ids, mask = _batch(seed=6)
    assert _close(_hf_logprobs(_model(path), ids, mask), trainable.learner.token_logprobs(ids, mask).detach())


def test_lora_save_is_a_peft_adapter(tiny_model_dirs, tmp_path):
    from peft import PeftModel

    trainable = LoraTrainable(_model(tiny_model_dirs["qwen2"]), False, RANK, ALPHA)
    _train(trainable)
    trainable.save(tmp_path)
    path = trainable.save(tmp_path)
    assert path == tmp_path / "lora_adapter" and sorted(p.name for p in tmp_path.iterdir()) == ["lora_adapter"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (RANK, ALPHA, ["down_proj"])
    loaded = PeftModel.from_pretrained(_model(tiny_model_dirs["qwen2"]), str(path))
    ids, mask = _batch(seed=6)
    assert _close(_hf_logprobs(loaded, ids, mask), trainable.learner.token_logprobs(ids, mask).detach())


@pytest.mark.parametrize(("rank", "max_rank"), [(1, 1), (4, 8), (16, 16), (17, 32), (300, 320)])
def test_lora_engine_kwargs_round_the_rank_up_to_vllms_sizes(tiny_model_dirs, rank, max_rank):
    trainable = LoraTrainable(_model(tiny_model_dirs["qwen2"]), False, rank, 2 * rank)
    assert trainable.engine_kwargs() == {"enable_lora": True, "max_lora_rank": max_rank, "max_loras": 1}


def test_lora_requests_are_new_per_sync_and_old_adapters_removed(tiny_model_dirs):
    trainable = LoraTrainable(_model(tiny_model_dirs["qwen2"]), False, RANK, ALPHA)
    first = trainable.lora_request()
    assert first is not None and (first.lora_int_id, first.lora_name) == (1, "trainable-lora-1")
    trainable.sync(engine=None)
    second = trainable.lora_request()
    assert second.lora_int_id == 2 and second.lora_name != first.lora_name and second.lora_path != first.lora_path
    assert {p.name for p in os.scandir(second.lora_path)} == {"adapter_config.json", "adapter_model.safetensors"}
    assert not os.path.exists(first.lora_path)


def test_sync_buckets_hold_whole_layers_in_order(tiny_model_dirs):
    model = _model(tiny_model_dirs["qwen2"])
    names = [name for name, _ in model.named_parameters()]
    one_each = layer_buckets(model.named_parameters(), 1, torch.bfloat16)

    def owners(bucket):
        return {n.split(".")[2] if n.startswith("model.layers.") else n.rsplit(".", 1)[0] for n, _ in bucket}

    assert all(len(owners(b)) == 1 for b in one_each)  # a bucket never splits a layer, nor mixes two at size 1
    assert [n for b in one_each for n, _ in b] == names  # every parameter once, in order
    layers = model.config.num_hidden_layers
    assert len(one_each) == layers + 3  # embeddings, each layer, final norm, lm_head
    everything = layer_buckets(model.named_parameters(), 2**40, torch.bfloat16)
    assert len(everything) == 1 and [n for n, _ in everything[0]] == names
    limit = 2 * sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0.")) * 2
    packed = layer_buckets(model.named_parameters(), limit, torch.bfloat16)
    assert len(everything) < len(packed) < len(one_each)
    assert all(sum(p.numel() for _, p in b) * 2 <= limit for b in packed if len(owners(b)) > 1)


# --- engine side: vLLM serves the learner's weights after sync ------------------------------------------------


def _tied_copy(model_dir, directory):
    """The tiny checkpoint with lm_head tied to the embeddings (vLLM then loads no lm_head of its own)."""
    model = _model(model_dir)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(directory)
    for path in model_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, directory / path.name)
    return directory


def _run_engine(model_dir, kind, prompts, bucket_bytes=None):
    """Generate, train the learner, sync, generate again; the HF model's own view of both generations."""
    model = _model(model_dir)
    trainable = _trainable(kind, model)
    if bucket_bytes is not None:
        trainable.sync_bucket_bytes = bucket_bytes
    llm = start_engine(model_dir, enforce_eager=True, **trainable.engine_kwargs())
    try:
        runs = {"base": greedy(llm, prompts, MAX_TOKENS)}  # fills the prefix cache with the base model's blocks
        runs["first"] = greedy(llm, prompts, MAX_TOKENS, lora_request=trainable.lora_request())
        runs["base_hf"] = teacher_forced(model, prompts, runs["base"])
        _train(trainable, steps=3, lr=0.05)
        trainable.sync(types.SimpleNamespace(llm=llm))  # as the trainer passes it: a RolloutEngine
        runs["synced"] = greedy(llm, prompts, MAX_TOKENS, lora_request=trainable.lora_request())
        runs["synced_hf"] = teacher_forced(model, prompts, runs["synced"])
        runs["synced_base_hf"] = teacher_forced(_model(model_dir), prompts, runs["synced"])
    finally:
        shutdown(llm)
    return runs


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(2, PROMPT_LENGTH, VOCAB_SIZE, seed=21)


@pytest.fixture(scope="module", params=["full", "full-tied", "lora"])
def engine_runs(request, tiny_model_dirs, prompts, tmp_path_factory):
    kind, _, tied = request.param.partition("-")
    model_dir = tiny_model_dirs["qwen2"]
    if tied:
        model_dir = _tied_copy(model_dir, tmp_path_factory.mktemp("tied"))
    # untied: one decoder layer per RPC (the engine must keep the layers a payload does not carry); tied: one RPC
    return _run_engine(model_dir, kind, prompts, bucket_bytes=None if tied else 1)


@pytest.mark.engine
@pytest.mark.slow
def test_engine_starts_at_the_base_model(engine_runs):
    for ours, hf in zip(engine_runs["base"], engine_runs["base_hf"], strict=True):
        assert ours["tokens"] == hf["argmax"]
        assert max_abs_diff(ours["logprobs"], hf["logprobs"]) < 3e-5  # measured <= 2.9e-6 (fp32; full and LoRA)
    for through_trainable, base in zip(engine_runs["first"], engine_runs["base"], strict=True):
        assert through_trainable["tokens"] == base["tokens"]
        assert max_abs_diff(through_trainable["logprobs"], base["logprobs"]) < 1e-4


@pytest.mark.engine
@pytest.mark.slow
def test_engine_serves_the_trained_weights_after_sync(engine_runs):
    for ours, hf in zip(engine_runs["synced"], engine_runs["synced_hf"], strict=True):
        assert ours["tokens"] == hf["argmax"]
        assert max_abs_diff(ours["logprobs"], hf["logprobs"]) < 3e-5  # measured <= 2.9e-6 (fp32; full and LoRA)
    # and training changed what it serves: the base model scores those tokens differently
    pairs = zip(engine_runs["synced_hf"], engine_runs["synced_base_hf"], strict=True)
    base_view = [max_abs_diff(hf["logprobs"], base["logprobs"]) for hf, base in pairs]
    assert max(base_view) > 0.05
