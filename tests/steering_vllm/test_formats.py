"""Converters: the paper's .npy, HF checkpoints with down_proj.bias, llama.cpp / repeng GGUF; the two commands."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from steering_vllm import SteeringVectors, SteeringVectorsError
from steering_vllm.vectors import convert as convert_cmd
from steering_vllm.vectors import inspect as inspect_cmd


def test_npy_both_directions(tmp_path):
    table = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float64)
    np.save(tmp_path / "paper.npy", table)
    vectors = SteeringVectors.load(tmp_path / "paper.npy")
    assert (vectors.num_layers, vectors.hidden_size) == (5, 16)
    assert np.allclose(vectors.to_tensor().numpy(), table, atol=1e-6)
    vectors.save(tmp_path / "out.npy")
    assert np.array_equal(np.load(tmp_path / "out.npy"), vectors.to_tensor().numpy())
    np.save(tmp_path / "flat.npy", table[0])
    with pytest.raises(
        SteeringVectorsError, match=r"flat\.npy: expected an array of shape \[num_layers, hidden_size\]"
    ):
        SteeringVectors.load(tmp_path / "flat.npy")


def _hf_checkpoint(directory, biases: dict[int, torch.Tensor], num_layers: int, shards: int = 1):
    directory.mkdir()
    (directory / "config.json").write_text(f'{{"num_hidden_layers": {num_layers}, "_name_or_path": "paper/ckpt"}}')
    items = sorted(biases.items())
    for shard in range(shards):
        tensors = {f"model.layers.{layer}.mlp.down_proj.bias": b for layer, b in items[shard::shards]}
        tensors[f"model.layers.{shard}.mlp.down_proj.weight"] = torch.zeros(4, 4)  # other weights are ignored
        save_file(tensors, str(directory / f"model-{shard:05d}-of-{shards:05d}.safetensors"), metadata={"format": "pt"})
    return directory


def test_hf_checkpoint_directory_and_file_with_down_proj_bias(tmp_path):
    biases = {layer: torch.randn(8) for layer in (0, 2, 5)}
    directory = _hf_checkpoint(tmp_path / "ckpt", biases, num_layers=6, shards=2)
    vectors = SteeringVectors.load(directory)
    assert (vectors.num_layers, vectors.hidden_size, vectors.model) == (6, 8, "paper/ckpt")
    assert sorted(vectors.vectors) == [0, 2, 5]
    for layer, bias in biases.items():
        assert torch.equal(vectors.vectors[layer], bias)  # down_proj.bias of layer l is our layers.l
    single = next(directory.glob("model-00000*"))
    from_file = SteeringVectors.load(single)
    assert sorted(from_file.vectors) == [0, 5] and from_file.num_layers == 6  # config.json next to the file
    (tmp_path / "empty").mkdir()
    with pytest.raises(SteeringVectorsError, match="empty: not a steering-vector file this reader knows"):
        SteeringVectors.load(tmp_path / "empty")


def test_hf_checkpoints_that_would_give_a_layer_two_biases_are_refused_or_read_through_their_index(tmp_path):
    twice = tmp_path / "twice.safetensors"
    save_file({"model.layers.1.mlp.down_proj.bias": torch.ones(4), "layers.01.mlp.down_proj.bias": torch.zeros(4)},
              str(twice))  # fmt: skip
    with pytest.raises(SteeringVectorsError, match="layer 1's bias appears twice"):
        SteeringVectors.load(twice)
    biases = {layer: torch.randn(8) for layer in (1, 2)}
    directory = _hf_checkpoint(tmp_path / "ckpt", biases, num_layers=4, shards=2)
    save_file({"model.layers.1.mlp.down_proj.bias": torch.full((8,), 99.0)}, str(directory / "old-00001.safetensors"))
    with pytest.raises(SteeringVectorsError, match="appears twice"):  # a leftover shard, and no index to say so
        SteeringVectors.load(directory)
    shards = sorted(p.name for p in directory.glob("model-*.safetensors"))
    weight_map = {f"model.layers.{layer}.mlp.down_proj.bias": shards[i] for i, layer in enumerate((1, 2))}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    vectors = SteeringVectors.load(directory)  # the index names the shards: the leftover is not read
    assert all(torch.equal(vectors.vectors[layer], bias) for layer, bias in biases.items())
    (directory / "config.json").write_text("{bad")
    with pytest.raises(SteeringVectorsError, match=r"config\.json: not valid JSON"):
        SteeringVectors.load(directory)


def test_gguf_write_uses_llama_cpp_numbering(tmp_path):
    table = torch.randn(6, 16)
    table[0] = 0
    table[3] = 0
    path = SteeringVectors.from_tensor(table, model="Qwen/Qwen2.5-0.5B").save(tmp_path / "cv.gguf")
    reader = gguf.GGUFReader(path)
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    hint = reader.get_field("controlvector.model_hint")
    assert bytes(hint.parts[hint.data[0]]).decode() == "Qwen/Qwen2.5-0.5B"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == 4
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    # direction.n is added to block n's output (llama.cpp), i.e. our layers.n
    assert sorted(tensors) == ["direction.1", "direction.2", "direction.4", "direction.5"]
    for name, data in tensors.items():
        assert np.array_equal(data, table[int(name.split(".")[1])].numpy())
    back = SteeringVectors.load(path, num_layers=6)
    assert torch.equal(back.to_tensor(), table) and back.model == "Qwen/Qwen2.5-0.5B"


def test_gguf_written_by_llama_cpp_tools_is_read(tmp_path):
    """A file laid out as llama.cpp's cvector-generator / repeng write it, made with the gguf package itself."""
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(path, arch="controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    directions = {3: np.full(8, 0.5, np.float32), 7: np.arange(8, dtype=np.float32)}
    for block, direction in directions.items():
        writer.add_tensor(f"direction.{block}", direction)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vectors = SteeringVectors.load(path, num_layers=32)
    assert vectors.num_layers == 32 and sorted(vectors.vectors) == [3, 7]
    assert np.array_equal(vectors.vectors[7].numpy(), directions[7])
    assert SteeringVectors.load(path).num_layers == 8  # without a model: the highest block + 1
    with pytest.raises(SteeringVectorsError, match="'direction.7' maps to layers.7, out of range for num_layers=4"):
        SteeringVectors.load(path, num_layers=4)


def test_gguf_refuses_layer_0_and_foreign_files(tmp_path):
    with pytest.raises(SteeringVectorsError, match="layer 0 has a non-zero vector, which GGUF control vectors cannot"):
        SteeringVectors.from_tensor(torch.ones(3, 8)).save(tmp_path / "cv.gguf")
    assert not (tmp_path / "cv.gguf").exists()
    with pytest.raises(SteeringVectorsError, match="no vector on a layer above 0"):  # it could not be read back
        SteeringVectors.zeros(3, 8).save(tmp_path / "zeros.gguf")
    writer = gguf.GGUFWriter(tmp_path / "model.gguf", arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SteeringVectorsError, match=r"model\.gguf: GGUF architecture is 'llama', expected 'controlv"):
        SteeringVectors.load(tmp_path / "model.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF junk")
    with pytest.raises(SteeringVectorsError, match=r"junk\.gguf: not a readable GGUF file"):
        SteeringVectors.load(tmp_path / "junk.gguf")


def test_save_is_atomic_and_refuses_unknown_extensions(tmp_path):
    vectors = SteeringVectors.from_tensor(torch.randn(2, 8))
    with pytest.raises(SteeringVectorsError, match=r"cannot write '\.pt'"):
        vectors.save(tmp_path / "v.pt")
    vectors.save(tmp_path / "v.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temporary left behind


def test_convert_command_round_trips_through_every_format(tmp_path, capsys):
    table = torch.randn(6, 16)
    np.save(tmp_path / "paper.npy", table.numpy())
    steps = [
        ["paper.npy", "a.safetensors", "--model", "m", "--layers", "1-5"],
        ["a.safetensors", "b.gguf"],
        ["b.gguf", "c.safetensors", "--num-layers", "6"],
        ["c.safetensors", "d.npy", "--scale", "2"],
    ]
    for step in steps:
        assert convert_cmd.main([str(tmp_path / step[0]), str(tmp_path / step[1]), *step[2:]]) == 0
    expected = table.clone()
    expected[0] = 0
    assert torch.equal(SteeringVectors.load(tmp_path / "c.safetensors").to_tensor(), expected)
    assert SteeringVectors.load(tmp_path / "c.safetensors").model == "m"
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "d.npy")), expected * 2)
    assert convert_cmd.main([str(tmp_path / "paper.npy"), str(tmp_path / "e.gguf")]) == 2
    assert "layer 0 has a non-zero vector" in capsys.readouterr().err


def test_convert_records_what_it_changed_in_the_provenance(tmp_path, capsys):
    made = SteeringVectors(SteeringVectors.from_tensor(torch.randn(4, 8)).vectors, 4, 8, provenance={"method": "pca"})
    made.save(tmp_path / "a.safetensors")
    assert convert_cmd.main([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--layers", "2,1"]) == 0
    assert convert_cmd.main([str(tmp_path / "b.safetensors"), str(tmp_path / "c.safetensors"), "--scale", "-2"]) == 0
    provenance = SteeringVectors.load(tmp_path / "c.safetensors").provenance
    assert provenance == {"method": "pca", "converted": "layers 1,2 kept; scaled by -2"}
    assert inspect_cmd.main([str(tmp_path / "c.safetensors")]) == 0
    assert "converted    layers 1,2 kept; scaled by -2" in capsys.readouterr().out


@pytest.mark.parametrize("layers", ["3-1", "", ","])
def test_convert_refuses_a_layer_list_that_keeps_nothing(tmp_path, capsys, layers):
    source = SteeringVectors.from_tensor(torch.randn(4, 8)).save(tmp_path / "v.safetensors")
    with pytest.raises(SystemExit):
        convert_cmd.main([str(source), str(tmp_path / "out.safetensors"), "--layers", layers])
    assert "bad layer list" in capsys.readouterr().err and not (tmp_path / "out.safetensors").exists()


def test_inspect_command(tmp_path, capsys):
    vectors = SteeringVectors.from_tensor(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), model="tiny")
    path = vectors.save(tmp_path / "v.safetensors")
    assert inspect_cmd.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "model        tiny" in out and vectors.content_hash() in out
    assert "    0    0.0000  (absent)" in out and "    1    5.0000" in out
    assert inspect_cmd.main([str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: file not found" in capsys.readouterr().err


def test_commands_run_as_modules(tmp_path):
    path = SteeringVectors.from_tensor(torch.ones(2, 4)).save(tmp_path / "v.safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "steering_vllm.vectors.inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"norms": [\n    2.0,\n    2.0\n  ]' in result.stdout


def test_other_libraries_files_load_by_detection_and_say_how_they_were_mapped(tmp_path):
    """The readers of ``foreign`` behind ``SteeringVectors.load``, ``--steering-vectors``' check and the commands:
    an IBM activation-steering .svec (added at block i's input: our layers.{i-1}), an EasyEdit layer directory, and
    a hotwire-vllm table, which needs its layer named."""
    import json

    directions = {str(i): [float(i + 1)] * 8 for i in range(1, 4)}
    (tmp_path / "happy.svec").write_text(json.dumps({"model_type": "llama", "directions": directions,
                                                     "explained_variances": {}}))  # fmt: skip
    vectors = SteeringVectors.load(tmp_path / "happy.svec")
    assert sorted(vectors.vectors) == [0, 1, 2] and torch.equal(vectors.vectors[0], torch.full((8,), 2.0))
    assert vectors.provenance["format"] == "ibm-svec"
    (tmp_path / "easyedit").mkdir()
    torch.save(torch.ones(8, dtype=torch.bfloat16), tmp_path / "easyedit" / "layer_2.pt")
    assert sorted(SteeringVectors.load(tmp_path / "easyedit", num_layers=4).vectors) == [2]
    torch.save(torch.randn(4, 8), tmp_path / "chaos.pt")
    with pytest.raises(SteeringVectorsError, match=r"chaos\.pt: .*--source-layers"):
        SteeringVectors.load(tmp_path / "chaos.pt")
    assert sorted(SteeringVectors.load(tmp_path / "chaos.pt", layers=[3]).vectors) == [3]


def test_convert_and_inspect_read_a_llama_cpp_control_vector_as_applied_or_as_read(tmp_path, capsys):
    path = tmp_path / "cv.gguf"
    writer = gguf.GGUFWriter(path, "controlvector")  # as llama.cpp's cvector-generator writes it
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_int32("controlvector.layer_count", 3)
    for block in (1, 2, 3):
        writer.add_tensor(f"direction.{block}", np.full(8, block, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert convert_cmd.main([str(path), str(tmp_path / "applied.safetensors")]) == 0
    assert convert_cmd.main([str(path), str(tmp_path / "read.safetensors"), "--gguf-layers", "as-read"]) == 0
    applied, read = (SteeringVectors.load(tmp_path / f"{n}.safetensors") for n in ("applied", "read"))
    assert sorted(applied.vectors) == [1, 2, 3] and sorted(read.vectors) == [0, 1, 2]
    assert torch.equal(read.vectors[0], applied.vectors[1])
    assert read.provenance["format"] == "llama-cpp-gguf" and read.provenance["gguf_layers"] == "as-read"
    capsys.readouterr()
    assert inspect_cmd.main([str(tmp_path / "read.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "format       llama-cpp-gguf" in out and "our layers.{X-1}" in out
    assert convert_cmd.main([str(path), str(tmp_path / "x.safetensors"), "--expected-model", "qwen2"]) == 2
    assert "made for model 'llama'" in capsys.readouterr().err


def test_the_steering_vllm_command_runs_convert_and_inspect(tmp_path):
    path = SteeringVectors.from_tensor(torch.ones(2, 4)).save(tmp_path / "v.safetensors")
    run = [sys.executable, "-m", "steering_vllm"]
    subprocess.run([*run, "convert", str(path), str(tmp_path / "v.npy")], check=True, capture_output=True)
    result = subprocess.run([*run, "inspect", str(tmp_path / "v.npy")], capture_output=True, text=True, check=True)
    assert "hidden_size  4" in result.stdout


def test_options_for_other_libraries_files_are_refused_on_ours_and_gguf_takes_gguf_formats(tmp_path):
    path = SteeringVectors.from_tensor(torch.randn(3, 8)).save(tmp_path / "v.safetensors")
    with pytest.raises(SteeringVectorsError, match=r"v\.safetensors: option\(s\) scale apply to other libraries'"):
        SteeringVectors.load(path, scale=2.0)
    table = torch.randn(3, 8)
    table[0] = 0
    gguf_path = SteeringVectors.from_tensor(table).save(tmp_path / "v.gguf")
    with pytest.raises(SteeringVectorsError, match=r"v\.gguf: a \.gguf file is a GGUF control vector, not 'ibm-svec'"):
        SteeringVectors.load(gguf_path, fmt="ibm-svec")
