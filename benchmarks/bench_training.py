"""The paper's Table 3: what one RL step costs when training steering vectors vs a full fine-tune vs LoRA.

For each model shape and each ``--trainable`` kind, with the trainer's own code (``trainer.trainables``: the
same learner, parameters and optimizer as ``python -m trainer.rloo``):

  parameters   trainable parameters, and their share of the model
  optimizer    AdamW state bytes after a step (exp_avg + exp_avg_sq, read from the optimizer)
  forward      the learner's token logprobs for the batch (B sequences x T tokens, random ids)
  backward     backward of an advantage-weighted loss into the trainable parameters
  optimizer    gradient clipping + AdamW step + zero_grad
  sync         putting the new weights into a running vLLM engine until it serves them: ``trainable.sync``
               then a 1-token request (LoRA loads its new adapter there), minus that request's time alone
  peak memory  the learner's peak (CUDA only)

Medians of --steps timed steps after one warm-up; ratios against steering side by side. The ``toy`` shape is
the shipped fixture (fixtures/toy-model); the others are real models' configs with random weights.

  python -m benchmarks.bench_training                                   # toy + qwen2.5-1.5b (bf16), ~15 min CPU
  python -m benchmarks.bench_training --shapes qwen2.5-7b --batch 8x1024  # on a GPU
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from trainer.vllm_logging import set_vllm_log_level

TOY = Path(__file__).resolve().parents[1] / "fixtures" / "toy-model"
# Qwen2.5 configs (hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings)
SHAPES = {
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064, False),
    "qwen2.5-14b": (5120, 48, 40, 8, 13824, 152064, False),
}
KINDS = ("steering", "full", "lora")
NAMES = {"steering": "Steering", "full": "Full-Tune", "lora": "LoRA"}


def model_dir(shape: str, workdir: Path) -> Path:
    """A directory vLLM and transformers can load: the toy fixture, or a real config + the toy tokenizer."""
    if shape == "toy":
        return TOY
    hidden, layers, heads, kv_heads, intermediate, vocab, tied = SHAPES[shape]
    directory = workdir / shape
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate, "vocab_size": vocab, "tie_word_embeddings": tied,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a small tokenizer suffices: inputs are token ids
        shutil.copy(TOY / name, directory / name)
    return directory


def build_model(directory: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    if directory == TOY:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    config = AutoConfig.from_pretrained(directory)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def build_trainable(kind: str, model, lora_rank: int):
    from trainer.trainables import build_trainable as build

    config = SimpleNamespace(init_vectors=None, gradient_checkpointing=False, lora_rank=lora_rank, lora_alpha=2.0)
    return build(kind, model, config, "bench")


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_learner(trainable, batch: int, tokens: int, steps: int, device: torch.device) -> dict:
    """Median forward / backward / optimizer seconds of ``steps`` steps after one warm-up; optimizer bytes."""
    vocab = trainable.learner.model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 400), (batch, tokens), generator=generator).to(device)
    mask = torch.ones_like(ids)
    advantage = torch.randn(batch, 1, generator=generator).to(device)
    parameters = trainable.parameters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-6)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(steps + 1):
        _sync_device(device)
        start = time.perf_counter()
        logprobs = trainable.learner.token_logprobs(ids, mask)
        _sync_device(device)
        forward = time.perf_counter()
        (-(logprobs * advantage).sum() / logprobs.numel()).backward()
        _sync_device(device)
        backward = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync_device(device)
        end = time.perf_counter()
        for name, seconds in zip(times, (forward - start, backward - forward, end - backward), strict=True):
            times[name].append(seconds)
        del logprobs
    result = {name: statistics.median(values[1:]) for name, values in times.items()}
    result["step"] = sum(result.values())
    result["optimizer_bytes"] = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                    for t in state.values() if torch.is_tensor(t) and t.dim() > 0)  # fmt: skip
    result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return result


def time_sync(trainable, directory: Path, dtype: torch.dtype, steps: int) -> float:
    """Median seconds from ``sync`` until the engine has served one token with the new weights."""
    from trainer.rollout import RolloutEngine

    engine = RolloutEngine(str(directory), str(dtype).removeprefix("torch."), 0, [],
                           {"enforce_eager": True, "max_model_len": 256,
                            "gpu_memory_utilization": 0.3 if torch.cuda.is_available() else 0.05,
                            "load_format": "dummy", **trainable.engine_kwargs()})  # fmt: skip

    def one_token():
        engine.generate([[1, 2, 3]], 1, 0.0, 1.0, 1, seeds=["0"], lora_request=trainable.lora_request())

    try:
        one_token()
        plain, synced = [], []
        for _ in range(steps + 1):
            with torch.no_grad():
                for p in trainable.parameters():
                    p.add_(1e-3)
            start = time.perf_counter()
            trainable.sync(engine)
            one_token()
            synced.append(time.perf_counter() - start)
            start = time.perf_counter()
            one_token()
            plain.append(time.perf_counter() - start)
        return max(0.0, statistics.median(synced[1:]) - statistics.median(plain[1:]))
    finally:
        engine.shutdown()


def measure(shape: str, kind: str, args, workdir: Path) -> dict:
    """One row; the learner and the sync each run in a fresh process, so neither inherits the other's memory
    (at 1.5B on a 24 GiB machine, the full fine-tune's freed optimizer pages plus an engine do not fit)."""
    row = _in_fresh_process(learner_row, shape, kind, args, workdir)
    row["sync"] = None if args.no_sync else _in_fresh_process(sync_seconds, shape, kind, args, workdir)
    return row


def _setup(shape: str, kind: str, args, workdir: Path):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype if shape != "toy" else "float32"]
    directory = model_dir(shape, workdir)
    model = build_model(directory, dtype, device)
    total = sum(p.numel() for p in model.parameters())
    torch.manual_seed(0)
    return build_trainable(kind, model, args.lora_rank), total, directory, dtype, device


def learner_row(shape: str, kind: str, args, workdir: Path) -> dict:
    trainable, total, _, dtype, device = _setup(shape, kind, args, workdir)
    batch, tokens = args.batch_for[shape]
    row = {"shape": shape, "kind": kind, "dtype": str(dtype).removeprefix("torch."), "batch": f"{batch}x{tokens}",
           "parameters": sum(p.numel() for p in trainable.parameters()), "model_parameters": total}  # fmt: skip
    row.update(time_learner(trainable, batch, tokens, args.steps, device))
    return row


def sync_seconds(shape: str, kind: str, args, workdir: Path) -> float:
    trainable, _, directory, dtype, _ = _setup(shape, kind, args, workdir)
    return time_sync(trainable, directory, dtype, args.sync_steps)


def _in_fresh_process(function, *arguments):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *arguments).result()


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000


def table(rows: list[dict]) -> str:
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    by_kind = {r["kind"]: {**r, "total": None if r["sync"] is None else r["step"] + r["sync"]} for r in rows}
    first = rows[0]
    lines = [f"**{first['shape']}** ({first['model_parameters'] / 1e6:,.1f}M parameters, {first['dtype']}, "
             f"batch {first['batch']} tokens)", "",
             "| | " + " | ".join(NAMES[k] for k in kinds) + " | "
             + " | ".join(f"{NAMES[k]} / Steering" for k in kinds if k != "steering") + " |",
             "|---|" + "---:|" * (2 * len(kinds) - 1)]  # fmt: skip

    def line(label, key, fmt):
        values = [by_kind[k][key] for k in kinds]
        if any(v is None for v in values):
            return
        ratios = [f"{by_kind[k][key] / by_kind['steering'][key]:,.1f}x" if by_kind["steering"][key] else "-"
                  for k in kinds if k != "steering"]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(fmt(v) for v in values) + " | " + " | ".join(ratios) + " |")

    line("trainable parameters", "parameters", lambda v: f"{v:,}")
    line("optimizer state", "optimizer_bytes", _bytes)
    line("learner forward (s)", "forward", lambda v: f"{v:.4f}")
    line("learner backward (s)", "backward", lambda v: f"{v:.4f}")
    line("optimizer step (s)", "optimizer", lambda v: f"{v:.4f}")
    line("learner step (s)", "step", lambda v: f"{v:.4f}")
    line("sync into vLLM (s)", "sync", lambda v: f"{v:.4f}")
    line("learner step + sync (s)", "total", lambda v: f"{v:.4f}")
    line("learner peak memory (GiB)", "peak_gib", lambda v: f"{v:.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="toy,qwen2.5-1.5b", help=f"comma-separated: toy, {', '.join(SHAPES)}")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--batch", default=None, help="BxT for the real shapes (default: 1x256 on CPU, 8x1024 on GPU)")
    parser.add_argument("--toy-batch", default="128x96", help="BxT for the toy model (a toy.yaml step: 128 x ~96)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="real shapes")
    parser.add_argument("--steps", type=int, default=5, help="timed learner steps (after one warm-up)")
    parser.add_argument("--sync-steps", type=int, default=3, help="timed syncs (after one warm-up)")
    parser.add_argument("--lora-rank", type=int, default=1)
    parser.add_argument("--no-sync", action="store_true", help="skip the engine (learner only)")
    parser.add_argument("--output", type=Path, default=Path("runs/bench_training.json"))
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    set_vllm_log_level(None)  # warnings, unless $VLLM_LOGGING_LEVEL says otherwise
    real_batch = args.batch or ("8x1024" if torch.cuda.is_available() else "1x256")
    parse = lambda text: tuple(int(v) for v in text.lower().split("x"))  # noqa: E731
    shapes = args.shapes.split(",")
    args.batch_for = {s: parse(args.toy_batch if s == "toy" else real_batch) for s in shapes}

    workdir = Path(tempfile.mkdtemp(prefix="bench_training_"))
    rows = []
    try:
        for shape in shapes:
            for kind in args.kinds.split(","):
                row = measure(shape, kind, args, workdir)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1))
    for shape in shapes:
        print("\n" + table([r for r in rows if r["shape"] == shape]))


if __name__ == "__main__":
    main()
