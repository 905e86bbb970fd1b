"""The plugin's flags on vLLM's own argument parser, and their route into additional_config (no engine)."""

import json

import pytest
import torch

from steering_vllm import SteeringVectors


@pytest.fixture(scope="module")
def parser():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # add_cli_args loads the general plugins first, exactly as `vllm serve` does
    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())


def test_flags_reach_additional_config_next_to_the_users_own(parser, tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    path = SteeringVectors.from_tensor(torch.randn(2, 8)).save(tmp_path / "v.safetensors")
    argv = ["--model", "m", "--additional-config", json.dumps({"other": 1}), "--steering-vectors", str(path)]
    engine_args = AsyncEngineArgs.from_cli_args(parser.parse_args([*argv, "--steering-scale", "0.25"]))
    assert engine_args.additional_config == {"other": 1, "steering_vectors": str(path), "steering_scale": 0.25}


def test_without_the_flag_nothing_is_added(parser):
    from vllm.engine.arg_utils import AsyncEngineArgs

    assert not AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m"])).additional_config


def test_a_scale_without_vectors_is_refused_not_dropped(parser, tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    path = SteeringVectors.from_tensor(torch.randn(2, 8)).save(tmp_path / "a.safetensors")
    args = parser.parse_args(["--model", "m", "--steering-sets", f"a={path}", "--steering-scale", "2"])
    with pytest.raises(ValueError, match="--steering-scale scales --steering-vectors, which was not given"):
        AsyncEngineArgs.from_cli_args(args)


def test_flag_checks_the_file_when_parsed(parser, tmp_path, capsys):
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--steering-vectors", str(tmp_path / "bad.npy")])
    assert f"argument --steering-vectors: {tmp_path / 'bad.npy'}: not a readable .npy file" in capsys.readouterr().err


def test_help_lists_the_flags(parser):
    text = parser.format_help()
    assert "--steering-vectors PATH" in text and "--steering-scale FACTOR" in text


def test_vectors_for_an_unsupported_architecture_are_refused(tiny_model_dirs, tmp_path):
    """Steering exists only in the registered families; vectors for another model must not be ignored silently."""
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    model_dir = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "phi3")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["Phi3ForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    path = SteeringVectors.zeros(4, 128).save(tmp_path / "v.safetensors")
    args = EngineArgs(model=str(model_dir), max_model_len=256, additional_config={"steering_vectors": str(path)})
    with pytest.raises(ValueError, match=r"v\.safetensors: model .*phi3 is \['Phi3ForCausalLM'\]; steering supp"):
        args.create_engine_config()


def test_set_flags_reach_additional_config(parser, tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    a = SteeringVectors.from_tensor(torch.randn(2, 8)).save(tmp_path / "a.safetensors")
    b = SteeringVectors.from_tensor(torch.randn(2, 8)).save(tmp_path / "b.safetensors")
    argv = ["--model", "m", "--steering-sets", f"a={a}", f"b.v2={b}", "--max-steering-configs", "8"]
    engine_args = AsyncEngineArgs.from_cli_args(parser.parse_args(argv))
    assert engine_args.additional_config == {"steering_sets": {"a": str(a), "b.v2": str(b)}, "max_steering_configs": 8}


@pytest.mark.parametrize(
    "value, message",
    [
        ("a", "'a': give NAME=PATH"),
        ("none={path}", "'none' is reserved"),
        ("a b={path}", "'a b' is malformed"),
        ("a={missing}", "file not found"),
    ],
)
def test_bad_set_flags_are_refused_when_parsed(parser, tmp_path, capsys, value, message):
    path = SteeringVectors.zeros(2, 8).save(tmp_path / "v.safetensors")
    value = value.format(path=path, missing=tmp_path / "missing.safetensors")
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--steering-sets", value])
    assert message in capsys.readouterr().err


def test_a_set_name_given_twice_is_refused(parser, tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    path = SteeringVectors.zeros(2, 8).save(tmp_path / "v.safetensors")
    args = parser.parse_args(["--model", "m", "--steering-sets", f"a={path}", f"a={path}"])
    with pytest.raises(ValueError, match=r"--steering-sets names \['a'\] more than once"):
        AsyncEngineArgs.from_cli_args(args)


def test_sets_that_do_not_fit_the_model_are_refused_before_any_worker_starts(tiny_model_dirs, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    path = SteeringVectors.zeros(4, 64).save(tmp_path / "narrow.safetensors")
    config = {"steering_sets": {"narrow": str(path)}}
    args = EngineArgs(model=str(tiny_model_dirs["qwen2"]), max_model_len=256, additional_config=config)
    with pytest.raises(ValueError, match="steering set 'narrow': .*hidden_size 64 does not match the model's 128"):
        args.create_engine_config()


class _OtherExtension:
    pass


def test_hot_swap_accepts_the_steering_extension_and_extensions_of_it_only():
    from steering_vllm.serve.worker import EXTENSION, SteeringWorkerExtension, has_steering_extension
    from trainer.full_weights_worker import EXTENSION as FULL_WEIGHTS

    assert has_steering_extension(EXTENSION) and has_steering_extension(FULL_WEIGHTS)
    assert has_steering_extension(type("Mine", (SteeringWorkerExtension,), {}))
    assert not has_steering_extension(f"{__name__}._OtherExtension")
    assert not has_steering_extension(_OtherExtension) and not has_steering_extension(None)


def test_each_vector_file_is_parsed_once_on_the_way_to_the_engine(parser, tiny_model_dirs, tmp_path, monkeypatch):
    """The flag's check, the check against the model and the front end's sets all read the same files."""
    from vllm.engine.arg_utils import EngineArgs

    from steering_vllm.per_request.frontend import load_sets
    from steering_vllm.vectors import reading

    default = SteeringVectors.from_tensor(torch.randn(4, 128)).save(tmp_path / "default.safetensors")
    other = SteeringVectors.from_tensor(torch.randn(4, 128)).save(tmp_path / "a.safetensors")
    parsed = []
    read = reading.read
    monkeypatch.setattr(reading, "read", lambda path, *args: parsed.append(path.name) or read(path, *args))
    argv = ["--model", str(tiny_model_dirs["qwen2"]), "--max-model-len", "256", "--steering-vectors", str(default),
            "--steering-sets", f"a={other}"]  # fmt: skip
    engine_args = EngineArgs.from_cli_args(parser.parse_args(argv))
    vllm_config = engine_args.create_engine_config()
    sets = load_sets(vllm_config.model_config, vllm_config.additional_config)
    assert sorted(parsed) == ["a.safetensors", "default.safetensors"]
    assert torch.equal(sets.sets["a"].to_tensor(), SteeringVectors.load(other).to_tensor())


@pytest.mark.parametrize("hint, refused", [("llama", True), ("qwen2", False), ("my-org/qwen-finetune", False)])
def test_a_gguf_model_type_hint_is_checked_against_the_model(tiny_model_dirs, tmp_path, hint, refused):
    """repeng and llama.cpp record the model type a control vector was made for: a Llama vector on a Qwen2 model is
    refused at start-up; a hint that is a model name (our writer's) is not a type and is not checked."""
    from vllm.engine.arg_utils import EngineArgs

    table = torch.randn(4, 128)
    table[0] = 0  # GGUF has no slot for block 0
    path = SteeringVectors.from_tensor(table, model=hint).save(tmp_path / "v.gguf")
    args = EngineArgs(
        model=str(tiny_model_dirs["qwen2"]), max_model_len=256, additional_config={"steering_vectors": str(path)}
    )
    if refused:
        with pytest.raises(
            ValueError, match=r"v\.gguf: the file was made for model 'llama' \(its model hint\), expected 'qwen2'"
        ):
            args.create_engine_config()
    else:
        assert args.create_engine_config().additional_config["steering_vectors"] == str(path)


def test_the_phase_flag_reaches_additional_config(parser):
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine_args = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", "--steering-phase", "generation"]))
    assert engine_args.additional_config == {"steering_phase": "generation"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--steering-phase", "decode"])


def test_model_types_are_checked_only_where_a_library_records_one(tiny_model_dirs, tmp_path):
    """llama.cpp's hint is its architecture name ("llama" also for Mistral): not checked at start-up; IBM's .svec
    records the HF model type: checked; a file converted to ours is not checked again."""
    import gguf
    import numpy as np
    from vllm.engine.arg_utils import EngineArgs

    def start(path):
        config = {"steering_vectors": str(path)}
        return EngineArgs(model=str(tiny_model_dirs["qwen2"]), max_model_len=256, additional_config=config)

    writer = gguf.GGUFWriter(tmp_path / "cv.gguf", "controlvector")  # llama.cpp's cvector-generator
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_int32("controlvector.layer_count", 3)
    for block in (1, 2, 3):
        writer.add_tensor(f"direction.{block}", np.full(128, 0.1, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    start(tmp_path / "cv.gguf").create_engine_config()
    directions = {str(layer): [0.1] * 128 for layer in (1, 2, 3)}
    svec = tmp_path / "b.svec"
    svec.write_text(json.dumps({"model_type": "llama", "directions": directions, "explained_variances": {}}))
    with pytest.raises(ValueError, match=r"b\.svec: the file was made for model 'llama'"):
        start(svec).create_engine_config()
    SteeringVectors.load(svec).save(tmp_path / "converted.safetensors")
    start(tmp_path / "converted.safetensors").create_engine_config()
