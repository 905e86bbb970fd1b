"""Train steering vectors with RLOO: ``python -m trainer.rloo --config FILE.yaml [--key value ...] [--resume]``.

One step: take the step's prompts, sample N completions each with the vLLM engine (steered by the current
vectors), score them with Math-Verify, compute leave-one-out advantages, recompute the completions' logprobs
with the learner (the HF model, frozen, with the vectors as its only parameters, running the same fused op),
take an AdamW step on the vectors, and hot-swap the new vectors into the engine.

Writes into ``output_dir``: ``config.yaml`` (resolved), ``steering_vectors.safetensors`` (the latest
vectors, every step), ``checkpoints/step_N/`` (resumable), ``metrics.jsonl`` (one JSON line per step),
``summary.json`` (held-out accuracy before and after, the output's path), ``curves.png`` (reward and held-out
accuracy against step, ``trainer.curves``), and TensorBoard events under ``tensorboard/`` when installed.

``--sweep KEY=V1,V2 [--sweep ...]`` (or a ``sweep:`` block) trains the cartesian product of the values as
runs of one process: one engine (each run a per-request set, updated in place every step) and one learner
(each sequence reads its own run's vectors; each run has its own optimizer, schedule and clipping). Each run
writes the files above into ``output_dir/KEY=V,...``; ``output_dir`` gets the sweep's table and curves.

Under ``torchrun --nproc-per-node K`` each rank runs its own engine on its share of the step's prompts and
the learners' gradients are all-reduced (DDP); rank 0 writes the outputs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import sys
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from trainer.checkpoint import common_resume_step
from trainer.config import TrainConfig, load_runs
from trainer.data import PromptBuilder, batch_indices, load_examples, stop_token_ids
from trainer.objective import advantages
from trainer.rewards import RewardPool
from trainer.rollout import RolloutEngine
from trainer.run import RunState
from trainer.sweep import check_sweep, write_sweep_summary
from trainer.trainables import build_sweep, build_trainable
from trainer.update import RunBatch, learn_runs
from trainer.vllm_logging import set_vllm_log_level


class Trainer:
    """What the runs share (tokenizer, frozen model and learner, rollout engine, reward pool, data) and each
    run's own state (``trainer.run.RunState``). One run, or a sweep's runs in lockstep: every step, all
    runs' rollouts go into one ``generate`` call (each run its own per-request set and sampling seeds), and
    one learner pass computes every run's gradient (each sequence reading its own run's vectors)."""

    def __init__(self, configs: list[TrainConfig], sweep: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = configs[0]  # the options every run shares
        self.config, self.sweep = config, sweep
        self.rank, self.world_size, self.device = _start_distributed()
        learner_dtype, dtype = precision(config.trainable, config.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=learner_dtype).to(self.device).eval()
        if sweep:
            trainables = build_sweep(model, configs, config.model)
        else:
            torch.manual_seed(config.seed)  # LoRA's initial A: the same on every rank
            trainables = [build_trainable(config.trainable, model, config, config.model, self.tokenizer)]
        self.learner = trainables[0].learner
        self.runs = [RunState(c, t, self.rank) for c, t in zip(configs, trainables, strict=True)]
        if config.resume:
            # a kill between a sweep's runs' checkpoints leaves some a checkpoint ahead (before the first: some
            # with none, and then every run starts again)
            latest = {str(run.output_dir): run.latest_step() for run in self.runs}
            step = common_resume_step(latest, config.save_every)
            for run in self.runs:
                run.resume(step)
        for run in self.runs:
            run.save_config()

        self.train_examples = load_examples(config.train_data, config.question_field, config.answer_field,
                                            config.train_split)  # fmt: skip
        self.eval_examples = None
        if config.eval_data:
            examples = load_examples(config.eval_data, config.question_field, config.answer_field, config.eval_split)
            self.eval_examples = examples[: config.eval_prompts] if config.eval_prompts else examples
        self.prompt = PromptBuilder(self.tokenizer, config.prompt_template, config.system_prompt,
                                    config.plain_template)  # fmt: skip
        engine_kwargs = {**trainables[0].engine_kwargs(), **config.engine}
        if sweep:  # each run is a per-request set of the one engine
            extra = engine_kwargs.get("additional_config") or {}
            engine_kwargs["additional_config"] = {**extra, "max_steering_configs": len(self.runs)}
        self.engine = RolloutEngine(config.model, str(dtype).removeprefix("torch."), config.seed,
                                    stop_token_ids(self.tokenizer, config.model), engine_kwargs)  # fmt: skip
        self.rewards = RewardPool(config.reward_fn, config.reward_mode, config.reward_workers, config.reward_timeout_s)
        for run in self.runs:
            if sweep or run.step > 0 or run.config.init_vectors:  # a sweep's sets must exist before generating
                run.trainable.sync(self.engine)

    # ---- one step ----------------------------------------------------------------------------------------

    def train_step(self) -> list[dict]:
        """One optimizer step of every run; returns each run's metrics line."""
        config, timer = self.config, _Timer()
        n = config.samples_per_prompt
        plans = [self._prompts(run) for run in self.runs]  # per run: (position, example, ids) kept, skipped
        kept = [(run, *prompt) for run, (prompts, _) in zip(self.runs, plans, strict=True) for prompt in prompts]
        with timer("generate"):
            groups = self.engine.generate(
                [ids for _, _, _, ids in kept],
                n,
                config.temperature,
                config.top_p,
                config.max_new_tokens,
                seeds=[f"{run.config.seed}:{run.step}:{position}" for run, position, _, _ in kept],
                lora_request=self.runs[0].trainable.lora_request(),
                extra_args=[run.trainable.extra_args() for run, _, _, _ in kept] if self.sweep else None,
            )
        with timer("score"):
            samples = [s for group in groups for s in group]
            golds = [example.answer for _, _, example, _ in kept for _ in range(n)]
            modes = [run.config.reward_mode for run, _, _, _ in kept for _ in range(n)]
            scores = self.rewards.score([s.text for s in samples], golds, modes)
        batches, locals_ = [], []
        start = 0
        for run, (prompts, skipped) in zip(self.runs, plans, strict=True):
            mine = slice(start, start + len(prompts))
            start += len(prompts)
            batch, local = self._batch(run, prompts, groups[mine], scores[mine.start * n : mine.stop * n], skipped)
            batches.append(batch)
            locals_.append(local)
        with timer("learn"):
            learned = learn_runs(self.learner, self.runs[0].trainable.reference_logprobs, batches,
                                 self.tokenizer.pad_token_id or 0)  # fmt: skip
        with timer("sync"):
            for run in self.runs:
                run.trainable.sync(self.engine)
        for local, sums in zip(locals_, learned, strict=True):
            local["token_sums"] = {k: sums[k] for k in ("gap_sum", "gap_tokens", "kl_sum", "clipped_tokens")}
            local["time"] = timer.seconds
        parts = _gather(locals_)  # each rank's list of every run's part
        records = []
        for number, (run, sums) in enumerate(zip(self.runs, learned, strict=True)):
            run.step += 1
            records.append(run.record([part[number] for part in parts], sums))
        return records

    def _prompts(self, run: RunState) -> tuple[list[tuple], int]:
        """This rank's share of the run's prompts this step, (position in the step, example, ids), without those
        over ``max_prompt_tokens``; and how many were over."""
        config = self.config
        indices = batch_indices(len(self.train_examples), config.prompts_per_step, run.step, run.config.seed)
        mine = [(position, self.train_examples[i]) for position, i in enumerate(indices)][self.rank :: self.world_size]
        prompts = [(position, example, self.prompt(example.question)) for position, example in mine]
        kept = [p for p in prompts if len(p[2]) <= config.max_prompt_tokens]
        return kept, len(prompts) - len(kept)

    def _batch(self, run: RunState, prompts, groups, scores, skipped: int) -> tuple[RunBatch, dict]:
        """The run's learner batch (advantages, which samples count) and its part of the metrics."""
        options, n = run.config, self.config.samples_per_prompt
        samples = [s for group in groups for s in group]
        rewards = torch.tensor([s.reward for s in scores]).view(len(groups), n)
        truncated = torch.tensor([s.truncated for s in samples], dtype=torch.bool).view_as(rewards)
        if options.truncated == "penalize":
            rewards = torch.where(truncated, torch.full_like(rewards, run.failure_reward), rewards)
        advantage = advantages(rewards, options.advantage, options.scale_advantage_by_std).flatten()
        keep = (~truncated).flatten().float() if options.truncated == "mask" else torch.ones(len(samples))
        sequences = [(ids, sample) for (_, _, ids), group in zip(prompts, groups, strict=True) for sample in group]
        batch = RunBatch(sequences, advantage, keep, run.loss_options, run.trainable.parameters(), run.optimizer,
                         run.scheduler)  # fmt: skip
        local = {
            "rewards": rewards.tolist(),
            "truncated": truncated.flatten().tolist(),
            "lengths": [len(s.token_ids) for s in samples],
            "statuses": [s.status for s in scores],
            "skipped": skipped,
            "in_loss": keep.tolist(),
        }
        return batch, local

    # ---- evaluation and the loop -------------------------------------------------------------------------

    def evaluate(self) -> list[float]:
        """Each run's accuracy on the held-out split: one completion per question at ``eval_temperature`` (0:
        greedy), every run's in one ``generate`` call. Greedy runs with the same vectors are scored once."""
        config = self.config
        mine = self.eval_examples[self.rank :: self.world_size]
        greedy = config.eval_temperature == 0
        key = [run.trainable.vectors().content_hash() if greedy and self.sweep else str(i)
               for i, run in enumerate(self.runs)]  # fmt: skip
        scored = {k: self.runs[key.index(k)] for k in dict.fromkeys(key)}  # one run per distinct key
        prompts = [self.prompt(e.question) for e in mine]
        groups = self.engine.generate(
            prompts * len(scored),
            1,
            config.eval_temperature,
            1.0,
            config.max_new_tokens,
            seeds=[
                f"eval:{run.config.seed}:{self.rank + i * self.world_size}"
                for run in scored.values()
                for i in range(len(mine))
            ],  # fmt: skip
            lora_request=self.runs[0].trainable.lora_request(),
            extra_args=[run.trainable.extra_args() for run in scored.values() for _ in mine] if self.sweep else None,
        )
        scores = self.rewards.score([g[0].text for g in groups], [e.answer for e in mine] * len(scored))
        correct = [sum(s.status == "correct" for s in scores[i * len(mine) : (i + 1) * len(mine)])
                   for i in range(len(scored))]  # fmt: skip
        totals = [sum(ranks) for ranks in zip(*_gather(correct), strict=True)]
        accuracy = dict(zip(scored, (total / len(self.eval_examples) for total in totals), strict=True))
        return [accuracy[k] for k in key]

    def train(self) -> list[dict]:
        """Train every run to ``steps``; returns each run's summary."""
        config = self.config
        summaries = [run.read_summary() for run in self.runs]
        if self.eval_examples and self.runs[0].step == 0:
            for run, summary, accuracy in zip(self.runs, summaries, self.evaluate(), strict=True):
                summary["eval_accuracy_before"] = accuracy
                run.write_summary(summary)
            self._say(f"held-out accuracy before training: {_listed(s['eval_accuracy_before'] for s in summaries)}")
        bar = tqdm(total=config.steps, initial=self.runs[0].step, desc="rloo", unit="step", dynamic_ncols=True,
                   disable=self.rank != 0)  # fmt: skip
        records = [{} for _ in self.runs]
        while self.runs[0].step < config.steps:
            records = self.train_step()
            step = self.runs[0].step
            if self.eval_examples and config.eval_every and step % config.eval_every == 0:
                for record, accuracy in zip(records, self.evaluate(), strict=True):
                    record["eval_accuracy"] = accuracy
            if self.rank == 0:
                for run, record in zip(self.runs, records, strict=True):
                    run.write(record)
                for run in self.runs:  # once every run has this step's checkpoint
                    run.prune_checkpoints()
            reward = statistics.fmean(r["reward_mean"] for r in records)
            bar.set_postfix(reward=f"{reward:.3f}", gap=f"{max(r['logprob_gap'] for r in records):.1e}")
            bar.update(1)
        bar.close()
        if self.eval_examples:
            # the last step's periodic eval already scored these weights
            last = [r.get("eval_accuracy") for r in records]
            after = last if None not in last else self.evaluate()
            for summary, accuracy in zip(summaries, after, strict=True):
                summary["eval_accuracy_after"] = accuracy
            self._say(f"held-out accuracy after training: {_listed(after)}")
        summaries = [run.finish(summary) for run, summary in zip(self.runs, summaries, strict=True)]
        for summary in summaries:
            self._say(f"trained {config.trainable}: {summary['output']}")
        return summaries

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr)

    def close(self) -> None:
        self.rewards.close()
        self.engine.shutdown()
        for run in self.runs:
            run.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _listed(values) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def precision(trainable: str, dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(learner, engine) dtypes for the ``dtype`` option: ``auto`` is bf16 on CUDA and fp32 on CPU. Full
    fine-tuning under ``auto`` keeps fp32 master weights (AdamW on bf16 weights loses small updates); the
    engine still runs the option's dtype, and the sync casts."""
    engine = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
              "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]  # fmt: skip
    learner = torch.float32 if trainable == "full" and dtype == "auto" else engine
    return learner, engine


def _start_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun, joins the process group (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    # One GPU per rank, for the learner and for the engine's own worker processes (which would otherwise all
    # take the first visible GPU): narrow CUDA_VISIBLE_DEVICES before anything touches CUDA.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible != "":
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local_rank] if visible else str(local_rank)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def _gather(value) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class _Timer:
    """Named wall-clock spans: ``with timer("generate"): ...``; ``seconds`` maps names to durations."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 4)


def main(argv: list[str] | None = None) -> int:
    try:
        runs, sweep = load_runs(argv)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configs = [run.config for run in runs]
    if sweep:
        try:
            check_sweep(configs)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    set_vllm_log_level(configs[0].vllm_log_level)
    # SIGTERM (a scheduler's preemption, `kill`) and Ctrl-C unwind with SystemExit, so close() shuts the engine's
    # processes down; without this they outlive the trainer. Not KeyboardInterrupt: while the engine starts, vLLM
    # 0.32 swallows it (vllm.utils.network_utils.zmq_socket_ctx) and then waits for an engine that Ctrl-C already
    # killed, for up to 10 min (VLLM_ENGINE_READY_TIMEOUT_S). Resume from the last checkpoint with --resume.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))
    trainer = Trainer(configs, sweep)
    try:
        summaries = trainer.train()
        if sweep and trainer.rank == 0:
            write_sweep_summary(runs, summaries)
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
