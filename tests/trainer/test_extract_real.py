"""Extraction on the real SmolLM2-135M-Instruct (the real-model fixture): a sentiment vector from the 32 pairs of
``examples/sentiment_pairs.jsonl`` reads, through the logit lens, as positive against negative words, and added
at one middle layer it moves the model's next words that way (and the other way when negated)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.extract import extract, read_pairs
from trainer.learner import SteeredLearner

pytestmark = pytest.mark.slow

PAIRS = Path(__file__).parents[2] / "examples" / "sentiment_pairs.jsonl"
POSITIVE, NEGATIVE = [" wonderful", " great", " happy"], [" terrible", " awful", " sad"]


@pytest.fixture(scope="module")
def extracted(real_fixture):
    tokenizer = AutoTokenizer.from_pretrained(real_fixture["model"])
    model = AutoModelForCausalLM.from_pretrained(real_fixture["model"], dtype=torch.float32).eval()
    vectors = extract(model, tokenizer, read_pairs(PAIRS), position="mean", chat_template=True, progress=False)
    return model, tokenizer, vectors


def _first_token(tokenizer, word):
    return tokenizer(word, add_special_tokens=False)["input_ids"][0]


def test_the_logit_lens_reads_positive_against_negative_words_in_the_late_layers(extracted):
    model, tokenizer, vectors = extracted
    unembedding = model.get_output_embeddings().weight.detach().float()
    directions = vectors.to_tensor() * model.model.norm.weight.detach()
    rows = torch.nn.functional.normalize(unembedding, dim=-1)
    cosine = torch.nn.functional.normalize(directions, dim=-1) @ rows.T  # [L, V]
    positive = cosine[:, [_first_token(tokenizer, w) for w in POSITIVE]].mean(dim=1)
    negative = cosine[:, [_first_token(tokenizer, w) for w in NEGATIVE]].mean(dim=1)
    late = slice(20, 30)
    assert (positive[late] > negative[late]).all(), (positive[late], negative[late])


def test_added_at_a_middle_layer_it_moves_the_next_word_its_way(extracted):
    model, tokenizer, vectors = extracted
    text = tokenizer.apply_chat_template([{"role": "user", "content": "How was your weekend?"}],
                                         add_generation_prompt=True, tokenize=False) + "It was"  # fmt: skip
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    positive_ids = [_first_token(tokenizer, w) for w in POSITIVE]
    negative_ids = [_first_token(tokenizer, w) for w in NEGATIVE]

    def margin(scale):
        """log p(positive words) - log p(negative words) for the word after "It was", vectors at layer 15."""
        table = torch.zeros(30, 576)
        table[15] = scale * vectors.to_tensor()[15]
        learner = SteeredLearner(model, table)
        with torch.no_grad():
            hidden = learner(ids, torch.ones_like(ids))[:, -1]
            logprobs = model.get_output_embeddings()(hidden).log_softmax(-1)[0]
        return float(logprobs[positive_ids].logsumexp(0) - logprobs[negative_ids].logsumexp(0))

    base, toward, away = margin(0.0), margin(2.0), margin(-2.0)
    # measured: 4.4 unsteered, 12.9 toward, -8.1 away
    assert toward > base + 4.0 and away < base - 4.0, (base, toward, away)
