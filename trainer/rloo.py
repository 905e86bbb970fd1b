"""Train steering vectors with RLOO: ``python -m trainer.rloo --config FILE.yaml [--key value ...] [--resume]``.

One step: take the step's prompts, sample N completions each with the vLLM engine (steered by the current
vectors), score them with Math-Verify, compute leave-one-out advantages, recompute the completions' logprobs
with the learner (the HF model, frozen, with the vectors as its only parameters, running the same fused op),
take an AdamW step on the vectors, and hot-swap the new vectors into the engine.

Writes into ``output_dir``: ``config.yaml`` (resolved), ``steering_vectors.safetensors`` (the latest
vectors, every step), ``checkpoints/step_N/`` (resumable), ``metrics.jsonl`` (one JSON line per step).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steering_vllm import SteeringVectors
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig, load_config, save_config
from trainer.data import PromptBuilder, batch_indices, load_examples, stop_token_ids
from trainer.learner import SteeredLearner
from trainer.objective import advantages, loss_denominators, policy_loss, zero_variance_fraction
from trainer.rewards import RewardPool
from trainer.rollout import RolloutEngine


class Run:
    """Everything a training run holds: learner, optimizer, engine, reward pool, data, outputs."""

    def __init__(self, config: TrainConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]  # fmt: skip
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).to(self.device).eval()
        num_layers = model.config.num_hidden_layers
        initial = SteeringVectors.load(config.init_vectors, num_layers).to_tensor() if config.init_vectors else None
        self.learner = SteeredLearner(model, initial, config.gradient_checkpointing)
        self.optimizer = torch.optim.AdamW(
            [self.learner.steering],
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.step = 0
        if config.resume:
            self._resume()
        save_config(config, self.output_dir / "config.yaml")

        self.train_examples = load_examples(config.train_data, config.question_field, config.answer_field,
                                            config.train_split)  # fmt: skip
        self.eval_examples = None
        if config.eval_data:
            self.eval_examples = load_examples(config.eval_data, config.question_field, config.answer_field,
                                               config.eval_split)  # fmt: skip
            if config.eval_prompts:
                self.eval_examples = self.eval_examples[: config.eval_prompts]
        self.prompt = PromptBuilder(self.tokenizer, config.prompt_template, config.system_prompt,
                                    config.plain_template)  # fmt: skip
        self.engine = RolloutEngine(config.model, str(dtype).removeprefix("torch."), config.seed,
                                    stop_token_ids(self.tokenizer, config.model), config.engine)  # fmt: skip
        self.rewards = RewardPool(config.reward_fn, config.reward_mode, config.reward_workers, config.reward_timeout_s)
        self.failure_reward = -1.0 if config.reward_mode == "signed" else 0.0
        if self.learner.steering.any():
            self.engine.sync(self.learner.steering)

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.output_dir / 'checkpoints'}")
        state = load_checkpoint(checkpoint)
        with torch.no_grad():
            self.learner.steering.copy_(state["steering"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        _truncate_metrics(self.output_dir / "metrics.jsonl", self.step)
        print(f"resumed from {checkpoint} at step {self.step}", file=sys.stderr)

    # ---- one step ----------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        config = self.config
        timer = _Timer()
        batch = [self.train_examples[i] for i in batch_indices(len(self.train_examples), config.prompts_per_step,
                                                                self.step, config.seed)]  # fmt: skip
        prompts = [self.prompt(example.question) for example in batch]
        kept = [i for i, p in enumerate(prompts) if len(p) <= config.max_prompt_tokens]
        batch, prompts = [batch[i] for i in kept], [prompts[i] for i in kept]
        with timer("generate"):
            groups = self.engine.generate(prompts, config.samples_per_prompt, config.temperature, config.top_p,
                                          config.max_new_tokens, seed=f"{config.seed}:{self.step}")  # fmt: skip
        with timer("score"):
            samples = [s for group in groups for s in group]
            golds = [example.answer for example, group in zip(batch, groups, strict=True) for _ in group]
            scores = self.rewards.score([s.text for s in samples], golds)
        rewards = torch.tensor([s.reward for s in scores]).view(len(groups), config.samples_per_prompt)
        truncated = torch.tensor([s.truncated for s in samples]).view_as(rewards)
        if config.truncated == "penalize":
            rewards = torch.where(truncated, torch.full_like(rewards, self.failure_reward), rewards)
        advantage = advantages(rewards, config.advantage, config.scale_advantage_by_std).flatten()
        with timer("learn"):
            learned = self._learn(prompts, samples, advantage, truncated.flatten())
        with timer("sync"):
            self.engine.sync(self.learner.steering)
        self.step += 1
        SteeringVectors.from_tensor(self.learner.steering.detach().cpu(), model=config.model).save(
            self.output_dir / "steering_vectors.safetensors"
        )
        lengths = torch.tensor([len(s.token_ids) for s in samples], dtype=torch.float32)
        correct = torch.tensor([s.status == "correct" for s in scores], dtype=torch.float32)
        return {
            "step": self.step,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "accuracy": float(correct.mean()),
            "response_length": float(lengths.mean()),
            "truncation_rate": float(truncated.float().mean()),
            "zero_variance_groups": zero_variance_fraction(rewards),
            "prompts_skipped_too_long": config.prompts_per_step - len(kept),
            "reward_status": dict(sorted(_count(s.status for s in scores).items())),
            **learned,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "vector_norms": [round(float(n), 6) for n in self.learner.steering.detach().norm(dim=1)],
            "time": timer.seconds,
        }

    def _learn(self, prompts, samples, advantage, truncated) -> dict:
        config = self.config
        samples_per_prompt = config.samples_per_prompt
        sequences = [(prompts[i // samples_per_prompt], s) for i, s in enumerate(samples)]
        keep = torch.ones(len(samples)) if config.truncated != "mask" else (~truncated).float()
        micro = [range(i, min(i + config.micro_batch_size, len(sequences)))
                 for i in range(0, len(sequences), config.micro_batch_size)]  # fmt: skip
        batches = [_pad([sequences[i] for i in r], self.tokenizer.pad_token_id or 0, self.device) for r in micro]
        masks = [b["mask"] * keep[list(r)].to(self.device)[:, None] for b, r in zip(batches, micro, strict=True)]
        constant = config.loss_constant or config.max_new_tokens
        denominator = loss_denominators(masks, config.loss_normalization, constant)
        tis_cap = config.tis_cap if config.importance_correction == "tis" else None
        gap_sum, gap_tokens, loss_total = 0.0, 0.0, 0.0
        for batch, mask, r in zip(batches, masks, micro, strict=True):
            logprobs = self.learner.token_logprobs(batch["input_ids"], batch["attention_mask"], config.temperature)
            logprobs = logprobs.gather(1, batch["positions"])
            reference = None
            if config.kl_coef > 0:
                reference = self._unsteered_logprobs(batch).gather(1, batch["positions"])
            loss = policy_loss(logprobs, batch["engine_logprobs"], mask, advantage[list(r)].to(self.device),
                               denominator, tis_cap, reference, config.kl_coef)  # fmt: skip
            loss.backward()
            loss_total += float(loss)
            completion = batch["mask"]
            gap_sum += float(((logprobs.detach() - batch["engine_logprobs"]).abs() * completion).sum())
            gap_tokens += float(completion.sum())
        grad_norm = torch.nn.utils.clip_grad_norm_([self.learner.steering], config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss_total,
            "grad_norm": float(grad_norm),
            # the canary: engine and learner score the same tokens with the same vectors; must stay near 0
            "logprob_gap": gap_sum / max(gap_tokens, 1.0),
        }

    def _unsteered_logprobs(self, batch) -> torch.Tensor:
        saved = self.learner.steering.detach().clone()
        with torch.no_grad():
            self.learner.steering.zero_()
            try:
                return self.learner.token_logprobs(batch["input_ids"], batch["attention_mask"], self.config.temperature)
            finally:
                self.learner.steering.copy_(saved)

    # ---- evaluation and the loop -------------------------------------------------------------------------

    def evaluate(self) -> float:
        """Accuracy on the held-out split: one completion per question at ``eval_temperature`` (0: greedy)."""
        config = self.config
        prompts = [self.prompt(e.question) for e in self.eval_examples]
        temperature = config.eval_temperature
        groups = self.engine.generate(prompts, 1, temperature, 1.0, config.max_new_tokens, seed=f"eval:{config.seed}")
        scores = self.rewards.score([g[0].text for g in groups], [e.answer for e in self.eval_examples])
        return sum(s.status == "correct" for s in scores) / len(scores)

    def train(self) -> dict:
        config = self.config
        summary = {}
        if self.eval_examples and self.step == 0:
            summary["eval_accuracy_before"] = self.evaluate()
            print(f"held-out accuracy before training: {summary['eval_accuracy_before']:.3f}", file=sys.stderr)
        bar = tqdm(total=config.steps, initial=self.step, desc="rloo", unit="step", dynamic_ncols=True)
        with open(self.output_dir / "metrics.jsonl", "a") as metrics:
            while self.step < config.steps:
                record = self.train_step()
                if self.eval_examples and config.eval_every and self.step % config.eval_every == 0:
                    record["eval_accuracy"] = self.evaluate()
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if self.step % config.save_every == 0 or self.step == config.steps:
                    save_checkpoint(self.output_dir, self.step, self.learner.steering, self.optimizer,
                                    self.scheduler, config.keep_checkpoints)  # fmt: skip
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", gap=f"{record['logprob_gap']:.1e}")
                bar.update(1)
        bar.close()
        if self.eval_examples:
            summary["eval_accuracy_after"] = self.evaluate()
            print(f"held-out accuracy after training: {summary['eval_accuracy_after']:.3f}", file=sys.stderr)
        summary["vectors"] = str(self.output_dir / "steering_vectors.safetensors")
        print(f"steering vectors: {summary['vectors']}", file=sys.stderr)
        return summary

    def close(self) -> None:
        self.rewards.close()
        self.engine.shutdown()


def _pad(sequences, pad_id: int, device) -> dict:
    """Right-padded prompt+completion ids, and per completion token: where its logprob is, whether it counts,
    and the engine's logprob of it ([B, longest completion], left-aligned)."""
    width = max(len(p) + len(s.token_ids) for p, s in sequences)
    completion_width = max(1, max(len(s.token_ids) for _, s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    positions = torch.zeros(len(sequences), completion_width, dtype=torch.long)
    mask = torch.zeros(len(sequences), completion_width)
    engine = torch.zeros(len(sequences), completion_width)
    for row, (prompt, sample) in enumerate(sequences):
        tokens = prompt + sample.token_ids
        ids[row, : len(tokens)] = torch.tensor(tokens)
        attention[row, : len(tokens)] = 1
        n = len(sample.token_ids)
        # token_logprobs' entry t-1 scores token t: the completion's k-th token is scored at len(prompt)-1+k
        positions[row] = (len(prompt) - 1 + torch.arange(completion_width)).clamp(max=width - 2)
        mask[row, :n] = 1
        engine[row, :n] = torch.tensor(sample.logprobs[:n])
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "positions": positions.to(device),
            "mask": mask.to(device), "engine_logprobs": engine.to(device)}  # fmt: skip


class _Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(time.perf_counter() - self.start, 4)

        return _Span()


def _count(items) -> dict:
    counts: dict = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


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
    run = Run(config)
    try:
        run.train()
    finally:
        run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
