"""One training run's own state: its trainable, optimizer, learning-rate schedule, step and outputs.

A run alone and each run of a sweep write the same files into their ``output_dir``: ``config.yaml``,
``steering_vectors.safetensors`` (every step), ``checkpoints/step_N/``, ``metrics.jsonl``, ``summary.json``,
``curves.png`` and TensorBoard events under ``tensorboard/``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch

from trainer.checkpoint import (
    checkpoint_at,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from trainer.config import TrainConfig, save_config
from trainer.curves import SUMMARY_FILE, plot_curves, read_summary
from trainer.objective import zero_variance_fraction
from trainer.rewards import MODE_REWARDS
from trainer.update import LossOptions


class RunState:
    def __init__(self, config: TrainConfig, trainable, rank: int):
        self.config = config
        self.trainable = trainable
        self.rank = rank
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.optimizer = torch.optim.AdamW(
            trainable.parameters(),
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.step = 0
        self.loss_options = LossOptions(
            temperature=config.temperature,
            micro_batch_size=config.micro_batch_size,
            normalization=config.loss_normalization,
            constant=config.loss_constant or config.max_new_tokens,
            max_grad_norm=config.max_grad_norm,
            tis_cap=config.tis_cap if config.importance_correction == "tis" else None,
            kl_coef=config.kl_coef,
        )
        self.failure_reward = MODE_REWARDS[config.reward_mode][1]
        self.board = _tensorboard(self.output_dir) if rank == 0 else None

    def latest_step(self) -> int:
        """The step of this run's latest checkpoint; 0 if it has none."""
        checkpoint = latest_checkpoint(self.output_dir)
        return 0 if checkpoint is None else checkpoint_step(checkpoint)

    def resume(self, step: int) -> None:
        """Continue from this run's checkpoint of ``step`` (0: from the start); metric lines of later steps are
        dropped."""
        if step == 0:
            if self.rank == 0:
                _truncate_metrics(self.output_dir / "metrics.jsonl", 0)
            return
        checkpoint = checkpoint_at(self.output_dir, step)
        state = load_checkpoint(checkpoint)
        self.trainable.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        if self.rank == 0:
            _truncate_metrics(self.output_dir / "metrics.jsonl", self.step)
            print(f"resumed from {checkpoint} at step {self.step}", file=sys.stderr)

    def save_config(self) -> None:
        if self.rank == 0:
            save_config(self.config, self.output_dir / "config.yaml")

    def record(self, parts: list[dict], learned: dict) -> dict:
        """The step's metrics line from every rank's part (rewards, statuses, token sums, times) and the
        learner's step. In a sweep, ``time`` is the whole sweep's step (its generate, learn, ... spans)."""
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
            "time": {name: max(part["time"][name] for part in parts) for name in parts[0]["time"]},  # the slowest
        }

    def write(self, record: dict) -> None:
        """The step's outputs: the latest vectors, its metrics line, TensorBoard and, when due, a checkpoint."""
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
            save_checkpoint(self.output_dir, self.step, state, None, files)

    def prune_checkpoints(self) -> None:
        """Keep the last ``keep_checkpoints``; called once every run of the step has written its checkpoint."""
        prune_checkpoints(self.output_dir, self.config.keep_checkpoints, self.step)

    def read_summary(self) -> dict:
        summary = read_summary(self.output_dir) if self.step > 0 else {}
        summary["trainable_parameters"] = sum(p.numel() for p in self.trainable.parameters())
        return summary

    def write_summary(self, summary: dict) -> None:
        if self.rank == 0:
            (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")

    def finish(self, summary: dict) -> dict:
        """Save what was trained and plot the curves; returns the summary with their paths."""
        summary["output"] = str(self.trainable.save(self.output_dir)) if self.rank == 0 else None
        self.write_summary(summary)
        if self.rank == 0 and (self.output_dir / "metrics.jsonl").is_file():
            curves = plot_curves({self.config.trainable: [self.output_dir]}, self.output_dir / "curves.png")
            summary["curves"] = str(curves)
            self.write_summary(summary)
        return summary

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _tensorboard(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(str(output_dir / "tensorboard"))


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines of steps the checkpoint does not include (they will be redone)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))
