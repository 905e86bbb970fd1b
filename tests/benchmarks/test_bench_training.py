"""Table 3's learner measurements on the shipped toy model (no engine): counts and optimizer bytes are exact, the
step is timed whole, and the precision is the trainer's own default unless it cannot fit; a run records a table
per shape, ratios against steering from the same run, under a name of its own for other settings."""

import statistics

import pytest
import torch

from benchmarks import bench_training, results
from benchmarks.bench_training import TOY, arguments, build_model, build_trainable, record_tables, time_learner

shape_dtype, trainer_dtypes = bench_training.shape_dtype, bench_training.trainer_dtypes


@pytest.mark.parametrize("kind", ["steering", "full", "lora"])
def test_the_learner_step_is_measured_with_the_trainers_parameters(kind):
    model = build_model(TOY, torch.float32, torch.device("cpu"))
    config, total = model.config, sum(p.numel() for p in model.parameters())
    trainable = build_trainable(kind, model, lora_rank=1)
    expected = {
        "steering": config.num_hidden_layers * config.hidden_size,
        "full": total,
        "lora": config.num_hidden_layers * (config.intermediate_size + config.hidden_size),
    }[kind]
    parameters = sum(p.numel() for p in trainable.parameters())
    assert parameters == expected
    before = [p.detach().clone() for p in trainable.parameters()]
    result = time_learner(trainable, batch=4, tokens=16, steps=3, device=torch.device("cpu"))
    assert result["optimizer_bytes"] == 2 * 4 * parameters  # AdamW: exp_avg and exp_avg_sq, fp32
    assert min(result["forward"], result["backward"], result["optimizer"]) > 0
    # the timed steps really trained: every trainable tensor moved (LoRA's A waits for B to leave zero)
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, trainable.parameters(), strict=True)]
    assert any(moved) if kind == "lora" else all(moved)


def test_the_step_is_the_median_of_whole_steps_not_a_sum_of_phase_medians():
    trainable = build_trainable("steering", build_model(TOY, torch.float32, torch.device("cpu")), lora_rank=1)
    result = time_learner(trainable, batch=2, tokens=8, steps=4, device=torch.device("cpu"))
    steps, phases = result["step_times"], result["phase_times"]
    assert len(steps) == 4 and all(len(v) == 4 for v in phases.values())  # the warm-up step is left out
    assert result["step"] == statistics.median(steps)
    for i, whole in enumerate(steps):  # each whole step spans its three phases, clock to clock
        assert whole == pytest.approx(sum(v[i] for v in phases.values()), rel=1e-9)
    for name, values in phases.items():
        assert result[name] == statistics.median(values)


def test_precision_follows_the_trainer():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert trainer_dtypes("steering", "auto", cpu) == (torch.float32, torch.float32)
    assert trainer_dtypes("full", "auto", cpu) == (torch.float32, torch.float32)
    assert trainer_dtypes("steering", "auto", cuda) == (torch.bfloat16, torch.bfloat16)
    assert trainer_dtypes("full", "auto", cuda) == (torch.float32, torch.bfloat16)  # fp32 master weights
    assert trainer_dtypes("full", "bfloat16", cpu) == (torch.bfloat16, torch.bfloat16)


def test_a_full_tune_too_big_for_fp32_runs_the_shape_in_bf16_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_training, "count_parameters", lambda directory: 2 * 10**9)
    monkeypatch.setattr(bench_training, "device_memory", lambda device: 24 * 2**30)
    dtype, why = shape_dtype("qwen2.5-1.5b", "auto", ["steering", "full"], tmp_path)
    assert dtype == "bfloat16" and "fp32 master weights" in why and "~40.0 GB" in why  # 2e9 x 4 B x 5 copies
    assert shape_dtype("qwen2.5-1.5b", "auto", ["steering", "lora"], tmp_path) == ("auto", None)
    monkeypatch.setattr(bench_training, "count_parameters", lambda directory: 10**8)
    assert shape_dtype("qwen2.5-1.5b", "auto", ["steering", "full"], tmp_path) == ("auto", None)


def _rows(**extra):
    common = {"shape": "toy", "dtype": "float32", "engine_dtype": "float32", "batch": "2x8", "model_parameters": 1000,
              "peak_gib": None, **extra}  # fmt: skip
    return [
        {**common, "kind": "steering", "parameters": 10, "optimizer_bytes": 80, "forward": 1.0, "backward": 2.0,
         "optimizer": 0.001, "step": 3.5, "sync": 0.01},
        {**common, "kind": "full", "parameters": 1000, "optimizer_bytes": 8000, "forward": 1.0, "backward": 3.0,
         "optimizer": 0.1, "step": 4.2, "sync": 0.5},
    ]  # fmt: skip


def _table(rows, argv=()):
    """The recorded table's markdown, its name and its file."""
    args, parser = arguments(list(argv))
    ((name, _),) = record_tables(rows, args, parser)
    return results.markdown(results.load(name)), name, results.load(name)


def test_the_table_puts_ratios_against_steering_side_by_side():
    text, name, recorded = _table(_rows(dtype_option="auto"))
    assert name == f"training_cost_{results.device()}_toy"
    assert "| trainable parameters | 10 | 1,000 | 100.0x |" in text
    assert "| optimizer state (bytes) | 80 | 8,000 | 100.0x |" in text
    assert "| **learner step (s), median of whole steps** | 3.5000 | 4.2000 | 1.2x |" in text
    assert "| - backward (s), median of the phase | 2.0000 | 3.0000 | 1.5x |" in text
    assert "| sync into vLLM (s) | 0.0100 | 0.5000 | 50.0x |" in text
    assert "| learner / engine dtype | fp32 | fp32 |  |" in text
    assert "the trainer's default precision" in recorded["notes"]
    assert "peak memory" not in text  # CPU: not measured, so not shown
    assert [c[1] for c in recorded["columns"]] == ["", "Steering", "Full-Tune", "Full-Tune / Steering"]


def test_a_bf16_table_says_bf16():
    text, _, recorded = _table(_rows(dtype="bfloat16", engine_dtype="bfloat16", dtype_option="bfloat16",
                                     dtype_note="too big"))  # fmt: skip
    assert "bf16 (`dtype: bfloat16`); too big" in recorded["notes"] and "too big" in text
    assert "| learner / engine dtype | bf16 | bf16 |  |" in text


def test_a_run_records_a_table_per_shape_a_row_per_quantity_and_a_column_per_kind(tmp_path):
    args, parser = arguments(["--shapes", "toy", "--toy-batch", "4x16", "--steps", "1", "--no-sync"])
    shapes, kinds = bench_training.plan(args, tmp_path)
    rows = [{**bench_training.learner_row(shape, kind, args, tmp_path), "sync": None} for shape in shapes
            for kind in kinds]  # fmt: skip
    ((name, _),) = record_tables(rows, args, parser)
    assert name == f"training_cost_{results.device()}_toy_toy_batch4x16_no_sync"
    recorded = results.load(name)
    headers = ["", "Steering", "Full-Tune", "LoRA", "Full-Tune / Steering", "LoRA / Steering"]
    assert [c[1] for c in recorded["columns"]] == headers
    quantities = [r["quantity"] for r in recorded["rows"]]  # no sync measured: no sync rows; CPU: no peak memory
    assert quantities == [
        "learner / engine dtype", "trainable parameters", "optimizer state (bytes)",
        "**learner step (s), median of whole steps**", "- forward (s), median of the phase",
        "- backward (s), median of the phase", "- optimizer step (s), median of the phase",
    ]  # fmt: skip
    parameters = recorded["rows"][1]
    assert parameters["full_vs_steering"] == parameters["full"] / parameters["steering"] > 1000
    assert "batch 4x16 tokens" in recorded["notes"] and "medians of 1 steps" in recorded["title"]


def test_a_run_at_other_settings_does_not_overwrite_the_default_tables():
    device = results.device()
    for argv, suffix in (([], ""), (["--steps", "2"], ""), (["--kinds", "steering,lora"], "_kindssteering-lora"),
                         (["--dtype", "bfloat16"], ""), (["--lora-rank", "4"], "_lora_rank4")):  # fmt: skip
        assert _table(_rows(), argv)[1] == f"training_cost_{device}_toy{suffix}"  # --dtype is for the real shapes
    rows = [{**r, "shape": "qwen2.5-0.5b"} for r in _rows()]
    assert _table(rows, ["--dtype", "bfloat16"])[1] == f"training_cost_{device}_qwen2.5-0.5b_dtypebfloat16"
    assert _table(rows, ["--batch", "2x64"])[1] == f"training_cost_{device}_qwen2.5-0.5b_batch2x64"
