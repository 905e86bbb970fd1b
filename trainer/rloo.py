"""Train steering vectors with RLOO: ``python -m trainer.rloo --config FILE.yaml [--key value ...] [--resume]``.

One step: take the step's prompts, sample N completions each with the vLLM engine (steered by the current
vectors), score them with Math-Verify, compute leave-one-out advantages, recompute the completions' logprobs
with the learner (the HF model, frozen, with the vectors as its only parameters, running the same fused op),
take an AdamW step on the vectors, and hot-swap the new vectors into the engine.

Writes into ``output_dir``: ``config.yaml`` (resolved), ``steering_vectors.safetensors`` (the latest
vectors, every step), ``checkpoints/step_N/`` (resumable), ``metrics.jsonl`` (one JSON line per step),
``summary.json`` (held-out accuracy before and after, the output's path), ``curves.png`` (reward and held-out
accuracy against step, ``trainer.curves``), and TensorBoard events under ``tensorboard/`` when installed.

Under ``torchrun --nproc-per-node K`` each rank runs its own engine on its share of the step's prompts and
the learners' gradients are all-reduced (DDP); rank 0 writes the outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig, load_config, save_config
from trainer.curves import SUMMARY_FILE, plot_curves, read_summary
from trainer.data import PromptBuilder, batch_indices, load_examples, stop_token_ids
from trainer.objective import advantages, zero_variance_fraction
from trainer.rewards import RewardPool
from trainer.rollout import RolloutEngine
from trainer.trainables import build_trainable
from trainer.update import LossOptions, learn
from trainer.vllm_logging import set_vllm_log_level


class Run:
    """Everything a training run holds: trainable, optimizer, engine, reward pool, data, outputs."""

    def __init__(self, config: TrainConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.rank, self.world_size, self.device = _start_distributed()
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        learner_dtype, dtype = precision(config.trainable, config.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=learner_dtype).to(self.device).eval()
        torch.manual_seed(config.seed)  # LoRA's initial A: the same on every rank
        self.trainable = build_trainable(config.trainable, model, config, config.model, self.tokenizer)
        self.optimizer = torch.optim.AdamW(
            self.trainable.parameters(),
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.step = 0
        if config.resume:
            self._resume()
        if self.rank == 0:
            save_config(config, self.output_dir / "config.yaml")

        self.train_examples = load_examples(config.train_data, config.question_field, config.answer_field,
                                            config.train_split)  # fmt: skip
        self.eval_examples = None
        if config.eval_data:
            examples = load_examples(config.eval_data, config.question_field, config.answer_field, config.eval_split)
            self.eval_examples = examples[: config.eval_prompts] if config.eval_prompts else examples
        self.prompt = PromptBuilder(self.tokenizer, config.prompt_template, config.system_prompt,
                                    config.plain_template)  # fmt: skip
        self.engine = RolloutEngine(config.model, str(dtype).removeprefix("torch."), config.seed,
                                    stop_token_ids(self.tokenizer, config.model),
                                    {**self.trainable.engine_kwargs(), **config.engine})  # fmt: skip
        self.rewards = RewardPool(config.reward_fn, config.reward_mode, config.reward_workers, config.reward_timeout_s)
        if self.step > 0 or config.init_vectors:
            self.trainable.sync(self.engine)
        self.loss_options = LossOptions(
            temperature=config.temperature,
            micro_batch_size=config.micro_batch_size,
            normalization=config.loss_normalization,
            constant=config.loss_constant or config.max_new_tokens,
            max_grad_norm=config.max_grad_norm,
            tis_cap=config.tis_cap if config.importance_correction == "tis" else None,
            kl_coef=config.kl_coef,
        )
        self.board = _tensorboard(self.output_dir) if self.rank == 0 else None

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.output_dir / 'checkpoints'}")
        state = load_checkpoint(checkpoint)
        self.trainable.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        if self.rank == 0:
            _truncate_metrics(self.output_dir / "metrics.jsonl", self.step)
            print(f"resumed from {checkpoint} at step {self.step}", file=sys.stderr)

    # ---- one step ----------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        config = self.config
        timer = _Timer()
        indices = batch_indices(len(self.train_examples), config.prompts_per_step, self.step, config.seed)
        mine = [(position, self.train_examples[i]) for position, i in enumerate(indices)][self.rank :: self.world_size]
        prompts = [(position, example, self.prompt(example.question)) for position, example in mine]
        kept = [p for p in prompts if len(p[2]) <= config.max_prompt_tokens]
        with timer("generate"):
            groups = self.engine.generate(
                [ids for _, _, ids in kept],
                config.samples_per_prompt,
                config.temperature,
                config.top_p,
                config.max_new_tokens,
                seeds=[f"{config.seed}:{self.step}:{position}" for position, _, _ in kept],
                lora_request=self.trainable.lora_request(),
            )
        with timer("score"):
            samples = [s for group in groups for s in group]
            golds = [example.answer for _, example, _ in kept for _ in range(config.samples_per_prompt)]
            scores = self.rewards.score([s.text for s in samples], golds)
        rewards = torch.tensor([s.reward for s in scores]).view(len(groups), config.samples_per_prompt)
        truncated = torch.tensor([s.truncated for s in samples], dtype=torch.bool).view_as(rewards)
        if config.truncated == "penalize":
            rewards = torch.where(truncated, torch.full_like(rewards, self.rewards.failure_reward), rewards)
        advantage = advantages(rewards, config.advantage, config.scale_advantage_by_std).flatten()
        keep = (~truncated).flatten().float() if config.truncated == "mask" else torch.ones(len(samples))
        sequences = [(ids, sample) for (_, _, ids), group in zip(kept, groups, strict=True) for sample in group]
        with timer("learn"):
            learned = learn(self.trainable, self.optimizer, self.scheduler, sequences, advantage, keep,
                            self.loss_options, self.tokenizer.pad_token_id or 0)  # fmt: skip
        with timer("sync"):
            self.trainable.sync(self.engine)
        self.step += 1
        local = {
            "rewards": rewards.tolist(),
            "truncated": truncated.flatten().tolist(),
            "lengths": [len(s.token_ids) for s in samples],
            "statuses": [s.status for s in scores],
            "skipped": len(prompts) - len(kept),
            "token_sums": {k: learned[k] for k in ("gap_sum", "gap_tokens", "kl_sum", "clipped_tokens")},
            "in_loss": keep.tolist(),
            "time": timer.seconds,
        }
        return self._record(_gather(local), learned)

    def _record(self, parts: list[dict], learned: dict) -> dict:
        rewards = torch.tensor([row for part in parts for row in part["rewards"]])
        truncated = torch.tensor([t for part in parts for t in part["truncated"]], dtype=torch.float32)
        lengths = torch.tensor([n for part in parts for n in part["lengths"]], dtype=torch.float32)
        statuses = Counter(s for part in parts for s in part["statuses"])
        sums = {key: sum(part["token_sums"][key] for part in parts) for key in parts[0]["token_sums"]}
        tokens = max(sums["gap_tokens"], 1.0)
        in_loss = [k for part in parts for k in part["in_loss"]]
        objective = {}
        if self.config.kl_coef > 0:
            objective["kl"] = sums["kl_sum"] / tokens  # KL(learner || base) per completion token, k3 estimate
        if self.config.importance_correction == "tis":
            objective["importance_clipped"] = sums["clipped_tokens"] / tokens  # share of tokens over tis_cap
        slowest = {name: max(part["time"][name] for part in parts) for name in parts[0]["time"]}
        return {
            "step": self.step,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "accuracy": statuses["correct"] / max(sum(statuses.values()), 1),
            "response_length": float(lengths.mean()),
            "truncation_rate": float(truncated.mean()),
            "zero_variance_groups": zero_variance_fraction(rewards),
            "prompts_skipped_too_long": sum(part["skipped"] for part in parts),
            "prompts_per_rank": [len(part["rewards"]) for part in parts],  # under torchrun: each rank's share
            "reward_status": dict(sorted(statuses.items())),
            "loss": learned["loss"],
            "grad_norm": learned["grad_norm"],
            # the canary: engine and learner score the same tokens with the same weights; must stay near 0
            "logprob_gap": sums["gap_sum"] / tokens,
            "samples_in_loss": sum(in_loss) / max(len(in_loss), 1),  # truncated: mask leaves truncated ones out
            **objective,
            "learning_rate": self.scheduler.get_last_lr()[0],
            **self.trainable.metrics(),
            "time": slowest,
        }

    # ---- evaluation and the loop -------------------------------------------------------------------------

    def evaluate(self) -> float:
        """Accuracy on the held-out split: one completion per question at ``eval_temperature`` (0: greedy)."""
        config = self.config
        mine = self.eval_examples[self.rank :: self.world_size]
        groups = self.engine.generate(
            [self.prompt(e.question) for e in mine],
            1,
            config.eval_temperature,
            1.0,
            config.max_new_tokens,
            seeds=[f"eval:{config.seed}:{self.rank + i * self.world_size}" for i in range(len(mine))],
            lora_request=self.trainable.lora_request(),
        )
        scores = self.rewards.score([g[0].text for g in groups], [e.answer for e in mine])
        correct = sum(_gather(sum(s.status == "correct" for s in scores)))
        return correct / len(self.eval_examples)

    def train(self) -> dict:
        config = self.config
        summary = read_summary(self.output_dir) if self.step > 0 else {}
        summary["trainable_parameters"] = sum(p.numel() for p in self.trainable.parameters())
        if self.eval_examples and self.step == 0:
            summary["eval_accuracy_before"] = self.evaluate()
            self._say(f"held-out accuracy before training: {summary['eval_accuracy_before']:.3f}")
            self._write_summary(summary)
        bar = tqdm(total=config.steps, initial=self.step, desc="rloo", unit="step", dynamic_ncols=True,
                   disable=self.rank != 0)  # fmt: skip
        record = {}
        while self.step < config.steps:
            record = self.train_step()
            if self.eval_examples and config.eval_every and self.step % config.eval_every == 0:
                record["eval_accuracy"] = self.evaluate()
            if self.rank == 0:
                self._write(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", gap=f"{record['logprob_gap']:.1e}")
            bar.update(1)
        bar.close()
        if self.eval_examples:
            # the last step's periodic eval already scored these weights
            after = record["eval_accuracy"] if "eval_accuracy" in record else self.evaluate()
            summary["eval_accuracy_after"] = after
            self._say(f"held-out accuracy after training: {summary['eval_accuracy_after']:.3f}")
        summary["output"] = str(self.trainable.save(self.output_dir)) if self.rank == 0 else None
        self._write_summary(summary)
        if self.rank == 0 and (self.output_dir / "metrics.jsonl").is_file():
            summary["curves"] = str(plot_curves({config.trainable: [self.output_dir]}, self.output_dir / "curves.png"))
            self._write_summary(summary)
        self._say(f"trained {config.trainable}: {summary['output']}")
        return summary

    def _write_summary(self, summary: dict) -> None:
        if self.rank == 0:
            (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")

    def _write(self, record: dict) -> None:
        config = self.config
        checkpoint_now = self.step % config.save_every == 0 or self.step == config.steps
        if config.trainable != "full" or checkpoint_now:  # the latest, every step, unless it is the whole model
            self.trainable.save(self.output_dir)
        with open(self.output_dir / "metrics.jsonl", "a") as metrics:
            metrics.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.board.add_scalar(key, value, record["step"])
            for key, value in record["time"].items():
                self.board.add_scalar(f"time/{key}", value, record["step"])
        if checkpoint_now:
            state = {"trainable": self.trainable.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict()}  # fmt: skip
            files = self.trainable.save if config.trainable != "full" else None  # full: the weights are in state
            save_checkpoint(self.output_dir, self.step, state, config.keep_checkpoints, files)

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr)

    def close(self) -> None:
        self.rewards.close()
        self.engine.shutdown()
        if self.board is not None:
            self.board.close()
        if dist.is_initialized():
            dist.destroy_process_group()


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


def _tensorboard(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(str(output_dir / "tensorboard"))


class _Timer:
    """Named wall-clock spans: ``with timer("generate"): ...``; ``seconds`` maps names to durations."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 4)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines of steps the checkpoint does not include (they will be redone)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    set_vllm_log_level(config.vllm_log_level)
    # SIGTERM (a scheduler's preemption, `kill`) and Ctrl-C unwind with SystemExit, so close() shuts the engine's
    # processes down; without this they outlive the trainer. Not KeyboardInterrupt: while the engine starts, vLLM
    # 0.32 swallows it (vllm.utils.network_utils.zmq_socket_ctx) and then waits for an engine that Ctrl-C already
    # killed, for up to 10 min (VLLM_ENGINE_READY_TIMEOUT_S). Resume from the last checkpoint with --resume.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))
    run = Run(config)
    try:
        run.train()
    finally:
        run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
