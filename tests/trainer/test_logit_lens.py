"""Logit lens of steering vectors (trainer/logit_lens.py) on the tiny checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from steering_vllm import SteeringVectors
from trainer import logit_lens

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lens_model(tiny_model_dirs):
    """(unembedding, final norm weight, config, tokenizer) of the tiny Qwen2 checkpoint."""
    return logit_lens.load_unembedding(str(tiny_model_dirs["qwen2"]))


def _planted_token(tokenizer) -> int:
    (token,) = tokenizer.encode(" seven")  # one token in the tiny BPE vocabulary
    return token


def _planted(direction: torch.Tensor, noise: float = 0.02) -> torch.Tensor:
    direction = direction.float()
    return 3.0 * direction + noise * direction.norm() / math.sqrt(direction.numel()) * torch.randn_like(direction)


def test_planted_direction_ranks_its_token_first(lens_model):
    unembedding, _, config, tokenizer = lens_model
    token = _planted_token(tokenizer)
    table = torch.zeros(config.num_hidden_layers, config.hidden_size)
    table[1] = _planted(unembedding[token])
    table[2] = -_planted(unembedding[token])
    result = logit_lens.analyse(SteeringVectors.from_tensor(table), unembedding, tokenizer, top_k=7)

    up, down = result["layers"][1], result["layers"][2]
    assert up["top_cosine"][0]["id"] == token and up["top_cosine"][0]["score"] > 0.99
    assert up["top_cosine"][0]["token"] == tokenizer.decode([token]) == " seven"
    assert up["top_dot"][0]["id"] == token
    assert down["bottom_cosine"][0]["id"] == token and down["bottom_cosine"][0]["score"] < -0.99
    assert all(len(up[name]) == 7 for name in ("top_cosine", "bottom_cosine", "top_dot"))
    top = [t["score"] for t in up["top_cosine"]]
    bottom = [t["score"] for t in up["bottom_cosine"]]
    assert top == sorted(top, reverse=True) and bottom == sorted(bottom)
    # cosine scores against a direct float64 computation
    u64 = unembedding.double()
    expected = (u64 @ table[1].double()) / (u64.norm(dim=1) * table[1].double().norm())
    for entry in up["top_cosine"] + up["bottom_cosine"]:
        assert entry["score"] == pytest.approx(float(expected[entry["id"]]), abs=1e-5)
    assert result["layers"][0]["top_cosine"] == [] and result["layers"][0]["absent"]


def test_norm_weight_is_applied_first(lens_model):
    unembedding, _, config, tokenizer = lens_model
    token = _planted_token(tokenizer)
    weight = torch.exp(0.7 * torch.randn(config.hidden_size))  # the tiny model's own weight is all ones
    table = torch.zeros(config.num_hidden_layers, config.hidden_size)
    table[3] = _planted(unembedding[token].float() / weight)
    vectors = SteeringVectors.from_tensor(table)

    weighted = logit_lens.analyse(vectors, unembedding, tokenizer, norm_weight=weight)
    assert weighted["norm_weight_applied"]
    assert weighted["layers"][3]["top_cosine"][0]["id"] == token
    assert weighted["layers"][3]["top_cosine"][0]["score"] > 0.99
    plain = logit_lens.analyse(vectors, unembedding, tokenizer)
    assert plain["layers"][3]["top_cosine"][0]["score"] < 0.95  # without the weight the plant is blurred


def test_norms_and_similarity_matrix(lens_model):
    unembedding, _, _, tokenizer = lens_model
    rows = {0: torch.randn(128), 1: torch.randn(128) * 5, 3: torch.zeros(128), 4: torch.randn(128) * 0.01}
    rows[5] = -2.0 * rows[0]
    vectors = SteeringVectors(rows, num_layers=6, hidden_size=128)  # layer 2 absent, layer 3 present but zero
    result = logit_lens.analyse(vectors, unembedding, tokenizer, top_k=3)
    json.dumps(result, allow_nan=False)  # plain JSON-able values, no NaN

    table = vectors.to_tensor().double()
    norms = table.norm(dim=1)
    assert result["norms"] == pytest.approx(norms.tolist(), rel=1e-12, abs=0)
    assert [e["norm"] for e in result["layers"]] == result["norms"]
    sim = torch.tensor(result["similarity"], dtype=torch.float64)
    assert sim.shape == (6, 6) and torch.equal(sim, sim.T)
    for i in range(6):
        for j in range(6):
            if norms[i] > 0 and norms[j] > 0:
                expected = float(table[i] @ table[j] / (norms[i] * norms[j]))
                assert sim[i, j].item() == pytest.approx(expected, abs=1e-12)
    steered = [0, 1, 4, 5]
    assert sim.diagonal()[steered].tolist() == pytest.approx([1.0] * 4, abs=1e-12)
    assert sim[5, 0].item() == pytest.approx(-1.0, abs=1e-12)
    assert (sim[[2, 3]] == 0).all() and (sim[:, [2, 3]] == 0).all()
    status = [(e["absent"], e["steered"]) for e in result["layers"]]
    assert status == [(False, True), (False, True), (True, False), (False, False), (False, True), (False, True)]
    assert result["layers"][3]["top_cosine"] == result["layers"][3]["bottom_cosine"] == []


class _OddTokenizer:
    """Token texts that a markdown table must escape."""

    texts = ["a|b", "x\ny", "  two spaces", "`tick`", "\t", "\ufffd", "plain", "<b>"]

    def __len__(self):
        return len(self.texts)

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)


def test_markdown_escapes_token_text(tmp_path):
    unembedding = torch.eye(8, 16) + 0.01 * torch.randn(8, 16)
    vectors = SteeringVectors.from_tensor(torch.cat([unembedding[:2], torch.zeros(1, 16)]))
    result = logit_lens.analyse(vectors, unembedding, _OddTokenizer(), top_k=20)
    assert result["top_k"] == 8  # clamped to the vocabulary
    text = logit_lens.write_markdown(result, tmp_path / "report.md").read_text()

    assert "`'a\\|b'`" in text and "`'x\\ny'`" in text and "`'  two spaces'`" in text and "`'\\t'`" in text
    assert "``'`tick`'``" in text and "`'�'` #5" in text
    table_rows = [line for line in text.splitlines() if line.startswith("|")]
    for line in table_rows:  # no stray '|' splits a cell: each row has its table's column count
        assert line.replace("\\|", "").count("|") in (5, 8), line
    assert "| 2 | 0.0000 | (absent) |" in text


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_cli_end_to_end(tiny_model_dirs, tmp_path, capsys, family):
    model = str(tiny_model_dirs[family])
    unembedding, _, config, tokenizer = logit_lens.load_unembedding(model)
    token = _planted_token(tokenizer)
    table = torch.zeros(config.num_hidden_layers, config.hidden_size)
    table[2] = _planted(unembedding[token])
    path = tmp_path / "vecs.safetensors"
    SteeringVectors.from_tensor(table, model=model).save(path)

    argv = [str(path), "--model", model, "--top-k", "5"] + (["--apply-norm-weight"] if family == "llama" else [])
    assert logit_lens.main(argv) == 0
    out_dir = tmp_path / "vecs_logit_lens"
    assert str(out_dir) in capsys.readouterr().out
    names = {"logit_lens.md", "logit_lens.json", "norms.png", "similarity.png"}
    assert {p.name for p in out_dir.iterdir()} == names
    for name in ("norms.png", "similarity.png"):
        assert (out_dir / name).read_bytes().startswith(PNG_SIGNATURE)
    result = json.loads((out_dir / "logit_lens.json").read_text())
    assert len(result["layers"]) == config.num_hidden_layers and result["model"] == model
    assert result["norm_weight_applied"] == (family == "llama")
    assert result["layers"][2]["top_cosine"][0]["id"] == token
    assert "`' seven'`" in (out_dir / "logit_lens.md").read_text()

    other = tmp_path / "elsewhere"
    assert logit_lens.main([str(path), "--model", model, "--output-dir", str(other)]) == 0
    assert {p.name for p in other.iterdir()} == names


@pytest.mark.parametrize(
    ("shape", "message"),
    [((4, 64), "hidden_size 64 does not match the model's 128"), ((6, 128), "num_layers 6 does not match")],
)
def test_cli_rejects_vectors_that_do_not_fit(tiny_model_dirs, tmp_path, capsys, shape, message):
    path = tmp_path / "vecs.safetensors"
    SteeringVectors.from_tensor(torch.randn(shape)).save(path)
    assert logit_lens.main([str(path), "--model", str(tiny_model_dirs["qwen2"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "vecs_logit_lens").exists()


def test_cli_missing_or_unreadable_inputs(tiny_model_dirs, tmp_path, capsys):
    model = str(tiny_model_dirs["qwen2"])
    assert logit_lens.main([str(tmp_path / "missing.safetensors"), "--model", model]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not found" in err

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    assert logit_lens.main([str(garbage), "--model", model]) == 2
    assert capsys.readouterr().err.startswith("error: ")

    vectors = tmp_path / "vecs.safetensors"
    SteeringVectors.zeros(4, 128).save(vectors)
    assert logit_lens.main([str(vectors), "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load model") and "no such directory" in err


def test_gemma_final_norm_weight_is_one_plus_the_stored_weight(tiny_model_dirs):
    """Gemma's final norm multiplies by 1 + weight, and its unembedding is the (unscaled) tied embedding."""
    from transformers import AutoModelForCausalLM

    model = str(tiny_model_dirs["gemma3"])
    unembedding, norm_weight, _, _ = logit_lens.load_unembedding(model)
    lm = AutoModelForCausalLM.from_pretrained(model)
    assert torch.equal(unembedding, lm.model.embed_tokens.weight.detach())
    assert torch.equal(norm_weight, lm.model.norm.weight.detach() + 1)
    # what the model does to a final hidden state h before unembedding, with the weight the lens applies
    h = torch.randn(5, lm.config.hidden_size)
    expected = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + lm.config.rms_norm_eps) * norm_weight
    torch.testing.assert_close(lm.model.norm(h), expected)
