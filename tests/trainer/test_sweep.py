"""Several runs on one learner (a sweep): each sequence reads its own run's vectors, and each run takes the
step it would take alone (float64), with its own optimizer, schedule, clipping and loss options. Plus the
sweep's options: expansion, names, what runs may and may not differ in."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.config import load_runs
from trainer.learner import SteeredLearner
from trainer.rollout import Sample
from trainer.sweep import check_sweep
from trainer.trainables import SteeringTrainable, build_sweep
from trainer.update import LossOptions, RunBatch, learn, learn_runs

REQUIRED = ["--model", "m", "--output_dir", "out", "--train_data", "d.jsonl"]


def _model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)


def _batch(vocab_size, seed, count):
    g = torch.Generator().manual_seed(seed)
    sequences = []
    for i in range(count):
        prompt = torch.randint(1, vocab_size, (3 + i % 4,), generator=g).tolist()
        completion = torch.randint(1, vocab_size, (2 + (i * 3) % 7,), generator=g).tolist()
        sequences.append((prompt, Sample(completion, (-torch.rand(len(completion), generator=g)).tolist(), "", False)))
    advantage = torch.randn(count, generator=g, dtype=torch.float64)
    advantage[:2] = 0.0  # a group that scored the same: no backward
    keep = torch.ones(count, dtype=torch.float64)
    keep[-1] = 0.0
    return sequences, advantage, keep


# two runs that differ in everything a run owns: lr, weight decay, warm-up, clipping, loss normalisation, KL
RUNS = [
    dict(lr=0.05, weight_decay=0.0, warmup=0, options=LossOptions(1.0, 3, "token_sum", 16, 1.0)),
    dict(lr=0.02, weight_decay=0.1, warmup=2, options=LossOptions(1.0, 3, "token_mean", 16, 0.05, kl_coef=0.3)),
]


def _optimizer(parameters, run):
    optimizer = torch.optim.AdamW(parameters, lr=run["lr"], weight_decay=run["weight_decay"])
    warmup = run["warmup"]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))


def _initial(config, runs):
    g = torch.Generator().manual_seed(11)
    return torch.randn(runs, config.num_hidden_layers, config.hidden_size, generator=g, dtype=torch.float64) * 0.1


def test_runs_in_one_learner_take_the_steps_they_take_alone(tiny_model_dirs):
    model_dir = str(tiny_model_dirs["qwen2"])
    model = _model(model_dir)
    initial = _initial(model.config, len(RUNS))
    batches = [_batch(model.config.vocab_size, seed, 7) for seed in range(len(RUNS))]
    steps = 3

    alone = []
    for number, run in enumerate(RUNS):
        trainable = SteeringTrainable(_model(model_dir), initial[number], False, model_dir)
        trainable.vector_parameter.data = trainable.vector_parameter.data.double()
        optimizer, scheduler = _optimizer(trainable.parameters(), run)
        for _ in range(steps):
            learn(trainable, optimizer, scheduler, *batches[number], run["options"], 0)
        alone.append(trainable.vector_parameter.detach().clone())

    learner = SteeredLearner(model, initial, runs=len(RUNS))
    for parameter in learner.run_vectors:
        parameter.data = parameter.data.double()
    views = [SteeringTrainable(model, None, False, model_dir, learner, r, f"run{r}") for r in range(len(RUNS))]
    optimizers = [_optimizer(view.parameters(), run) for view, run in zip(views, RUNS, strict=True)]
    for _ in range(steps):
        runs = [RunBatch(*batch, run["options"], view.parameters(), *optimizer)
                for batch, run, view, optimizer in zip(batches, RUNS, views, optimizers, strict=True)]  # fmt: skip
        learn_runs(learner, views[0].reference_logprobs, runs, 0)
    for number, expected in enumerate(alone):
        together = learner.run_vectors[number].detach()
        assert (together - initial[number]).abs().max() > 1e-3  # each run moved
        # float64, micro-batches of 3 mixing the runs' sequences: measured 2.7e-15. A run clipped at the other's
        # max_grad_norm (6e-4), or sequences reading other runs' vectors (0.26), fails here (checked).
        assert torch.allclose(together, expected, atol=3e-14, rtol=0), (together - expected).abs().max()


def test_each_sequence_reads_its_own_runs_vectors(tiny_model_dirs):
    """The isolation: sequence i of a batch scored by the sweep's learner equals the one-run learner holding
    its run's vectors; reading the rows swapped does not (the control)."""
    model = _model(str(tiny_model_dirs["qwen2"]))
    initial = _initial(model.config, 3)
    learner = SteeredLearner(model, initial, runs=3)
    for parameter in learner.run_vectors:
        parameter.data = parameter.data.double()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, model.config.vocab_size, (6, 9), generator=g)
    attention = torch.ones_like(ids)
    runs = torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        together = learner.token_logprobs(ids, attention, 1.0, runs)
        swapped = learner.token_logprobs(ids, attention, 1.0, runs.flip(0))
        for row, run in enumerate(runs.tolist()):
            single = SteeredLearner(model, initial[run])
            single.steering.data = single.steering.data.double()
            expected = single.token_logprobs(ids[row : row + 1], attention[row : row + 1], 1.0)[0]
            assert torch.allclose(together[row], expected, atol=1e-12, rtol=0), (together[row] - expected).abs().max()
            if runs.flip(0)[row] != run:
                assert (swapped[row] - expected).abs().max() > 1e-4


def test_sweep_options_expand_to_the_cartesian_product(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\noutput_dir: out\ntrain_data: d.jsonl\nsweep:\n  learning_rate: [0.03, 0.1]\n")
    runs, sweep = load_runs(["--config", str(path), "--sweep", "seed=0,1,2", "--steps", "5"])
    assert sweep and len(runs) == 6
    assert [r.name for r in runs[:3]] == ["learning_rate=0.03,seed=0", "learning_rate=0.03,seed=1",
                                          "learning_rate=0.03,seed=2"]  # fmt: skip
    assert [(r.config.learning_rate, r.config.seed) for r in runs[-2:]] == [(0.1, 1), (0.1, 2)]
    assert runs[4].config.output_dir == "out/learning_rate=0.1,seed=1" and runs[4].config.steps == 5
    assert runs[4].overrides == {"learning_rate": 0.1, "seed": 1}
    assert load_runs(REQUIRED + ["--sweep", "learning_rate=1e-3,0.1"])[0][0].overrides == {"learning_rate": 0.001}
    check_sweep([r.config for r in runs])
    single, sweep = load_runs(REQUIRED)
    assert not sweep and len(single) == 1 and single[0].config.output_dir == "out"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--sweep", "max_new_tokens=64,128"], "cannot differ between the runs of one sweep"),
        (["--sweep", "learning_rate"], "expected KEY=V1,V2"),
        (["--sweep", "learning_rate=0.1,0.1"], "runs with the same values"),
        (["--sweep", "learning_rate=1e-3,0.001"], "runs learning_rate=1e-3 and learning_rate=0.001 have the same"),
        (["--sweep", "learning_rate=-1,0.1"], "learning_rate must be > 0"),
    ],
)
def test_bad_sweeps_are_refused_naming_the_problem(arguments, message):
    with pytest.raises(ValueError, match=message):
        load_runs(REQUIRED + arguments)


def test_run_names_keep_paths_apart_and_yaml_keys_take_dashes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\noutput_dir: out\ntrain_data: d.jsonl\nsweep:\n  learning-rate: [0.1]\n")
    runs, _ = load_runs(["--config", str(path), "--sweep", "init_vectors=runs/a/v.safetensors,runs/b/v.safetensors"])
    names = ["learning_rate=0.1,init_vectors=runs_a_v", "learning_rate=0.1,init_vectors=runs_b_v"]
    assert [r.name for r in runs] == names


def test_a_learner_step_refuses_batches_that_do_not_match_its_runs(tiny_model_dirs):
    model = _model(str(tiny_model_dirs["qwen2"]))
    learner = SteeredLearner(model, runs=2)
    view = SteeringTrainable(model, None, False, "m", learner, 1, "run1")
    optimizer, scheduler = _optimizer(view.parameters(), RUNS[0])
    sequences, advantage, keep = _batch(model.config.vocab_size, 0, 3)
    batch = RunBatch(sequences, advantage, keep, RUNS[0]["options"], view.parameters(), optimizer, scheduler)
    with pytest.raises(ValueError, match="holds 2 runs' vectors, got 1"):
        learn_runs(learner, view.reference_logprobs, [batch], 0)
    with pytest.raises(RuntimeError, match="use run_vectors"):
        _ = learner.steering


def test_runs_that_cannot_share_an_engine_or_learner_are_refused():
    runs, _ = load_runs(REQUIRED + ["--sweep", "seed=0,1"])
    configs = [r.config for r in runs]
    with pytest.raises(ValueError, match=r"differ in temperature \(1.0 vs 0.7\)"):
        check_sweep([configs[0], dataclasses.replace(configs[1], temperature=0.7)])
    with pytest.raises(ValueError, match="a sweep trains steering vectors"):
        check_sweep([dataclasses.replace(c, trainable="lora") for c in configs])


def test_build_sweep_gives_each_run_its_own_row_and_set(tiny_model_dirs, tmp_path):
    from steering_vllm import SteeringVectors

    model = _model(str(tiny_model_dirs["qwen2"]))
    shape = (model.config.num_hidden_layers, model.config.hidden_size)
    init = SteeringVectors.from_tensor(torch.full(shape, 0.25)).save(tmp_path / "init.safetensors")
    runs, _ = load_runs(REQUIRED + ["--sweep", f"init_vectors={init},null"])
    views = build_sweep(model, [r.config for r in runs], "m")
    assert [v.set_name for v in views] == ["run0", "run1"] and views[0].learner is views[1].learner
    assert [v.extra_args() for v in views] == [{"steering": "run0"}, {"steering": "run1"}]
    assert (
        torch.equal(views[0].vectors().to_tensor(), torch.full(shape, 0.25))
        and not views[1].vectors().to_tensor().any()
    )
    assert views[0].parameters()[0] is views[0].learner.run_vectors[0]


def test_a_run_without_checkpoints_resumes_from_the_start_and_pruning_waits(tiny_model_dirs, tmp_path):
    """A sweep killed after some runs wrote their first checkpoint: the others have none, so every run starts
    again (step 0, metrics dropped); checkpoints are pruned only when asked, after every run has written."""
    from trainer.run import RunState

    model = _model(str(tiny_model_dirs["qwen2"]))
    runs, _ = load_runs(["--model", "m", "--output_dir", str(tmp_path), "--train_data", "d.jsonl",
                         "--keep_checkpoints", "1", "--save_every", "1", "--sweep", "seed=0,1"])  # fmt: skip
    views = build_sweep(model, [r.config for r in runs], "m")
    states = [RunState(r.config, view, rank=0) for r, view in zip(runs, views, strict=True)]
    for step in (1, 2):
        states[0].step = step
        states[0].write({"step": step, "time": {}})
    assert sorted(p.name for p in (states[0].output_dir / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    states[0].prune_checkpoints()
    assert [s.latest_step() for s in states] == [2, 0]
    states[0].resume(0)
    assert (states[0].output_dir / "metrics.jsonl").read_text() == ""  # every step is redone


def test_a_run_a_checkpoint_ahead_drops_it_when_it_redoes_that_step(tiny_model_dirs, tmp_path):
    """Killed after run 0 wrote step 4's checkpoint and before run 1 did (keep 1): both resume from step 2, and
    run 0's stale step 4 goes at the next prune, not its step 2, so a second kill can still resume."""
    from trainer.checkpoint import common_resume_step
    from trainer.run import RunState

    model = _model(str(tiny_model_dirs["qwen2"]))
    runs, _ = load_runs(["--model", "m", "--output_dir", str(tmp_path), "--train_data", "d.jsonl",
                         "--keep_checkpoints", "1", "--save_every", "2", "--sweep", "seed=0,1"])  # fmt: skip
    views = build_sweep(model, [r.config for r in runs], "m")
    states = [RunState(r.config, view, rank=0) for r, view in zip(runs, views, strict=True)]

    def step(state, number):
        state.step = number
        state.write({"step": number, "time": {}})

    def kept(state):
        return sorted(p.name for p in (state.output_dir / "checkpoints").iterdir())

    for state in states:
        step(state, 2)
        state.prune_checkpoints()
    step(states[0], 4)  # the kill comes before run 1 writes step 4
    latest = {str(s.output_dir): s.latest_step() for s in states}
    assert latest == {str(states[0].output_dir): 4, str(states[1].output_dir): 2}
    assert common_resume_step(latest, save_every=2) == 2
    for state in states:
        state.resume(2)
        step(state, 3)
        state.prune_checkpoints()
    assert kept(states[0]) == kept(states[1]) == ["step_000002"]
    assert common_resume_step({str(s.output_dir): s.latest_step() for s in states}, save_every=2) == 2


def test_runs_that_never_trained_together_are_not_resumed_together():
    from trainer.checkpoint import common_resume_step

    assert common_resume_step({"a": 10, "b": 0}, save_every=10) == 0  # killed between the first checkpoints
    with pytest.raises(ValueError, match=r"run c has no checkpoint and run a one at step 90.*save_every \(10\)"):
        common_resume_step({"a": 90, "b": 90, "c": 0}, save_every=10)  # c added to a finished sweep
    with pytest.raises(FileNotFoundError, match="no checkpoint in a/checkpoints, b/checkpoints"):
        common_resume_step({"a": 0, "b": 0}, save_every=10)
