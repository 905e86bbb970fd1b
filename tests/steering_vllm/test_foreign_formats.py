"""Readers of other steering libraries' files (steering_vllm/vectors/foreign/).

Each fixture writes its file the way that library's own code does; the writing lines are quoted with their source
file and commit. The mapping tests check, on a toy residual stream, that a vector placed where the library adds it
lands at the same place through our convention (``layers.{l}`` added to block l's output).
"""

import json

import gguf
import numpy as np
import pytest
import torch

from steering_vllm.vectors import formats
from steering_vllm.vectors.foreign import (
    GGUF_UNKNOWN_WRITER,
    check_model_hint,
    detect,
    read_foreign,
)
from steering_vllm.vectors.formats import RawVectors, SteeringVectorsError

HIDDEN = 8
N_LAYERS = 5


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---- a toy residual stream: block l maps its input to its output --------------------------------------------------


def _blocks(n_layers=N_LAYERS, hidden=HIDDEN):
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(hidden, hidden, generator=g) / hidden**0.5 for _ in range(n_layers)]
    return [lambda x, w=w: x + torch.tanh(x @ w) for w in weights]


def _run(x, *, at_input=None, at_output=None):
    """Run the toy stack, adding vectors at the input and / or the output of blocks (by block index)."""
    at_input, at_output = at_input or {}, at_output or {}
    for index, block in enumerate(_blocks()):
        if index in at_input:
            x = x + at_input[index]
        x = block(x)
        if index in at_output:
            x = x + at_output[index]
    return x


def _ours(raw: RawVectors, x):
    """Our convention: layers.{l} is added to the output of block l."""
    assert all(0 <= layer < raw.num_layers for layer in raw.vectors)
    return _run(x, at_output=raw.vectors)


X = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(2))


# ---- IBM activation-steering .svec ------------------------------------------------------------------------------


def _ibm_save(file_path: str, model_type: str, directions: dict, explained_variances: dict) -> str:
    # github IBM/activation-steering 52be602 activation_steering/steering_vector.py, SteeringVector.save:
    #     if not file_path.endswith('.svec'):
    #         file_path += '.svec'
    #     data = {
    #         "model_type": self.model_type,
    #         "directions": {k: v.tolist() for k, v in self.directions.items()},
    #         "explained_variances": self.explained_variances
    #     }
    #     with open(file_path, 'w') as f:
    #         json.dump(data, f)
    if not file_path.endswith(".svec"):
        file_path += ".svec"
    data = {
        "model_type": model_type,
        "directions": {k: v.tolist() for k, v in directions.items()},
        "explained_variances": explained_variances,
    }
    with open(file_path, "w") as f:
        json.dump(data, f)
    return file_path


def _ibm_directions(n=N_LAYERS, hidden=HIDDEN):
    # read_representations: directions[layer] = pca_model.components_.astype(np.float32).squeeze(axis=0) for every
    # layer in range(num_hidden_layers) by default, so directions[0] is normally non-zero.
    rng = _rng(3)
    return {layer: rng.standard_normal(hidden).astype(np.float32) for layer in range(n)}


def test_ibm_svec_maps_block_input_to_previous_block_output(tmp_path):
    directions = _ibm_directions()
    path = _ibm_save(str(tmp_path / "behavior"), "llama", directions, {k: 0.5 for k in directions})
    assert detect(tmp_path / "behavior.svec") == "ibm-svec"
    raw = read_foreign(tmp_path / "behavior.svec", layers=[2, 4], scale=1.5)
    assert sorted(raw.vectors) == [1, 3]
    assert raw.num_layers == N_LAYERS and raw.hidden_size == HIDDEN
    assert torch.allclose(raw.vectors[1], torch.from_numpy(1.5 * directions[2]))
    assert raw.provenance["format"] == "ibm-svec"
    assert "layers.{X-1}" in raw.provenance["layer_mapping"]
    assert raw.provenance["model_type"] == "llama"
    # LeashLayer.forward adds behavior_vector to hidden_states BEFORE calling the wrapped block: block i's input.
    theirs = _run(X, at_input={i: 1.5 * torch.from_numpy(directions[i]) for i in (2, 4)})
    assert torch.allclose(_ours(raw, X), theirs, atol=1e-6)
    assert path.endswith(".svec")


def test_ibm_svec_refuses_a_nonzero_block0_input(tmp_path):
    directions = _ibm_directions()
    _ibm_save(str(tmp_path / "v"), "llama", directions, {})
    with pytest.raises(
        SteeringVectorsError, match=r"v\.svec: directions\['0'\] is non-zero.*input of block 0.*layers="
    ):
        read_foreign(tmp_path / "v.svec")
    with pytest.raises(SteeringVectorsError, match=r"directions\['0'\] is non-zero.*you asked for it"):
        read_foreign(tmp_path / "v.svec", layers=[0, 1])
    # a zero direction at block 0's input adds nothing: it is dropped, the rest is read
    directions[0] = np.zeros(HIDDEN, np.float32)
    _ibm_save(str(tmp_path / "z"), "llama", directions, {})
    raw = read_foreign(tmp_path / "z.svec")
    assert sorted(raw.vectors) == [0, 1, 2, 3]
    assert torch.equal(raw.vectors[0], torch.from_numpy(directions[1]))


def test_ibm_svec_model_type_and_sizes(tmp_path):
    directions = _ibm_directions()
    _ibm_save(str(tmp_path / "v"), "mistral", directions, {})
    with pytest.raises(SteeringVectorsError, match=r"made for model 'mistral'.*expected 'llama'"):
        read_foreign(tmp_path / "v.svec", layers=[1], expected_model="llama")
    assert read_foreign(tmp_path / "v.svec", layers=[1], expected_model=["Mistral"]).vectors.keys() == {0}
    with pytest.raises(SteeringVectorsError, match=r"layers=\[7\]: the file has no direction for layer\(s\) \[7\]"):
        read_foreign(tmp_path / "v.svec", layers=[7])
    with pytest.raises(SteeringVectorsError, match=r"maps to layers\.3, out of range for num_layers=3"):
        read_foreign(tmp_path / "v.svec", num_layers=3, layers=[4])
    directions[3] = np.ones(HIDDEN + 2, np.float32)
    _ibm_save(str(tmp_path / "bad"), "llama", directions, {})
    with pytest.raises(
        SteeringVectorsError, match=r"bad\.svec: directions\['3'\] has 10 elements, expected 8 .*hidden sizes disagree"
    ):
        read_foreign(tmp_path / "bad.svec", layers=[1, 3])
    with pytest.raises(SteeringVectorsError, match=r"directions\['1'\] has 8 elements, expected 16"):
        read_foreign(tmp_path / "v.svec", layers=[1], hidden_size=16)


# ---- EasyEdit layer_{L}.pt --------------------------------------------------------------------------------------


def _easyedit_save(steer_vector_output_dir, vectors: dict[int, torch.Tensor]):
    # github zjunlp/EasyEdit 14cea82 steer/vector_generators/caa/generate_caa_vectors.py, generate_caa_vectors:
    #     for layer in args.layers:
    #         ...
    #         vec = (all_pos_layer - all_neg_layer).mean(dim=0)
    #         if hparams.save_vectors is True:
    #             torch.save(
    #                 vec,
    #                 os.path.join(steer_vector_output_dir, f"layer_{layer}.pt"),
    #             )
    steer_vector_output_dir.mkdir(parents=True, exist_ok=True)
    for layer, vec in vectors.items():
        torch.save(vec, steer_vector_output_dir / f"layer_{layer}.pt")


def test_easyedit_block_output_to_same_layer(tmp_path):
    # activations are the model's dtype (bf16 here), stacked per prompt and averaged, as generate_caa_vectors does
    g = torch.Generator().manual_seed(4)
    pos = {layer: torch.randn(6, HIDDEN, generator=g).to(torch.bfloat16) for layer in (1, 3)}
    neg = {layer: torch.randn(6, HIDDEN, generator=g).to(torch.bfloat16) for layer in (1, 3)}
    vecs = {layer: (pos[layer] - neg[layer]).mean(dim=0) for layer in (1, 3)}
    directory = tmp_path / "caa_vector"
    _easyedit_save(directory, vecs)
    (directory / "metadata_layer_1.jsonl").write_text("{}\n")  # other files in the directory are ignored
    assert detect(directory) == "easyedit"
    raw = read_foreign(directory, num_layers=N_LAYERS, scale=2.0)
    assert sorted(raw.vectors) == [1, 3] and raw.num_layers == N_LAYERS and raw.hidden_size == HIDDEN
    assert raw.vectors[3].dtype == torch.float32
    assert torch.equal(raw.vectors[3], 2.0 * vecs[3].float())
    assert raw.provenance["layer_mapping"].endswith("-> our layers.{X}")
    # apply_caa: set_add_activations(layer, multiplier * vector) -> BlockOutputWrapper adds it to block L's output[0]
    theirs = _run(X, at_output={layer: 2.0 * v.float() for layer, v in vecs.items()})
    assert torch.allclose(_ours(raw, X), theirs, atol=1e-6)
    # one file alone
    assert detect(directory / "layer_3.pt") == "easyedit"
    single = read_foreign(directory / "layer_3.pt")
    assert sorted(single.vectors) == [3] and single.num_layers == 4
    assert sorted(read_foreign(directory, layers=[1]).vectors) == [1]


def test_easyedit_refuses_state_dicts_and_size_mismatch(tmp_path):
    # generate_reps.py: torch.save(data_state, os.path.join(output_dir, f"layer_{layer}.pt")), a dict of weights
    reps = tmp_path / "reps"
    reps.mkdir()
    torch.save({"proj.weight": torch.zeros(4, HIDDEN), "proj.bias": torch.zeros(4)}, reps / "layer_2.pt")
    with pytest.raises(SteeringVectorsError, match=r"layer_2\.pt: holds a dict .*not plain additive vectors"):
        read_foreign(reps)
    mixed = tmp_path / "mixed"
    _easyedit_save(mixed, {1: torch.zeros(HIDDEN), 2: torch.zeros(HIDDEN * 2)})
    with pytest.raises(
        SteeringVectorsError, match=r"'layer_2\.pt' has 16 elements, expected 8 .*hidden sizes disagree"
    ):
        read_foreign(mixed)
    with pytest.raises(SteeringVectorsError, match=r"option\(s\) expected_model do not apply to format 'easyedit'"):
        read_foreign(mixed, expected_model="llama")


# ---- pyvene / pyreft IntervenableModel.save ---------------------------------------------------------------------

# config.json exactly as pyvene 0.1.8 (github stanfordnlp/pyvene 9e33390) IntervenableModel.save wrote it for
#     pv.IntervenableModel([
#         {"layer": 1, "component": "block_output", "intervention_type": pv.AdditionIntervention,
#          "source_representation": src},
#         {"layer": 2, "component": "block_output", "intervention_type": pv.SubtractionIntervention,
#          "source_representation": 2 * src}], model=<LlamaForCausalLM, hidden 8>).save(dir)
# (saving_config.save_pretrained(save_directory), transformers 5.19), and for pyreft 0.1.0's
# get_reft_model(model, ReftConfig(representations={"layer": 2, "component": "block_output",
# "low_rank_dimension": 4, "intervention": LoreftIntervention(embed_dim=8, low_rank_dimension=4)})).save(dir).
_PYVENE_ADD_CONFIG = {
    "intervention_constant_sources": [True, True],
    "intervention_dimensions": [HIDDEN, HIDDEN],
    "intervention_types": [
        "<class 'pyvene.models.interventions.AdditionIntervention'>",
        "<class 'pyvene.models.interventions.SubtractionIntervention'>",
    ],
    "mode": "parallel",
    "representations": [
        [1, "block_output", "pos", 1, None, None, None, None, None, None, None, None, True, None],
        [2, "block_output", "pos", 1, None, None, None, None, None, None, None, None, True, None],
    ],
    "sorted_keys": ["layer_1_comp_block_output_unit_pos_nunit_1#0", "layer_2_comp_block_output_unit_pos_nunit_1#0"],
    "transformers_version": "5.19.0",
}
_PYREFT_LOREFT_CONFIG = {
    "intervention_constant_sources": [True],
    "intervention_dimensions": [HIDDEN],
    "intervention_types": ["<class 'pyreft.interventions.LoreftIntervention'>"],
    "mode": "parallel",
    "representations": [[2, "block_output", "pos", 1, 4, None, None, None, None, None, None, None, None, None]],
    "sorted_keys": ["layer_2_comp_block_output_unit_pos_nunit_1#0"],
    "transformers_version": "5.19.0",
}


def _pyvene_save(save_directory, config: dict, states: dict[str, dict]):
    # pyvene/models/intervenable_base.py IntervenableModel.save:
    #     binary_filename = f"intkey_{k}.bin"
    #     if isinstance(intervention, TrainableIntervention) or intervention.source_representation is not None:
    #         torch.save(intervention.state_dict(), os.path.join(save_directory, binary_filename))
    #     ...
    #     saving_config.save_pretrained(save_directory)   # config.json, indent=2, sorted keys
    # An AdditionIntervention's state_dict holds the buffers embed_dim, interchange_dim and source_representation.
    save_directory.mkdir()
    for key, state in states.items():
        torch.save(state, save_directory / f"intkey_{key}.bin")
    (save_directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return save_directory


def _addition_state(source):
    return {"embed_dim": torch.tensor(HIDDEN), "interchange_dim": torch.tensor(HIDDEN), "source_representation": source}


def test_pyvene_addition_on_block_output(tmp_path):
    src = torch.arange(HIDDEN, dtype=torch.float32) + 1
    directory = _pyvene_save(
        tmp_path / "pv",
        _PYVENE_ADD_CONFIG,
        {
            "layer_1_comp_block_output_unit_pos_nunit_1#0": _addition_state(src),
            "layer_2_comp_block_output_unit_pos_nunit_1#0": _addition_state(2 * src),
        },
    )
    assert detect(directory) == "pyvene"
    raw = read_foreign(directory, num_layers=N_LAYERS)
    assert sorted(raw.vectors) == [1, 2] and raw.hidden_size == HIDDEN
    assert torch.equal(raw.vectors[1], src)
    assert torch.equal(raw.vectors[2], -2 * src)  # SubtractionIntervention: base -= source
    assert "every position" in raw.provenance["positions"]
    # block_output of layer L is the output hook of model.layers[L] (checked against pyvene 0.1.8 on a tiny Llama:
    # the intervened logits equal a forward hook adding src to layers[1]'s output, not layers[0]'s or [2]'s)
    theirs = _run(X, at_output={1: src, 2: -2 * src})
    assert torch.allclose(_ours(raw, X), theirs, atol=1e-6)
    # interchange_dim < hidden: pyvene adds source[..., :interchange_dim] only
    config = json.loads(json.dumps(_PYVENE_ADD_CONFIG))
    config["intervention_dimensions"] = [3, HIDDEN]
    partial = _pyvene_save(
        tmp_path / "partial",
        config,
        {
            "layer_1_comp_block_output_unit_pos_nunit_1#0": _addition_state(src),
            "layer_2_comp_block_output_unit_pos_nunit_1#0": _addition_state(src),
        },
    )
    assert torch.equal(read_foreign(partial).vectors[1], torch.tensor([1.0, 2, 3, 0, 0, 0, 0, 0]))


def test_pyvene_refuses_what_is_not_a_plain_vector(tmp_path):
    lo = {"weight": torch.zeros(4, HIDDEN), "bias": torch.zeros(4), "rotate_layer": torch.zeros(HIDDEN, 4)}
    reft = _pyvene_save(tmp_path / "reft", _PYREFT_LOREFT_CONFIG, {"layer_2_comp_block_output_unit_pos_nunit_1#0": lo})
    assert detect(reft) == "pyvene"
    with pytest.raises(SteeringVectorsError, match=r"LoreftIntervention.* is not a plain additive vector.*LoReFT"):
        read_foreign(reft)
    # an AdditionIntervention whose source comes from another run at call time: nothing saved
    config = json.loads(json.dumps(_PYVENE_ADD_CONFIG))
    config["intervention_constant_sources"] = [False, False]
    runtime = _pyvene_save(tmp_path / "runtime", config, {})
    with pytest.raises(SteeringVectorsError, match=r"has no saved constant source .*another forward pass"):
        read_foreign(runtime)
    # other components are refused
    config = json.loads(json.dumps(_PYVENE_ADD_CONFIG))
    config["representations"][0][1] = "mlp_output"
    mlp = _pyvene_save(tmp_path / "mlp", config, {})
    with pytest.raises(SteeringVectorsError, match=r"on component 'mlp_output'; only 'block_output'"):
        read_foreign(mlp)
    # save_intervention() writes the binaries without the config
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save(lo, bare / "intkey_layer_2_comp_block_output_unit_pos_nunit_1#0.bin")
    assert detect(bare) == "pyvene"
    with pytest.raises(SteeringVectorsError, match=r"re-save it with IntervenableModel\.save"):
        read_foreign(bare)


# ---- hotwire-vllm .pt -------------------------------------------------------------------------------------------


def test_hotwire_table_rows_are_block_outputs(tmp_path):
    # github moudrkat/hotwire-vllm 2d73fc4 hotwire/verify.py:
    #     torch.save(torch.randn(cfg.num_hidden_layers, cfg.hidden_size), os.path.join(vec_dir, "chaos.pt"))
    table = torch.randn(N_LAYERS, HIDDEN, generator=torch.Generator().manual_seed(5))
    torch.save(table, tmp_path / "chaos.pt")
    assert detect(tmp_path / "chaos.pt") == "hotwire"
    # spec {"id": "chaos", "layer": 2, "scale": 1.5}: SteerState.slot_for takes t[2]; _steered_forward adds
    # scale * row to the hidden_states output of the decoder layer named "....layers.2"
    raw = read_foreign(tmp_path / "chaos.pt", layers=[2], scale=1.5)
    assert sorted(raw.vectors) == [2] and raw.num_layers == N_LAYERS
    assert torch.equal(raw.vectors[2], 1.5 * table[2])
    assert torch.allclose(_ours(raw, X), _run(X, at_output={2: 1.5 * table[2]}), atol=1e-6)
    every = read_foreign(tmp_path, layers="all")  # a $HOTWIRE_VECTORS directory with one vector
    assert sorted(every.vectors) == list(range(N_LAYERS)) and torch.equal(every.vectors[4], table[4])
    with pytest.raises(SteeringVectorsError, match=r"chaos\.pt: hotwire applies one row per request spec.*layers="):
        read_foreign(tmp_path / "chaos.pt")
    with pytest.raises(SteeringVectorsError, match=r"has 5 rows \(n_layers\), expected num_layers=4"):
        read_foreign(tmp_path / "chaos.pt", num_layers=4, layers=[1])
    with pytest.raises(SteeringVectorsError, match=r"has no row for layer\(s\) \[5\]"):
        read_foreign(tmp_path / "chaos.pt", layers=[5])


def test_hotwire_dict_single_vector_and_manifest(tmp_path):
    # hotwire tests/test_state.py: torch.save({"tensor": torch.randn(4, 8)}, tmp_path / "wrapped.pt");
    # load_store takes the first tensor value of a dict
    table = torch.randn(4, HIDDEN)
    torch.save({"tensor": table, "other": torch.zeros(1)}, tmp_path / "wrapped.pt")
    raw = read_foreign(tmp_path / "wrapped.pt", layers=[3])
    assert torch.equal(raw.vectors[3], table[3])
    # github moudrkat/brainscope 82db01d brainscope/export_hotwire.py export: torch.save(t, out / f"{safe}.pt") with
    # t = torch.tensor(dirs[name], dtype=torch.float32), (hidden,) or (n_layers, hidden), plus manifest.json
    out = tmp_path / "vectors"
    out.mkdir()
    calm = torch.randn(HIDDEN)
    torch.save(calm, out / "calm.pt")
    torch.save(torch.randn(HIDDEN), out / "formal.pt")
    manifest = {
        "exported_at": "2026-01-01T00:00:00+00:00",
        "vectors": [
            {
                "name": "calm",
                "file": "calm.pt",
                "shape": [HIDDEN],
                "model": "Qwen/Qwen3-4B-Instruct-2507",
                "calibrated": {"layer": 3, "scale": 3, "decode_only": True},
                "calibration_regime": {"backend": "brainscope", "decode_only_recommended": True},
            }
        ],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    assert detect(out) == "hotwire"
    with pytest.raises(SteeringVectorsError, match=r"2 vectors \(calm, formal\); pass vector_id="):
        read_foreign(out, layers=[3])
    with pytest.raises(SteeringVectorsError, match=r"calibrated at layer 3\); pass layers="):
        read_foreign(out, vector_id="calm")
    raw = read_foreign(out, num_layers=N_LAYERS, vector_id="calm", layers=[3], scale=3.0)
    assert sorted(raw.vectors) == [3] and torch.equal(raw.vectors[3], 3.0 * calm)
    assert raw.model == "Qwen/Qwen3-4B-Instruct-2507" and "decode_only" in raw.provenance["note"]
    with pytest.raises(SteeringVectorsError, match=r"made for model 'Qwen/Qwen3-4B-Instruct-2507'"):
        read_foreign(out, vector_id="calm", layers=[3], expected_model="meta-llama/Llama-3.1-8B")
    read_foreign(out, vector_id="calm", layers=[3], expected_model="qwen3-4b-instruct-2507")
    with pytest.raises(SteeringVectorsError, match=r"single \[hidden\] vector; layers='all' needs a table"):
        read_foreign(out, vector_id="calm", layers="all")
    with pytest.raises(SteeringVectorsError, match=r"has 8 elements, expected 16"):
        read_foreign(out, vector_id="calm", layers=[3], hidden_size=16)


# ---- GGUF: repeng and llama.cpp's cvector-generator -------------------------------------------------------------


def _repeng_export_gguf(path, model_type: str, directions: dict[int, np.ndarray]):
    # github vgel/repeng 0ba7196 repeng/extract.py ControlVector.export_gguf (unchanged since 6a5e9ec):
    #     arch = "controlvector"
    #     writer = gguf.GGUFWriter(path, arch)
    #     writer.add_string(f"{arch}.model_hint", self.model_type)
    #     writer.add_uint32(f"{arch}.layer_count", len(self.directions))
    #     for layer in self.directions.keys():
    #         writer.add_tensor(f"direction.{layer}", self.directions[layer])
    #     writer.write_header_to_file()
    #     writer.write_kv_data_to_file()
    #     writer.write_tensors_to_file()
    #     writer.close()
    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_cpp_export_gguf(path, model_hint: str, v_final: list[np.ndarray], layer_count_type="i32"):
    # github ggml-org/llama.cpp tools/cvector-generator/cvector-generator.cpp export_gguf, in C:
    #     gguf_set_val_str(ctx, "general.architecture", arch.c_str());            // "controlvector"
    #     gguf_set_val_str(ctx, (arch + ".model_hint").c_str(), model_hint.c_str());
    #     gguf_set_val_i32(ctx, (arch + ".layer_count").c_str(), v_ctrl.size());
    #     for (size_t i = 0; i < v_ctrl.size(); ++i) gguf_add_tensor(ctx, v_ctrl[i]);
    # with v_final[il] named by mean.hpp / pca.hpp: ggml_format_name(ctrl_out, "direction.%zu", il+1), and v_final[il]
    # computed from the "l_out" tensor of block il (cb_eval). Reproduced with gguf-py, same keys, types and order.
    writer = gguf.GGUFWriter(path, "controlvector")  # writes general.architecture first
    writer.add_string("controlvector.model_hint", model_hint)
    if layer_count_type == "i32":
        writer.add_int32("controlvector.layer_count", len(v_final))
    for il, vector in enumerate(v_final):
        writer.add_tensor(f"direction.{il + 1}", vector)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_repeng_gguf_direction_n_is_block_n_output(tmp_path):
    rng = _rng(6)
    # read_representations' default hidden_layers = range(-1, -num_hidden_layers, -1): n-1 down to 1, dict order
    directions = {layer: rng.standard_normal(HIDDEN).astype(np.float32) for layer in range(N_LAYERS - 1, 0, -1)}
    _repeng_export_gguf(tmp_path / "happy.gguf", "llama", directions)
    assert detect(tmp_path / "happy.gguf") == "repeng-gguf"
    raw = read_foreign(tmp_path / "happy.gguf", scale=-0.5, expected_model="llama")
    assert sorted(raw.vectors) == [1, 2, 3, 4] and raw.num_layers == N_LAYERS
    assert torch.equal(raw.vectors[2], torch.from_numpy(-0.5 * directions[2]))
    assert raw.provenance["model_hint"] == "llama" and raw.provenance["format"] == "repeng-gguf"
    # ControlModule.forward adds coeff * direction to model.layers[layer]'s output
    theirs = _run(X, at_output={layer: torch.from_numpy(-0.5 * d) for layer, d in directions.items()})
    assert torch.allclose(_ours(raw, X), theirs, atol=1e-6)
    # repeng can write direction.0 (block 0's output, read at hidden_states[1]); we can steer it
    _repeng_export_gguf(tmp_path / "zero.gguf", "llama", {0: directions[1]})
    assert sorted(read_foreign(tmp_path / "zero.gguf").vectors) == [0]
    with pytest.raises(SteeringVectorsError, match=r"happy\.gguf: the file was made for model 'llama'.*'qwen2'"):
        read_foreign(tmp_path / "happy.gguf", expected_model="qwen2")
    as_read = read_foreign(tmp_path / "happy.gguf", gguf_layers="as-read")  # repeng reads where it adds
    assert sorted(as_read.vectors) == [1, 2, 3, 4] and as_read.provenance["gguf_layers"] == "as-read"


def test_llama_cpp_gguf_is_shifted_by_one(tmp_path):
    rng = _rng(7)
    # cvector-generator on an N_LAYERS model: l_out of blocks 0..N-2 (the last block's l_out keeps only the output
    # rows and is skipped by cb_eval), so N-1 vectors, v_final[il] read at block il's output.
    read_at = [rng.standard_normal(HIDDEN).astype(np.float32) for _ in range(N_LAYERS - 1)]
    _llama_cpp_export_gguf(tmp_path / "cv.gguf", "llama", read_at)
    assert detect(tmp_path / "cv.gguf") == "llama-cpp-gguf"
    raw = read_foreign(tmp_path / "cv.gguf", expected_model="llama", gguf_layers="as-read")
    assert raw.num_layers == N_LAYERS  # layer_count + 1
    assert sorted(raw.vectors) == [0, 1, 2, 3]
    for il, vector in enumerate(read_at):  # direction.{il+1} lands where it was read: block il's output
        assert torch.equal(raw.vectors[il], torch.from_numpy(vector))
    assert raw.provenance["gguf_layers"] == "as-read"
    assert "-> our layers.{X-1}" in raw.provenance["layer_mapping"]
    assert torch.allclose(_ours(raw, X), _run(X, at_output=dict(enumerate(map(torch.from_numpy, read_at)))))
    # by default as llama.cpp applies it: llama_adapter_cvec::apply_to adds tensors[N] (= direction.N) after block N
    applied = read_foreign(tmp_path / "cv.gguf")
    assert sorted(applied.vectors) == [1, 2, 3, 4] and applied.num_layers == N_LAYERS
    assert applied.provenance["gguf_layers"] == "as-applied"
    llama_cpp = _run(X, at_output={il + 1: torch.from_numpy(v) for il, v in enumerate(read_at)})
    assert torch.allclose(_ours(applied, X), llama_cpp, atol=1e-6)
    with pytest.raises(SteeringVectorsError, match=r"gguf_layers='shifted'; expected 'as-applied' or 'as-read'"):
        read_foreign(tmp_path / "cv.gguf", gguf_layers="shifted")


def test_gguf_writer_unknown_reads_as_applied_and_needs_an_explicit_format_as_read(tmp_path):
    vectors = [np.full(HIDDEN, i + 1, np.float32) for i in range(3)]
    _llama_cpp_export_gguf(tmp_path / "anon.gguf", "llama", vectors, layer_count_type=None)
    assert detect(tmp_path / "anon.gguf") == GGUF_UNKNOWN_WRITER
    assert sorted(read_foreign(tmp_path / "anon.gguf").vectors) == [1, 2, 3]  # as llama.cpp applies it, any writer
    with pytest.raises(
        SteeringVectorsError,
        match=r"anon\.gguf: gguf_layers='as-read' needs the file's writer.*no controlvector\.layer_count.*"
        r"fmt='repeng-gguf' or fmt='llama-cpp-gguf'",
    ):
        read_foreign(tmp_path / "anon.gguf", gguf_layers="as-read")
    as_repeng = read_foreign(tmp_path / "anon.gguf", fmt="repeng-gguf", gguf_layers="as-read")
    assert sorted(as_repeng.vectors) == [1, 2, 3] and "given as fmt='repeng-gguf'" in as_repeng.provenance["writer"]
    as_llama = read_foreign(tmp_path / "anon.gguf", fmt="llama-cpp-gguf", gguf_layers="as-read")
    assert sorted(as_llama.vectors) == [0, 1, 2]
    assert torch.equal(as_llama.vectors[0], torch.full((HIDDEN,), 1.0))


def test_gguf_sizes_and_our_own_writer(tmp_path):
    _repeng_export_gguf(tmp_path / "bad.gguf", "llama", {1: np.zeros(HIDDEN, np.float32), 2: np.zeros(4, np.float32)})
    with pytest.raises(
        SteeringVectorsError, match=r"bad\.gguf: tensor 'direction\.2' has 4 elements, expected 8 .*disagree"
    ):
        read_foreign(tmp_path / "bad.gguf")
    # our writer (formats.write, .gguf) records layer_count as UINT32 like repeng, with the same meaning
    table = {layer: torch.randn(HIDDEN) for layer in (1, 3)}
    formats.write(RawVectors(table, N_LAYERS, HIDDEN, "org/model", "test"), tmp_path / "ours.gguf")
    assert detect(tmp_path / "ours.gguf") == "repeng-gguf"
    raw = read_foreign(tmp_path / "ours.gguf", expected_model="org/model")
    assert sorted(raw.vectors) == [1, 3] and torch.equal(raw.vectors[3], table[3])


def test_check_model_hint_and_detect_misc(tmp_path):
    check_model_hint("llama", "LLaMA", "f")
    check_model_hint("gpt_neox", ["gptneox"], "f")
    check_model_hint("/models/Qwen2.5-7B/", "Qwen/Qwen2.5-7B", "f")
    check_model_hint("", "anything", "f")  # no hint: nothing to check
    check_model_hint("llama", None, "f")
    with pytest.raises(
        SteeringVectorsError,
        match=r"f: the file was made for model 'llama' \(its model hint\), expected 'qwen2' or 'x'",
    ):
        check_model_hint("llama", ["qwen2", "x"], "f")
    (tmp_path / "notes.txt").write_text("hi")
    assert detect(tmp_path / "notes.txt") is None
    assert detect(tmp_path / "missing.svec") is None
    with pytest.raises(SteeringVectorsError, match=r"notes\.txt: not a steering-vector format"):
        read_foreign(tmp_path / "notes.txt")
    with pytest.raises(SteeringVectorsError, match=r"unknown foreign format 'npz'"):
        read_foreign(tmp_path / "notes.txt", fmt="npz")
    torch.save(torch.zeros(2, 3, 4), tmp_path / "cube.pt")
    with pytest.raises(SteeringVectorsError, match=r"cube\.pt: the tensor is \(2, 3, 4\), expected a float tensor"):
        read_foreign(tmp_path / "cube.pt", layers=[0])
