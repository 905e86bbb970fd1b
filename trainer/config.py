"""The trainer's configuration: a YAML file plus ``--key value`` overrides, validated, written back resolved.

Every option is a field of ``TrainConfig`` with its default and meaning; unknown keys and bad values are
errors that name the key. Defaults follow the paper (Sinii et al.): temperature 1.0, 128 prompts per step,
AdamW on the vectors only at a learning rate of 1e-3 with warmup, gradient clipping, RLOO advantages.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.vllm_logging import Level

PATH_OPTIONS = ("model", "output_dir", "train_data", "eval_data", "init_vectors")
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class TrainConfig:
    # what to train, where to write
    model: str = ""  # HF name or local directory (a family in steering_vllm/engine/families.py)
    output_dir: str = ""  # vectors, checkpoints, metrics, summary, curves (see Training)
    trainable: Literal["steering", "full", "lora"] = "steering"  # full / lora: baselines, all else identical
    lora_rank: int = 1  # trainable: lora (on mlp.down_proj)
    lora_alpha: float = 2.0  # trainable: lora (scaling alpha / rank)
    init_vectors: str | None = None  # start from these vectors (any readable format) instead of zeros
    seed: int = 0  # data order, sampling seeds and initialisation
    steps: int = 100  # optimizer steps
    # data
    train_data: str = ""  # .jsonl / .json / .parquet file, or a Hugging Face dataset name
    train_split: str = "train"  # for a hub dataset
    eval_data: str | None = None  # held-out problems scored before, after and every eval_every steps
    eval_split: str = "test"  # for a hub dataset
    question_field: str = "problem"  # the data files' field names
    answer_field: str = "answer"
    prompt_template: Literal["auto", "chat", "plain"] = "auto"  # auto: chat if the tokenizer has a template
    system_prompt: str = SYSTEM_PROMPT  # prompt_template chat
    plain_template: str = "{question}\n" + SYSTEM_PROMPT + "\n"  # prompt_template plain; {question} is replaced
    max_prompt_tokens: int = 1024  # longer prompts are skipped (counted in the log)
    # rollout
    prompts_per_step: int = 128  # the paper's
    samples_per_prompt: int = 8  # a group; RLOO compares a sample with the rest of its group
    temperature: float = 1.0  # sampling, and the learner's logprobs
    top_p: float = 1.0  # sampling
    max_new_tokens: int = 1024  # per completion
    engine: dict[str, Any] = field(default_factory=dict)  # extra vllm.LLM keyword arguments
    # reward
    reward_fn: str = "trainer.rewards:math_verify_reward"
    reward_mode: Literal["binary", "signed"] = "binary"  # 1 / 0, or +1 / -1 (the paper's code)
    reward_workers: int = 2  # Math-Verify processes
    reward_timeout_s: float = 10.0  # wall clock per answer; a stuck worker is killed and the answer scores 0
    # learner
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    learning_rate: float = 1e-3  # AdamW, after a linear warm-up
    warmup_steps: int = 10  # linear warm-up of the learning rate from 0
    weight_decay: float = 0.0  # AdamW's
    adam_beta1: float = 0.9  # AdamW's
    adam_beta2: float = 0.999  # AdamW's
    max_grad_norm: float = 1.0  # gradient clipping
    micro_batch_size: int = 8  # sequences per forward/backward; gradients accumulate over the step's batch
    gradient_checkpointing: bool = False  # recompute activations in the backward (long completions)
    advantage: Literal["rloo", "group_mean"] = "rloo"  # leave-one-out, or the group mean (the paper's appendix)
    scale_advantage_by_std: bool = False  # divide advantages by the group's standard deviation
    loss_normalization: Literal["token_sum", "token_mean", "sequence_mean"] = "token_sum"  # see Training
    loss_constant: int | None = None  # token_sum divides by this times the number of sequences; default max_new_tokens
    truncated: Literal["mask", "penalize", "keep"] = "keep"  # completions that hit max_new_tokens
    kl_coef: float = 0.0  # penalty against the unsteered model (k3 estimator); 0 skips the extra forward
    importance_correction: Literal["none", "tis"] = "none"  # truncated importance sampling, engine vs learner
    tis_cap: float = 2.0  # importance_correction tis: the largest weight
    # checkpoints, logs, evaluation
    save_every: int = 10  # steps between checkpoints
    keep_checkpoints: int = 3  # the latest ones kept
    eval_every: int = 0  # steps; 0: only before and after training (when eval_data is set)
    eval_prompts: int = 0  # 0: the whole eval split
    eval_temperature: float = 0.0  # 0: greedy
    resume: bool = False  # continue from the latest checkpoint in output_dir (--resume)
    vllm_log_level: Level | None = None  # None: $VLLM_LOGGING_LEVEL, else warning


# What the runs of one sweep may differ in (everything else they share: model, engine, data, budget, sampling).
SWEEPABLE = ("learning_rate", "seed", "warmup_steps", "weight_decay", "kl_coef", "init_vectors", "reward_mode",
             "max_grad_norm", "adam_beta1", "adam_beta2", "advantage", "scale_advantage_by_std",
             "loss_normalization", "loss_constant", "truncated", "importance_correction", "tis_cap")  # fmt: skip


@dataclass(frozen=True)
class SweepRun:
    name: str  # its output directory's name under the sweep's output_dir
    overrides: dict[str, Any]  # the swept options' values
    config: TrainConfig


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """``--config FILE.yaml`` plus ``--key value`` overrides (values parsed as YAML scalars)."""
    values, sweep = _values(argv)
    if sweep:
        raise ValueError("this command trains one run; a sweep runs through `python -m trainer.rloo`")
    return build_config(values)


def load_runs(argv: list[str] | None = None) -> tuple[list[SweepRun], bool]:
    """The runs to train: one, or a sweep's (``--sweep KEY=V1,V2`` or a ``sweep:`` block in the YAML, the
    cartesian product over its keys, each run under ``output_dir/KEY=V,...``); and whether it is a sweep."""
    values, sweep = _values(argv)
    if not sweep:
        config = build_config(values)
        return [SweepRun(Path(config.output_dir).name, {}, config)], False
    not_sweepable = sorted(set(sweep) - set(SWEEPABLE))
    if not_sweepable:
        raise ValueError(f"sweep: {not_sweepable} cannot differ between the runs of one sweep, which share one "
                         f"model, engine, data and budget; sweepable: {list(SWEEPABLE)}")  # fmt: skip
    root = build_config(values).output_dir  # the shared options, checked once
    runs = []
    for combination in itertools.product(*sweep.values()):
        overrides = dict(zip(sweep, combination, strict=True))
        name = ",".join(f"{key}={_path_safe(value)}" for key, value in overrides.items())
        config = build_config({**values, **overrides, "output_dir": f"{root}/{name}"})
        runs.append(SweepRun(name, {key: getattr(config, key) for key in overrides}, config))  # values as parsed
    seen: dict[str, str] = {}
    for run in runs:  # compared as parsed, so that 1e-3 and 0.001 are one value
        other = seen.setdefault(repr(run.overrides), run.name)
        if other != run.name:
            raise ValueError(f"sweep: runs {other} and {run.name} have the same values")
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep: runs with the same values {sorted(n for n in names if names.count(n) > 1)}")
    return runs, True


def _values(argv: list[str] | None) -> tuple[dict[str, Any], dict[str, list]]:
    """(options, sweep: key -> values) from the YAML file, the overrides and --sweep."""
    parser = argparse.ArgumentParser(prog="python -m trainer.rloo", description=__doc__)
    parser.add_argument("--config", help="YAML file of options (see trainer/config.py for all of them)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help=f"train one run per value (several: the cartesian product) in one process; KEY in "
                             f"{', '.join(SWEEPABLE)}")  # fmt: skip
    args, rest = parser.parse_known_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of options, got {type(loaded).__name__}")
        values.update(loaded)
    sweep = values.pop("sweep", None) or {}
    if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        raise ValueError(f"{args.config}: sweep: expected a mapping of option names to lists of values, got {sweep!r}")
    sweep = {key.replace("-", "_"): values for key, values in sweep.items()}
    for item in args.sweep:
        key, _, raw = item.partition("=")
        if not key or not raw:
            raise ValueError(f"--sweep {item!r}: expected KEY=V1,V2,...")
        sweep[key.replace("-", "_")] = [yaml.safe_load(v) for v in raw.split(",")]
    values.update(_overrides(rest))
    if args.resume:
        values["resume"] = True
    return values, sweep


def _path_safe(value: Any) -> str:
    """A value as part of a directory name: a path without its suffix, folders joined by ``_``."""
    text = str(Path(value).with_suffix("")) if isinstance(value, str) and Path(value).suffix else str(value)
    return text.strip("/~.").replace("/", "_").replace(",", "_")


def _overrides(rest: list[str]) -> dict[str, Any]:
    overrides = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}: options are --key value")
        key = token[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(rest):
            raw = rest[i + 1]
            i += 2
        else:
            raise ValueError(f"option --{key} needs a value")
        overrides[key] = yaml.safe_load(raw) if raw != "" else ""
    return overrides


def build_config(values: dict[str, Any]) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; see trainer/config.py for the options")
    hints = typing.get_type_hints(TrainConfig)
    checked = {key: _checked(key, value, hints[key]) for key, value in values.items()}
    for key in PATH_OPTIONS:  # "~/..." in a YAML file means the user's home, as in a shell
        if isinstance(checked.get(key), str) and checked[key].startswith("~"):
            checked[key] = os.path.expanduser(checked[key])
    config = TrainConfig(**checked)
    _check_ranges(config)
    return config


def _checked(key: str, value: Any, hint) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"option {key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _checked(key, value, inner)
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"option {key}: expected {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def _check_ranges(config: TrainConfig) -> None:
    required = ("model", "output_dir", "train_data")
    missing = [key for key in required if not getattr(config, key)]
    if missing:
        raise ValueError(f"missing required option(s) {missing}")
    positive = ("steps", "prompts_per_step", "max_new_tokens", "micro_batch_size", "reward_workers",
                "max_prompt_tokens", "save_every", "keep_checkpoints", "lora_rank")  # fmt: skip
    for key in positive:
        if getattr(config, key) < 1:
            raise ValueError(f"option {key} must be >= 1, got {getattr(config, key)}")
    if config.samples_per_prompt < 2:
        raise ValueError(f"option samples_per_prompt must be >= 2 (advantages compare samples of one prompt), "
                         f"got {config.samples_per_prompt}")  # fmt: skip
    for key in ("learning_rate", "temperature", "reward_timeout_s", "max_grad_norm", "tis_cap", "lora_alpha"):
        if not getattr(config, key) > 0:
            raise ValueError(f"option {key} must be > 0, got {getattr(config, key)}")
    for key in ("warmup_steps", "weight_decay", "kl_coef", "eval_every", "eval_prompts", "eval_temperature"):
        if not getattr(config, key) >= 0:  # not <, so that NaN is refused too
            raise ValueError(f"option {key} must be >= 0, got {getattr(config, key)}")
    if not 0 < config.top_p <= 1:
        raise ValueError(f"option top_p must be in (0, 1], got {config.top_p}")
    if config.top_p < 1 and config.importance_correction == "tis":
        raise ValueError(f"importance_correction 'tis' with top_p {config.top_p}: the engine's logprobs are of the "
                         "top-p renormalised distribution, the learner's of the full one, so every token's weight "
                         "would be biased below 1; use top_p 1 or importance_correction 'none'")  # fmt: skip
    if config.loss_constant is not None and config.loss_constant < 1:
        raise ValueError(f"option loss_constant must be >= 1, got {config.loss_constant}")


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True))
