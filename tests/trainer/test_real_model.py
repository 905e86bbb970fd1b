"""The real-model fixture (trainer.real_model) and what the trainer reads of it: the GSM8K split, every GSM8K and
AIME 2025 gold through the real reward, and the learner's steered forward on SmolLM2 (tied embeddings, 30
layers, a 49K vocabulary) against HF forward hooks in float64."""

import json
from pathlib import Path

import pytest
import torch
from hooked_reference import check_against_hooks
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from trainer.data import load_examples
from trainer.real_model import GSM8K_PROBLEMS, HELDOUT_SIZE
from trainer.rewards import RewardPool, Score


def _lines(path) -> list[str]:
    return [line for line in Path(path).read_text().splitlines() if line.strip()]


def test_gsm8k_test_is_split_into_500_held_out_and_819_to_train_on_with_no_overlap(real_fixture):
    heldout, train = _lines(real_fixture["gsm8k_heldout"]), _lines(real_fixture["gsm8k_train"])
    source = [json.loads(line) for line in _lines(real_fixture["gsm8k_test"])]
    assert len(heldout) == HELDOUT_SIZE and len(train) == GSM8K_PROBLEMS - HELDOUT_SIZE
    questions = lambda lines: {json.loads(line)["question"] for line in lines}  # noqa: E731
    assert not questions(heldout) & questions(train)
    assert questions(heldout) | questions(train) == {row["question"] for row in source}


@pytest.fixture(scope="module")
def rewards():
    with RewardPool(mode="binary", workers=2, timeout_s=30.0) as pool:
        yield pool


def test_every_gsm8k_gold_boxed_scores_correct_and_gold_plus_one_does_not(real_fixture, rewards):
    examples = load_examples(real_fixture["gsm8k_test"], "question", "answer")
    golds = [example.answer for example in examples]
    assert len(golds) == GSM8K_PROBLEMS and all(gold.lstrip("-").replace(".", "").isdigit() for gold in golds)
    boxed = [f"So the answer is \\boxed{{{gold}}}." for gold in golds]
    assert set(rewards.score(boxed, golds)) == {Score(1.0, "correct")}
    off_by_one = [f"So the answer is \\boxed{{{float(gold) + 1:g}}}." for gold in golds]
    assert set(rewards.score(off_by_one, golds)) == {Score(0.0, "wrong")}


def test_every_aime_2025_gold_boxed_scores_correct(real_fixture, rewards):
    examples = [e for path in real_fixture["aime2025"] for e in load_examples(path, "question", "answer")]
    golds = [example.answer for example in examples]
    assert len(golds) == 30 and "336^\\circ" in golds
    assert set(rewards.score([f"\\boxed{{{gold}}}" for gold in golds], golds)) == {Score(1.0, "correct")}
    assert set(rewards.score(["\\boxed{1000}"] * 30, golds)) == {Score(0.0, "wrong")}


def test_the_fixture_is_a_real_pretrained_model_with_its_chat_template(real_fixture):
    config = json.loads((Path(real_fixture["model"]) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576 and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    tokenizer = AutoTokenizer.from_pretrained(real_fixture["model"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def _rms_norm_in_input_dtype(self, hidden):
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


def test_the_learner_matches_hf_hooks_on_the_real_model_with_tied_embeddings(real_fixture, monkeypatch):
    # HF's RMSNorm rounds to float32 inside a float64 model, and over 30 layers of real weights that rounding moved
    # the logprobs by up to 8e-6 (measured over six seeds; one CI seed went past 5e-5). Both sides compute their
    # norms in float64 here, so what is left is summation order: 9e-14 in the logprobs, 3e-14 in the gradient
    # (measured). The same vectors one layer off move the logprobs by 1.9.
    monkeypatch.setattr(LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        real_fixture["model"], dtype=torch.float64, attn_implementation="eager"
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    check_against_hooks(model.eval(), checkpointing=True, atol=1e-12)
