"""Vectors from contrast pairs (``trainer.extract``): the residual streams it reads against HF forward hooks, the two
methods on planted directions, a direction planted in a tiny model's data recovered, and the command."""

import json

import pytest
import torch
from tiny_models import FAMILIES
from transformers import AutoModelForCausalLM, AutoTokenizer

from steering_vllm import SteeringVectors
from trainer.extract import Pair, directions, extract, main, read_activations, read_pairs, tokenize
from trainer.learner import steered_hidden_states


def hooked_block_outputs(model, ids, mask) -> list[torch.Tensor]:
    """Each decoder layer's output, taken by forward hooks on the plain HF model: the reference."""
    outputs = []
    handles = [
        block.register_forward_hook(lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for block in model.model.layers
    ]
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def float64_model(directory, family="qwen2"):
    options = {"experts_implementation": "eager"} if family in ("qwen3_moe", "gpt_oss") else {}
    return AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float64, attn_implementation="eager", **options
    ).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streams_are_each_layers_output_as_hf_hooks_see_it(tiny_model_dirs, family):
    model = float64_model(tiny_model_dirs[family], family)
    config = model.config
    ids = torch.randint(1, config.vocab_size, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    streams = []
    with torch.no_grad():
        zeros = torch.zeros(config.num_hidden_layers, 1, config.hidden_size, dtype=torch.float64)
        steered_hidden_states(model, zeros, ids, mask, streams=streams)
        expected = hooked_block_outputs(model, ids, mask)
    assert len(streams) == config.num_hidden_layers
    valid = mask.bool()
    for layer, (ours, reference) in enumerate(zip(streams, expected, strict=True)):
        # HF's norms round through float32 in a float64 model: up to 2e-6 measured; a layer off is off by O(1)
        error = (ours[valid] - reference[valid]).abs().max()
        assert error < 1e-5, f"layer {layer}: {error}"


def planted(n=40, d=32, layers=3, noise=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize(torch.randn(layers, d, generator=g, dtype=torch.float64), dim=-1)
    strength = 0.5 + torch.rand(n, 1, 1, generator=g, dtype=torch.float64)  # varies: pca needs variance along u
    negative = torch.randn(n, layers, d, generator=g, dtype=torch.float64)
    positive = negative + strength * unit + noise * torch.randn(n, layers, d, generator=g, dtype=torch.float64)
    return positive, negative, unit, strength.mean()


@pytest.mark.parametrize("method", ["mean_diff", "pca"])
def test_both_methods_recover_a_planted_direction_and_its_length(method):
    positive, negative, unit, mean_strength = planted()
    vectors = directions(positive, negative, method).double()
    cosine = torch.nn.functional.cosine_similarity(vectors, unit, dim=-1)
    assert cosine.min() > 0.99, cosine
    assert torch.allclose(vectors.norm(dim=-1), mean_strength.expand(3), rtol=0.05)
    swapped = directions(negative, positive, method).double()  # the sign follows the pairs' order
    assert torch.nn.functional.cosine_similarity(swapped, unit, dim=-1).max() < -0.99


def test_pca_of_differences_that_do_not_vary_is_their_mean():
    """One shift for every pair: the centred differences are zero and have no first component (any SVD direction
    would do); pca must give the shift, as mean_diff does."""
    negative = torch.randn(6, 2, 16, dtype=torch.float64)
    shift = torch.randn(2, 16, dtype=torch.float64)
    assert torch.allclose(directions(negative + shift, negative, "pca").double(), shift, atol=1e-6)


def test_pca_needs_two_pairs_and_methods_are_checked():
    one = torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match="pca needs at least 2 pairs"):
        directions(one, one * 2, "pca")
    with pytest.raises(ValueError, match="method must be one of"):
        directions(one, one, "median")


def test_a_direction_planted_in_a_tiny_models_embeddings_is_recovered_at_every_layer(tiny_model_dirs):
    """Two tokens whose embeddings differ by c*u: every later layer sees them through norms, so the residual
    streams of texts ending in one or the other differ by c*u plus a bounded term; with c large, extraction
    must find u at every layer (a stream read at the wrong position or sign would not)."""
    directory = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    positive_token, negative_token = tokenizer(" yes")["input_ids"][-1], tokenizer(" no")["input_ids"][-1]
    unit = torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[positive_token] = embeddings[negative_token] + 30.0 * unit
    prefixes = ["one two three", "the answer is", "four plus five equals", "so seven", "a six"]
    pairs = [Pair(f"{p} yes", f"{p} no") for p in prefixes]
    assert tokenizer(pairs[0].positive)["input_ids"][-1] == positive_token
    vectors = extract(model, tokenizer, pairs, progress=False)
    table = vectors.to_tensor()
    cosine = torch.nn.functional.cosine_similarity(table, unit[None], dim=-1)
    assert cosine.min() > 0.95, cosine
    assert vectors.provenance["method"] == "mean_diff" and vectors.provenance["pairs"] == "5"


@pytest.mark.parametrize("position", ["last", "mean"])
def test_extraction_equals_a_hooked_hf_reference(tiny_model_dirs, position):
    directory = tiny_model_dirs["gemma3"]
    model = float64_model(directory, "gemma3")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    pairs = [Pair(" two plus two is four", " two plus two is five", "the answer"),
             Pair(" seven", " six six six", "so"), Pair(" one", " nine ten", "")]  # fmt: skip
    vectors = extract(model, tokenizer, pairs, position=position, batch_size=2, progress=False)

    reads = []
    for pair in pairs:
        for completion in (pair.positive, pair.negative):
            ids, start = tokenize(tokenizer, pair.prompt, completion, chat_template=False)
            outputs = hooked_block_outputs(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
            span = slice(len(ids) - 1, len(ids)) if position == "last" else slice(start, len(ids))
            reads.append(torch.stack([out[0, span].mean(dim=0) for out in outputs]))
    reads = torch.stack(reads)
    expected = (reads[0::2] - reads[1::2]).mean(dim=0)
    assert torch.allclose(vectors.to_tensor().double(), expected, atol=1e-5, rtol=0)
    assert expected.norm(dim=-1).min() > 0.1


def test_normalize_sets_each_layer_to_a_fraction_of_the_mean_norm_of_the_tokens_read(tiny_model_dirs):
    """--position mean: the mean over the completions' tokens of each token's residual norm (HF hooks), not the
    norm of the averaged stream, which is smaller."""
    directory = tiny_model_dirs["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    pairs = [Pair(" one two three", " four", "the answer is"), Pair(" so five", " six seven eight nine", "so")]
    vectors = extract(model, tokenizer, pairs, position="mean", normalize=0.25, layers=[1, 2], progress=False)
    per_text = []
    for pair in pairs:
        for completion in (pair.positive, pair.negative):
            ids, start = tokenize(tokenizer, pair.prompt, completion, False)
            outputs = hooked_block_outputs(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
            per_text.append(torch.stack([out[0, start:].norm(dim=-1).mean() for out in outputs]))
    mean_norm = torch.stack(per_text).mean(dim=0)
    texts = [tokenize(tokenizer, p.prompt, t, False) for p in pairs for t in (p.positive, p.negative)]
    averaged = read_activations(model, texts, "mean", progress=False).streams.norm(dim=-1).mean(dim=0)
    assert (averaged < 0.99 * mean_norm).all()  # the two readings differ here (by 2-8%)
    norms = torch.tensor(vectors.norms())
    assert torch.allclose(norms[[1, 2]], 0.25 * mean_norm[[1, 2]], rtol=1e-4)
    assert norms[0] == 0 and norms[3] == 0  # layers not asked for are absent


def test_with_the_chat_template_the_prompt_is_a_user_turn_and_the_completion_follows_it(tiny_model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dirs["qwen2"]))
    turns = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    tokenizer.chat_template = turns + "{% if add_generation_prompt %}[a] {% endif %}"
    ids, start = tokenize(tokenizer, "one plus two", " three.", chat_template=True)
    assert tokenizer.decode(ids[:start]) == "[user] one plus two\n[a] "
    assert ids[start:] == tokenizer(" three.", add_special_tokens=False)["input_ids"]


def test_bad_pairs_files_name_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"positive": "a", "negative": "b"}\n{"positive": "a"}\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: expected"):
        read_pairs(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:1: not JSON"):
        read_pairs(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no pairs"):
        read_pairs(path)


def test_command_writes_our_format_with_how_it_was_made(tiny_model_dirs, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"positive": f"{w} yes", "negative": f"{w} no"}) + "\n"
                             for w in ["one", "two", "three"]))  # fmt: skip
    output = tmp_path / "v.safetensors"
    code = main(["--model", str(tiny_model_dirs["qwen2"]), "--pairs", str(pairs), "--output", str(output),
                 "--method", "pca", "--layers", "1-3"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    vectors = SteeringVectors.load(output)
    assert sorted(vectors.vectors) == [1, 2, 3] and vectors.model == str(tiny_model_dirs["qwen2"])
    assert vectors.provenance["method"] == "pca" and vectors.provenance["made_by"] == "trainer.extract"
    assert main(["--model", str(tiny_model_dirs["qwen2"]), "--pairs", str(tmp_path / "none.jsonl"),
                 "--output", str(output)]) == 2  # fmt: skip
    assert "none.jsonl: cannot read the pairs" in capsys.readouterr().err
