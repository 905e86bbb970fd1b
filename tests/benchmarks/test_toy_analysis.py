"""What the toy worlds' page reads in completions: accuracy per kind, the kind's operation, wrong worked steps,
one-digit answers, pass@k; and the logit lens rows of trained vectors."""

import pytest
import torch

from benchmarks.toy_analysis import behaviour, lens_rows, mean_behaviour, pass_at_k

KINDS = {"q-groups": "groups", "q-shopping": "shopping", "q-difference": "difference"}


def test_behaviour_counts_kinds_operations_wrong_steps_and_one_digit_answers():
    samples = [
        # groups, right path, a slip in the product: 6 * 3 = 19 is wrong, 19 + 8 = 27 is right
        {"question": "q-groups", "completions": ["6 * 3 = 19. 19 + 8 = 27. The answer is \\boxed{27}."],
         "correct": [False]},
        # shopping, wrong path (adds the price), arithmetic right
        {"question": "q-shopping", "completions": ["2 + 3 = 5. 5 + 4 = 9. The answer is \\boxed{9}."],
         "correct": [False]},
        # difference by subtraction, right
        {"question": "q-difference", "completions": ["12 - 5 = 7. The answer is \\boxed{7}."], "correct": [True]},
    ]  # fmt: skip
    found = behaviour(samples, KINDS)
    assert {kind: numbers["accuracy"] for kind, numbers in found.items()} == {
        "difference": 100.0, "groups": 0.0, "shopping": 0.0}  # fmt: skip
    # groups and difference wrote their operation, shopping added its price
    assert [found[k]["operation"] for k in ("groups", "shopping", "difference")] == [100.0, 0.0, 100.0]
    assert [found[k]["wrong_steps"] for k in ("groups", "shopping", "difference")] == [50.0, 0.0, 0.0]  # 6 * 3 = 19
    assert [found[k]["single_digit"] for k in ("groups", "shopping", "difference")] == [0.0, 100.0, 100.0]  # 27; 9; 7
    runs = mean_behaviour([found, {**found, "groups": {**found["groups"], "operation": 0.0}}])
    assert runs["groups"]["operation"] == 50.0 and runs["shopping"] == found["shopping"]


def test_pass_at_k_is_any_correct_and_mean_at_k_the_mean():
    samples = [{"question": "q-groups", "completions": ["", "", "", ""], "correct": [False, True, False, False]},
               {"question": "q-groups", "completions": ["", "", "", ""], "correct": [False] * 4},
               {"question": "q-shopping", "completions": ["", "", "", ""], "correct": [True] * 4}]  # fmt: skip
    assert pass_at_k(samples, KINDS) == {
        "groups": {"mean": 12.5, "pass": 50.0},
        "shopping": {"mean": 100.0, "pass": 100.0},
    }


def test_lens_rows_rank_the_tokens_whose_unembedding_a_vector_points_along(tiny_model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steering_vllm import SteeringVectors
    from trainer.logit_lens import markdown_tokens

    model_dir = tiny_model_dirs["qwen2"]
    unembedding = AutoModelForCausalLM.from_pretrained(model_dir).get_output_embeddings().weight.detach()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    table = torch.zeros(4, unembedding.shape[1])
    table[2] = 3 * unembedding[100] / unembedding[100].norm()  # layer 2 points along token 100's row
    path = SteeringVectors.from_tensor(table).save(tmp_path / "v.safetensors")
    (row,) = lens_rows(path, str(model_dir))  # only layer 2 is steered
    assert row["layer"] == 2 and row["norm"] == pytest.approx(3.0, rel=1e-5)
    first = markdown_tokens([{"id": 100, "token": tokenizer.decode([100]), "score": 1.0}], 1)  # the lens's own cell
    assert row["top"].startswith(first + ", ")
    assert row["top"].count(", ") >= 4 and row["bottom"]
