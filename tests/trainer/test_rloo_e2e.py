"""`python -m trainer.rloo` end to end on a tiny model with the real vLLM engine (CPU, fp32).

The random tiny model never boxes a right answer, so the run scores with a shaped reward given by import
path (the share of digits in the completion): enough signal for the vectors to move. Two runs of the same
config: one uninterrupted, one killed with SIGKILL after a few steps and resumed: same final vectors.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from engine_utils import ENGINE_ENV

from steering_vllm import SteeringVectors

pytestmark = [pytest.mark.engine, pytest.mark.slow]

STEPS = 8
# logprob_gap, fp32 engine and learner: measured 2.3-2.7e-7 (steering, full and LoRA; AVX-512 and AVX2)
CANARY_TOLERANCE = 3e-6
HELPERS = str(Path(__file__).resolve().parents[1] / "helpers")


@pytest.fixture(scope="module")
def config_for(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("rloo")
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(10) for b in range(10)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def config_for(name: str) -> Path:
        config = {
            "model": str(tiny_model_dirs["qwen2"]),
            "output_dir": str(root / name),
            "train_data": str(root / "train.jsonl"),
            "steps": STEPS,
            "prompts_per_step": 4,
            "samples_per_prompt": 4,
            "max_new_tokens": 48,
            "micro_batch_size": 6,  # 16 sequences: micro-batches of 6, 6, 4
            "learning_rate": 0.05,
            "warmup_steps": 2,
            "save_every": 2,
            "keep_checkpoints": 2,
            "reward_fn": "shaped_rewards:digit_share",
            "reward_workers": 1,  # a cheap reward: one spawned process is enough
            "eval_data": str(root / "train.jsonl"),
            "eval_prompts": 4,
            "eval_every": 4,
            "engine": {"enforce_eager": True, "gpu_memory_utilization": 0.05, "max_model_len": 512},
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return config_for


def _trainer(config: Path, *extra: str) -> subprocess.Popen:
    """The trainer in its own process group, so a kill can take its engine processes with it."""
    env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")])}
    env.pop("VLLM_LOGGING_LEVEL", None)  # the trainer's own default
    command = [sys.executable, "-m", "trainer.rloo", "--config", str(config), *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(config_for):
    config = config_for("straight")
    output = _finish(_trainer(config))
    assert "held-out accuracy before training" in output and "held-out accuracy after training" in output
    assert " INFO " not in output, "vLLM's INFO log drowns the run's own output; warnings only by default"
    return Path(yaml.safe_load(config.read_text())["output_dir"])


def test_a_run_trains_the_vectors_and_engine_and_learner_agree(uninterrupted):
    metrics = _metrics(uninterrupted)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["step"] for m in metrics if "eval_accuracy" in m] == [4, 8]
    vectors = SteeringVectors.load(uninterrupted / "steering_vectors.safetensors")
    assert min(vectors.norms()) > 0.05  # every layer's vector moved away from zero
    # the canary: the engine sampled with the vectors the learner scores with; fp32 on both sides
    assert max(m["logprob_gap"] for m in metrics) < CANARY_TOLERANCE
    assert all(m["reward_status"] and m["time"].keys() == {"generate", "score", "learn", "sync"} for m in metrics)
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == ["step_000006", "step_000008"]
    resolved = yaml.safe_load((uninterrupted / "config.yaml").read_text())
    assert resolved["steps"] == STEPS and resolved["temperature"] == 1.0
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["eval_accuracy_after"] == metrics[-1]["eval_accuracy"]  # the last step's eval, not redone
    assert 0 <= summary["eval_accuracy_before"] <= 1
    assert (uninterrupted / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_run_writes_tensorboard_events_that_tensorboard_reads(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(uninterrupted / "tensorboard"))
    board.Reload()
    metrics = _metrics(uninterrupted)
    for tag in ("reward_mean", "logprob_gap", "time/learn"):
        events = board.Scalars(tag)
        assert [e.step for e in events] == list(range(1, STEPS + 1)), tag
    logged = [e.value for e in board.Scalars("reward_mean")]
    assert logged == pytest.approx([m["reward_mean"] for m in metrics], rel=1e-6)  # float32 in the event file
    assert [e.step for e in board.Scalars("eval_accuracy")] == [4, 8]


def _kill_after_three_steps(process: subprocess.Popen, output_dir: Path) -> None:
    deadline = time.monotonic() + 300
    while not (output_dir / "metrics.jsonl").exists() or len(_metrics(output_dir)) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    # the whole group, as a crash or a preempted job would: a SIGKILL to the trainer alone leaves vLLM's engine
    # core running as an orphan (it holds the model for the rest of the session)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_a_killed_run_resumes_to_the_same_vectors(config_for, uninterrupted):
    config = config_for("killed")
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    _kill_after_three_steps(_trainer(config), output_dir)
    killed_at = len(_metrics(output_dir))
    assert killed_at < STEPS
    output = _finish(_trainer(config, "--resume"))
    assert "resumed from" in output
    assert [m["step"] for m in _metrics(output_dir)] == list(range(1, STEPS + 1))
    # the accuracy before training, measured by the killed process, survives into the resumed run's summary
    before = [json.loads((d / "summary.json").read_text())["eval_accuracy_before"] for d in (output_dir, uninterrupted)]
    assert before[0] == before[1]
    resumed = SteeringVectors.load(output_dir / "steering_vectors.safetensors").to_tensor()
    straight = SteeringVectors.load(uninterrupted / "steering_vectors.safetensors").to_tensor()
    assert torch.allclose(resumed, straight, atol=1e-6, rtol=0), (resumed - straight).abs().max()


SWEEP = ["--sweep", "learning_rate=0.05,0.02", "--sweep", "seed=0,1"]


@pytest.fixture(scope="module")
def sweep(config_for):
    """Four runs (2 learning rates x 2 seeds) in one process: one engine, one learner."""
    config = config_for("sweep")
    _finish(_trainer(config, *SWEEP))
    return Path(yaml.safe_load(config.read_text())["output_dir"])


def test_a_sweep_trains_each_run_as_it_would_train_alone(config_for, uninterrupted, sweep):
    config = config_for("alone")
    alone = Path(yaml.safe_load(config.read_text())["output_dir"])
    _finish(_trainer(config, "--learning_rate", "0.02", "--seed", "1"))
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == ["learning_rate=0.02,seed=0", "learning_rate=0.02,seed=1", "learning_rate=0.05,seed=0",
                    "learning_rate=0.05,seed=1"]  # fmt: skip
    for name, single in {"learning_rate=0.05,seed=0": uninterrupted, "learning_rate=0.02,seed=1": alone}.items():
        swept, expected = _metrics(sweep / name), _metrics(single)
        # the same rollouts (lengths), rewards and held-out scores, step by step
        for key in ("step", "response_length", "reward_mean", "reward_std", "reward_status", "eval_accuracy"):
            assert [m.get(key) for m in swept] == [m.get(key) for m in expected], key
        assert [m["learning_rate"] for m in swept] == [m["learning_rate"] for m in expected]
        assert max(m["logprob_gap"] for m in swept) < CANARY_TOLERANCE
        summaries = [json.loads((d / "summary.json").read_text()) for d in (sweep / name, single)]
        assert summaries[0]["eval_accuracy_before"] == summaries[1]["eval_accuracy_before"]
        vectors = SteeringVectors.load(sweep / name / "steering_vectors.safetensors").to_tensor()
        reference = SteeringVectors.load(single / "steering_vectors.safetensors").to_tensor()
        # fp32, after 8 steps: measured 2.3e-7 (the learner's batches hold other runs' sequences too), 0 for a run
        # whose micro-batches happen to match; a run reading another's vectors in the engine or the learner is
        # off by ~0.2
        assert torch.allclose(vectors, reference, atol=3e-6, rtol=0), (vectors - reference).abs().max()
        assert (sweep / name / "checkpoints" / "step_000008").is_dir() and (sweep / name / "curves.png").is_file()
    table = (sweep / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| learning_rate | seed | held-out before (%)") and len(table) == 2 + len(runs)
    assert len(json.loads((sweep / "sweep.json").read_text())) == len(runs)
    assert (sweep / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_killed_sweep_resumes_every_run(config_for, sweep):
    config = config_for("sweep-killed")
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    last = output_dir / "learning_rate=0.02,seed=1"  # written last each step
    _kill_after_three_steps(_trainer(config, *SWEEP), last)
    output = _finish(_trainer(config, *SWEEP, "--resume"))
    assert output.count("resumed from") == 4
    for run in sweep.iterdir():
        if run.is_dir():
            assert [m["step"] for m in _metrics(output_dir / run.name)] == list(range(1, STEPS + 1))
            resumed = SteeringVectors.load(output_dir / run.name / "steering_vectors.safetensors").to_tensor()
            straight = SteeringVectors.load(run / "steering_vectors.safetensors").to_tensor()
            assert torch.allclose(resumed, straight, atol=1e-6, rtol=0), (run.name, (resumed - straight).abs().max())


def test_torchrun_splits_every_runs_prompts_of_a_sweep(config_for, sweep):
    """Two ranks, each with its own engine and half of every run's prompts, gradients all-reduced per run (gloo).
    A single run is the one-run case of the same code (the prompts' split, the learner step's reductions)."""
    config = config_for("sweep-ddp")
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run([*torchrun, "-m", "trainer.rloo", "--config", str(config), *SWEEP], env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    for run in (p for p in sweep.iterdir() if p.is_dir()):
        ddp, single = _metrics(output_dir / run.name), _metrics(run)
        assert all(m["prompts_per_rank"] == [2, 2] for m in ddp)
        assert [m["response_length"] for m in ddp] == [m["response_length"] for m in single]
        assert [m["reward_mean"] for m in ddp] == pytest.approx([m["reward_mean"] for m in single], abs=1e-6)
        vectors = SteeringVectors.load(output_dir / run.name / "steering_vectors.safetensors").to_tensor()
        straight = SteeringVectors.load(run / "steering_vectors.safetensors").to_tensor()
        # fp32, entries up to 0.33: measured 1e-7 to 8e-7 in three runs, 1.2e-5 in one (the ranks sum the gradient in
        # another order, and Adam's normalised step turns rounding in near-zero components into visible steps); a
        # run reading another's rows, or ranks reducing another run's gradient, is off by ~0.1
        assert torch.allclose(vectors, straight, atol=1e-4, rtol=0), (run.name, (vectors - straight).abs().max())


@pytest.mark.parametrize("trainable, output, moved", [("full", "model", "weight_update_norm"),
                                                      ("lora", "lora_adapter", "lora_update_norm")])  # fmt: skip
def test_the_baselines_train_through_the_same_trainer(config_for, trainable, output, moved):
    config = config_for(f"baseline-{trainable}")
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    _finish(_trainer(config, "--trainable", trainable, "--steps", "2", "--lora_rank", "4"))
    metrics = _metrics(output_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[-1][moved] > 0
    # the engine serves the learner's weights after each sync: full reloads them, LoRA loads a new adapter
    assert max(m["logprob_gap"] for m in metrics) < CANARY_TOLERANCE
    assert (output_dir / output).is_dir() and (output_dir / "checkpoints" / "step_000002").is_dir()
    if trainable == "full":  # a directory vLLM and trainer.eval load as it is
        assert (output_dir / output / "config.json").is_file() and (output_dir / output / "tokenizer.json").is_file()
    assert not (output_dir / "steering_vectors.safetensors").exists()


@pytest.fixture(scope="module")
def init_vectors(tmp_path_factory):
    g = torch.Generator().manual_seed(7)
    vectors = SteeringVectors.from_tensor(torch.randn(4, 128, generator=g) * 0.3)
    return vectors, vectors.save(tmp_path_factory.mktemp("init") / "init.safetensors")


# The random tiny model almost never answers right (first_character), so with signed rewards and truncated
# completions penalized every sample scores -1: no group has variance, and the only gradient left is the KL
# penalty's. It also rarely samples its stop token: in one step of 16 completions of 16 tokens, all truncated.
OPTIONS = ["--max_new_tokens", "16", "--temperature", "0.7", "--reward_fn", "shaped_rewards:first_character",
           "--reward_mode", "signed", "--advantage", "group_mean", "--kl_coef", "1.0",
           "--importance_correction", "tis", "--learning_rate", "0.01"]  # fmt: skip


# on other families than the other runs' Qwen2 (Gemma 2: the learner loaded with SDPA must still apply the
# attention cap the engine applies): the engine and the learner must agree on each
@pytest.mark.parametrize(
    "truncated, steps, family", [("penalize", 2, "qwen3_moe"), ("mask", 1, "mistral"), ("mask", 1, "gemma2")]
)
def test_the_objective_options_run_end_to_end(config_for, tiny_model_dirs, init_vectors, truncated, steps, family):
    vectors, path = init_vectors
    config = config_for(f"options-{truncated}-{family}")
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    extra = ["--steps", str(steps), "--init_vectors", str(path), "--truncated", truncated]
    extra += ["--model", str(tiny_model_dirs[family])]
    _finish(_trainer(config, *OPTIONS, *extra))
    metrics = _metrics(output_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    # signed rewards: +1 right, -1 anything else (binary would give 0)
    assert all(m["reward_mean"] == pytest.approx(2 * m["accuracy"] - 1) for m in metrics)
    # the engine started from the init vectors and samples at temperature 0.7 as the learner scores
    assert max(m["logprob_gap"] for m in metrics) < CANARY_TOLERANCE
    # the learner started from them too: its KL against the base model is not 0 at step 1
    assert metrics[0]["kl"] > 1e-3
    assert all(m["importance_clipped"] == 0.0 for m in metrics)  # fp32: engine and learner agree
    trained = SteeringVectors.load(output_dir / "steering_vectors.safetensors").to_tensor()
    if truncated == "mask":
        assert metrics[0]["truncation_rate"] == 1.0, "the premise above no longer holds"
        assert metrics[0]["samples_in_loss"] == 0.0 and metrics[0]["loss"] == 0.0
        assert torch.equal(trained, vectors.to_tensor())  # nothing in the loss, nothing moved
    else:
        assert all(m["samples_in_loss"] == 1.0 and m["zero_variance_groups"] == 1.0 for m in metrics)
        assert all(m["reward_mean"] == -1.0 for m in metrics)
        # no advantage anywhere: the KL penalty's is the only gradient, and it moved the vectors
        assert all(m["grad_norm"] > 0 for m in metrics)
        assert (trained - vectors.to_tensor()).abs().max() > 1e-3
