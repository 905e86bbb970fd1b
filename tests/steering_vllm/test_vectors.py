"""SteeringVectors and the contract file format: round trips, transforms, and every bad input's error."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steering_vllm import SteeringVectors, SteeringVectorsError

META = {"format": "steering-vectors", "format_version": "1", "hidden_size": "8", "num_layers": "4"}


def write(path, tensors, metadata=META):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_save_load_round_trip_keeps_values_metadata_and_hash(tmp_path):
    table = torch.randn(4, 8)
    table[2] = 0
    vectors = SteeringVectors.from_tensor(table, model="org/model")
    path = vectors.save(tmp_path / "v.safetensors")
    loaded = SteeringVectors.load(path)
    assert sorted(loaded.vectors) == [0, 1, 3]  # zero rows are absent from the file
    assert torch.equal(loaded.to_tensor(), table)
    assert (loaded.num_layers, loaded.hidden_size, loaded.model) == (4, 8, "org/model")
    assert loaded.content_hash() == vectors.content_hash()


def test_provenance_survives_save_load_and_transforms_and_stays_out_of_the_hash(tmp_path):
    provenance = {"method": "mean_diff", "pairs": "48"}
    table = torch.randn(4, 8)
    vectors = SteeringVectors.from_tensor(table)
    made = SteeringVectors(vectors.vectors, 4, 8, provenance=provenance)
    loaded = SteeringVectors.load(made.scale(2.0).select_layers([1, 2]).save(tmp_path / "v.safetensors"))
    assert loaded.provenance == provenance
    assert loaded.summary()["provenance"] == provenance
    assert made.content_hash() == vectors.content_hash()
    assert SteeringVectors.from_bytes(made.to_bytes()).provenance == provenance


def test_file_layout_is_the_contract(tmp_path):
    from safetensors import safe_open

    path = SteeringVectors.from_tensor(torch.randn(3, 8)).select_layers([1]).save(tmp_path / "v.safetensors")
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {**META, "num_layers": "3", "site": "block_output"}
        assert list(f.keys()) == ["layers.1"]
        assert f.get_tensor("layers.1").dtype == torch.float32
        assert f.get_tensor("layers.1").shape == (8,)


def test_zeros_scale_select_and_norms():
    zeros = SteeringVectors.zeros(3, 8)
    assert torch.equal(zeros.to_tensor(), torch.zeros(3, 8)) and zeros.norms() == [0.0, 0.0, 0.0]
    table = torch.randn(3, 8, dtype=torch.float64)
    vectors = SteeringVectors.from_tensor(table)
    assert torch.allclose(vectors.scale(-2.5).to_tensor().double(), table * -2.5, atol=1e-6)
    selected = vectors.select_layers([0, 2]).to_tensor()
    assert torch.equal(selected[1], torch.zeros(8)) and torch.equal(selected[2], table[2].float())
    assert vectors.norms() == pytest.approx(table.norm(dim=1).tolist(), rel=1e-6)
    with pytest.raises(SteeringVectorsError, match="layer 3 out of range"):
        vectors.select_layers([3])
    for bad in (1.5, "1", True):
        with pytest.raises(SteeringVectorsError, match="is not a layer index"):
            vectors.select_layers([bad])
    assert torch.equal(vectors.select_layers(np.array([0, 2])).to_tensor(), selected)  # numpy ints are layers
    with pytest.raises(SteeringVectorsError, match="finite"):
        vectors.scale(math.inf)
    big = SteeringVectors.from_tensor(torch.tensor([[0.0, 1e-30], [0.0, 0.0], [10.0, 0.0]]))
    with pytest.raises(SteeringVectorsError, match=r"scale -1e\+38 overflows float32 on layers \[2\]"):
        big.scale(-1e38)  # finite, but 10 x 1e38 is not a float32
    with pytest.raises(SteeringVectorsError, match=r"scale 1e\+19 overflows float32 on layers \[2\]"):
        big.scale(1e19)  # 1e20 is a float32, its square is not: the norm's variance would overflow
    with pytest.raises(SteeringVectorsError, match="'layers.1' is too large .* squared norm overflows float32"):
        SteeringVectors.from_tensor(torch.tensor([[0.0, 0.0], [3e19, 1.0]]))


def test_content_hash_depends_on_values_and_shape_only(tmp_path):
    table = torch.randn(4, 8)
    a = SteeringVectors.from_tensor(table, model="x")
    assert a.content_hash() == SteeringVectors.from_tensor(table.clone(), model="y").content_hash()
    bumped = table.clone()
    bumped[3, 7] = torch.nextafter(bumped[3, 7], torch.tensor(math.inf))
    assert a.content_hash() != SteeringVectors.from_tensor(bumped).content_hash()
    assert SteeringVectors.zeros(2, 8).content_hash() != SteeringVectors.zeros(4, 4).content_hash()


def test_from_bytes_reads_what_to_bytes_writes():
    vectors = SteeringVectors.from_tensor(torch.randn(2, 8))
    assert torch.equal(SteeringVectors.from_bytes(vectors.to_bytes()).to_tensor(), vectors.to_tensor())
    with pytest.raises(SteeringVectorsError, match="request body: not a readable safetensors"):
        SteeringVectors.from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", source="request body")


def test_check_compatible_names_file_and_both_sizes(tmp_path):
    path = SteeringVectors.zeros(4, 8).save(tmp_path / "v.safetensors")
    vectors = SteeringVectors.load(path)
    with pytest.raises(
        SteeringVectorsError, match=r"v\.safetensors: hidden_size 8 does not match the model's 16 \(m\)"
    ):
        vectors.check_compatible(4, 16, "m")
    with pytest.raises(SteeringVectorsError, match=r"v\.safetensors: num_layers 4 does not match the model's 5"):
        vectors.check_compatible(5, 8)
    vectors.check_compatible(4, 8)


@pytest.mark.parametrize(
    "tensors, metadata, message",
    [
        ({"layers.0": torch.full((8,), math.nan)}, META, r"'layers.0' contains NaN"),
        ({"layers.1": torch.tensor([math.inf] + [0.0] * 7)}, META, r"'layers.1' contains Inf"),
        ({"layers.0": torch.zeros(2, 4)}, META, r"'layers.0' has shape \(2, 4\), expected 1-D"),
        ({"layers.0": torch.zeros(7)}, META, r"'layers.0' has shape \(7,\), expected \(8,\) = hidden_size"),
        ({"layers.4": torch.zeros(8)}, META, r"'layers.4': layer index out of range for num_layers=4"),
        ({"model.norm.weight": torch.zeros(8)}, META, r"unknown tensor name 'model.norm.weight'"),
        ({"layers.01": torch.zeros(8)}, META, r"unknown tensor name 'layers.01'"),
        ({"layers.0": torch.zeros(8, dtype=torch.int32)}, META, r"dtype torch.int32, expected float32"),
        ({"layers.0": torch.zeros(8)}, {**META, "format": "pt"}, r"metadata 'format' is 'pt', expected"),
        ({"layers.0": torch.zeros(8)}, {k: v for k, v in META.items() if k != "format"}, r"'format' is None"),
        ({"layers.0": torch.zeros(8)}, {**META, "format_version": "2"}, r"'format_version' is '2'"),
        ({"layers.0": torch.zeros(8)}, {**META, "hidden_size": "eight"}, r"'hidden_size' is 'eight', expected an int"),
        (
            {"layers.0": torch.zeros(8)},
            {k: v for k, v in META.items() if k != "num_layers"},
            r"'num_layers' is missing",
        ),
        ({"layers.0": torch.zeros(8)}, {**META, "site": "attention"}, r"'site' is 'attention'"),
        ({"layers.0": torch.zeros(8)}, {**META, "provenance": "[1]"}, r"'provenance' is not a JSON object of str"),
    ],
)
def test_bad_files_are_refused_with_the_file_and_the_problem(tmp_path, tensors, metadata, message):
    path = write(tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(SteeringVectorsError, match=r"bad\.safetensors: .*" + message):
        SteeringVectors.load(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(SteeringVectorsError, match=r"nope\.safetensors: file not found"):
        SteeringVectors.load(tmp_path / "nope.safetensors")
    good = SteeringVectors.from_tensor(torch.randn(4, 8)).to_bytes()
    for name, data in {"truncated": good[: len(good) - 9], "garbage": b"not a safetensors file at all"}.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(SteeringVectorsError, match=rf"{name}\.safetensors: not a readable safetensors file"):
            SteeringVectors.load(path)
    header = json.dumps({"__metadata__": META}).encode()
    (tmp_path / "x.bin").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(SteeringVectorsError, match=r"x\.bin: not a steering-vector file this reader knows"):
        SteeringVectors.load(tmp_path / "x.bin")


def test_non_float32_inputs_are_converted_to_float32():
    vectors = SteeringVectors({1: torch.ones(8, dtype=torch.bfloat16)}, num_layers=2, hidden_size=8)
    assert vectors.vectors[1].dtype == torch.float32
    with pytest.raises(SteeringVectorsError, match=r"expected a \[num_layers, hidden_size\] tensor"):
        SteeringVectors.from_tensor(torch.zeros(8))


def test_a_file_is_parsed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    from steering_vllm.vectors import reading

    parsed = []
    read = reading.read
    monkeypatch.setattr(reading, "read", lambda path, *args: parsed.append(path) or read(path, *args))
    path = SteeringVectors.from_tensor(torch.randn(3, 8)).save(tmp_path / "v.safetensors")
    first, second = SteeringVectors.load(path), SteeringVectors.load(str(path), num_layers=3)
    assert len(parsed) == 1 and first is not second and first.vectors[0] is not second.vectors[0]
    assert torch.equal(first.to_tensor(), second.to_tensor())
    changed = torch.randn(3, 8)
    SteeringVectors.from_tensor(changed).save(path)  # a new file under the same name
    assert torch.equal(SteeringVectors.load(path).to_tensor(), changed) and len(parsed) == 2


def test_a_gguf_file_read_with_another_layer_count_is_read_again(tmp_path):
    table = torch.zeros(6, 8)
    table[1:3] = torch.randn(2, 8)
    path = SteeringVectors.from_tensor(table).save(tmp_path / "v.gguf")  # GGUF does not record the count
    assert SteeringVectors.load(path).num_layers == 3
    assert SteeringVectors.load(path, num_layers=6).num_layers == 6
    assert SteeringVectors.load(path).num_layers == 3
