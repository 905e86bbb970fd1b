"""The paper's Table 3: what one RL step costs when training steering vectors vs a full fine-tune vs LoRA.

For each model shape and each ``--trainable`` kind, with the trainer's own code (``trainer.trainables``: the
same learner, parameters and optimizer as ``python -m trainer.rloo``):

  parameters   trainable parameters, and their share of the model
  optimizer    AdamW state bytes after a step (exp_avg + exp_avg_sq, read from the optimizer)
  step         one whole learner step, timed end to end (the median of --steps whole steps), made of:
    forward    the learner's token logprobs for the batch (B sequences x T tokens, random ids)
    backward   backward of an advantage-weighted loss into the trainable parameters
    optimizer  gradient clipping + AdamW step + zero_grad
               (each phase: its own median over the steps, so the three need not add up to the step's median)
  sync         putting the new weights into a running vLLM engine until it serves them: ``trainable.sync``
               then a 1-token request (LoRA loads its new adapter there), minus that request's time alone
  peak memory  the learner's peak (CUDA only)

Precision (``--dtype``): ``auto`` is the trainer's own default (``trainer.rloo`` with ``dtype: auto``): bf16 on
a GPU and fp32 on CPU, and a full fine-tune keeps fp32 master weights in either case, while the engine runs the
bf16 / fp32 of the device. Where the full fine-tune's fp32 weights, gradients and AdamW state would not fit in
this machine's memory, that shape runs as the trainer does with ``dtype: bfloat16`` (every kind, learner and
engine), and its table says so. Ratios against steering side by side. The ``toy`` shape is the shipped fixture
(fixtures/toy-model); the others are real models' configs with random weights.

  python -m benchmarks.bench_training            # toy, qwen2.5-0.5b (fp32), qwen2.5-1.5b (bf16 here), ~20 min CPU
  python -m benchmarks.bench_training --shapes qwen2.5-7b --batch 8x1024  # on a GPU

Each shape's table goes to benchmarks/results/training_cost_DEVICE_SHAPE.json (DEVICE: cpu, or gpu where torch
sees one; e.g. training_cost_cpu_qwen2.5-0.5b.json), a row per quantity, a column per kind; options that change
what is measured (--kinds, --batch other than the device's default, --toy-batch for the toy shape, --dtype for the
real shapes, --lora-rank, --no-sync) are appended to the name where they differ from the defaults, so such a run
never overwrites the docs' tables. The raw samples of every kind go to --output.
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
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064, False),
    "qwen2.5-14b": (5120, 48, 40, 8, 13824, 152064, False),
}
KINDS = ("steering", "full", "lora")
NAMES = {"steering": "Steering", "full": "Full-Tune", "lora": "LoRA"}
MEMORY_SHARE = 0.8  # a full fine-tune's estimated bytes must stay under this share of the device's memory


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


def trainer_dtypes(kind: str, dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(learner, engine) dtypes exactly as ``trainer.rloo`` picks them."""
    from trainer.rloo import precision

    return precision(kind, dtype, device)


def full_tune_bytes(parameters: int, dtype: torch.dtype, device: torch.device) -> int:
    """What a full fine-tune holds besides activations: weights, gradients and AdamW's two states (at the
    weights' dtype), and on CPU also ``FullTrainable``'s frozen copy of the initial weights (host memory)."""
    copies = 4 + (device.type == "cpu")
    return parameters * dtype.itemsize * copies


def device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def shape_dtype(shape: str, requested: str, kinds: list[str], workdir: Path) -> tuple[str, str | None]:
    """The ``--dtype`` a shape runs at, and why when ``auto`` had to give way to bf16 (fp32 full tune too big)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested != "auto" or "full" not in kinds:
        return requested, None
    learner, _ = trainer_dtypes("full", "auto", device)
    parameters = count_parameters(model_dir(shape, workdir))
    needed, memory = full_tune_bytes(parameters, learner, device), device_memory(device)
    if learner == torch.bfloat16 or needed <= MEMORY_SHARE * memory:
        return "auto", None
    return "bfloat16", (f"the trainer's default, fp32 master weights for Full-Tune, needs ~{needed / 1e9:.1f} GB "
                        f"for weights, gradients and AdamW state, more than this machine's {memory / 2**30:.0f} GiB "
                        "allow; so every column runs as `dtype: bfloat16`")  # fmt: skip


def count_parameters(directory: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    return sum(p.numel() for p in model.parameters())


def time_learner(trainable, batch: int, tokens: int, steps: int, device: torch.device) -> dict:
    """Median seconds of ``steps`` whole steps after one warm-up, each timed end to end; the median of each
    phase (forward / backward / optimizer) on its own; optimizer bytes."""
    vocab = trainable.learner.model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 400), (batch, tokens), generator=generator).to(device)
    mask = torch.ones_like(ids)
    advantage = torch.randn(batch, 1, generator=generator).to(device)
    parameters = trainable.parameters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-6)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phases = {"forward": [], "backward": [], "optimizer": []}
    whole = []
    for _ in range(steps + 1):
        marks = _one_step(trainable, ids, mask, advantage, parameters, optimizer, device)
        whole.append(marks[-1] - marks[0])
        for name, start, end in zip(phases, marks, marks[1:], strict=False):
            phases[name].append(end - start)
    result = {name: statistics.median(values[1:]) for name, values in phases.items()}
    result["step"] = statistics.median(whole[1:])
    result["step_times"] = whole[1:]
    result["phase_times"] = {name: values[1:] for name, values in phases.items()}
    result["optimizer_bytes"] = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                    for t in state.values() if torch.is_tensor(t) and t.dim() > 0)  # fmt: skip
    result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return result


def _one_step(trainable, ids, mask, advantage, parameters, optimizer, device) -> list[float]:
    """One learner step; the clock at its start, after forward, after backward and at its end."""
    _sync_device(device)
    marks = [time.perf_counter()]
    logprobs = trainable.learner.token_logprobs(ids, mask)
    _sync_device(device)
    marks.append(time.perf_counter())
    (-(logprobs * advantage).sum() / logprobs.numel()).backward()
    del logprobs
    _sync_device(device)
    marks.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync_device(device)
    marks.append(time.perf_counter())
    return marks


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
    learner_dtype, engine_dtype = trainer_dtypes(kind, args.dtype_for[shape][0], device)
    directory = model_dir(shape, workdir)
    model = build_model(directory, learner_dtype, device)
    total = sum(p.numel() for p in model.parameters())
    torch.manual_seed(0)
    trainable = build_trainable(kind, model, args.lora_rank)
    return SimpleNamespace(trainable=trainable, total=total, directory=directory, learner_dtype=learner_dtype,
                           engine_dtype=engine_dtype, device=device)  # fmt: skip


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def learner_row(shape: str, kind: str, args, workdir: Path) -> dict:
    setup = _setup(shape, kind, args, workdir)
    batch, tokens = args.batch_for[shape]
    dtype, why = args.dtype_for[shape]
    row = {"shape": shape, "kind": kind, "dtype": _name(setup.learner_dtype),
           "engine_dtype": _name(setup.engine_dtype), "dtype_option": dtype, "dtype_note": why,
           "batch": f"{batch}x{tokens}", "parameters": sum(p.numel() for p in setup.trainable.parameters()),
           "model_parameters": setup.total}  # fmt: skip
    row.update(time_learner(setup.trainable, batch, tokens, args.steps, setup.device))
    return row


def sync_seconds(shape: str, kind: str, args, workdir: Path) -> float:
    setup = _setup(shape, kind, args, workdir)
    return time_sync(setup.trainable, setup.directory, setup.engine_dtype, args.sync_steps)


def _in_fresh_process(function, *arguments):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *arguments).result()


SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def table_rows(rows: list[dict]) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """(columns, rows) of one shape's table: a row per quantity, its value for each kind (formatted by the row's
    own spec) and its ratio to steering's, measured in the same run; a quantity not measured (peak memory on CPU,
    the sync under --no-sync) has no row."""
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    by_kind = {r["kind"]: {**r, "total": None if r["sync"] is None else r["step"] + r["sync"]} for r in rows}
    others = [k for k in kinds if k != "steering"]
    columns = [("quantity", "", "")] + [(k, NAMES[k], "@format") for k in kinds]
    columns += [(f"{k}_vs_steering", f"{NAMES[k]} / Steering", ",.1f}x") for k in others]
    table = [{"quantity": "learner / engine dtype", "format": "", **{k: _dtypes(by_kind[k]) for k in kinds}}]
    for label, key, spec in (
        ("trainable parameters", "parameters", ","),
        ("optimizer state (bytes)", "optimizer_bytes", ","),
        ("**learner step (s), median of whole steps**", "step", ".4f"),
        ("- forward (s), median of the phase", "forward", ".4f"),
        ("- backward (s), median of the phase", "backward", ".4f"),
        ("- optimizer step (s), median of the phase", "optimizer", ".4f"),
        ("sync into vLLM (s)", "sync", ".4f"),
        ("learner step + sync (s)", "total", ".4f"),
        ("learner peak memory (GiB)", "peak_gib", ".1f"),
    ):
        values = {k: by_kind[k][key] for k in kinds}
        if any(v is None for v in values.values()):
            continue
        steering = values.get("steering")
        ratios = {f"{k}_vs_steering": values[k] / steering if steering else None for k in others}
        table.append({"quantity": label, "format": spec, **values, **ratios})
    return columns, table


def record_tables(rows: list[dict], args, parser) -> list[tuple[str, str]]:
    """Record each shape's table as training_cost_DEVICE_SHAPE[_OPTIONVALUE...]; [(name, title)]."""
    from benchmarks.results import device, record, variant

    made = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        of_shape = [r for r in rows if r["shape"] == shape]
        options = ("kinds", "toy_batch") if shape == "toy" else ("kinds", "batch", "dtype")
        name = variant(f"training_cost_{device()}_{shape}", parser, args, (*options, "lora_rank", "no_sync"))
        syncs = "" if args.no_sync else f" and {args.sync_steps} syncs"
        title = f"One RL step, steering vs full fine-tune vs LoRA, {shape}: medians of {args.steps} steps{syncs}"
        columns, table = table_rows(of_shape)
        record(name, title, columns, table, notes=_heading(of_shape) + ".")
        made.append((name, title))
    return made


def _heading(rows: list[dict]) -> str:
    first = rows[0]
    option = first.get("dtype_option", "auto")
    precision = ("the trainer's default precision (`dtype: auto`)" if option == "auto"
                 else f"{SHORT.get(option, option)} (`dtype: {option}`)")  # fmt: skip
    note = f"; {first['dtype_note']}" if first.get("dtype_note") else ""
    return (f"{first['shape']} ({first['model_parameters'] / 1e6:,.1f}M parameters, batch {first['batch']} tokens), "
            f"{precision}{note}")  # fmt: skip


def _dtypes(row: dict) -> str:
    learner, engine = SHORT.get(row["dtype"], row["dtype"]), SHORT.get(row.get("engine_dtype"), row.get("engine_dtype"))
    return learner if engine in (None, learner) else f"{learner} / {engine}"


def arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes_help = f"comma-separated: toy, {', '.join(SHAPES)}"
    parser.add_argument("--shapes", default="toy,qwen2.5-0.5b,qwen2.5-1.5b", help=shapes_help)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--batch", default=None, help="BxT for the real shapes (default: 1x256 on CPU, 8x1024 on GPU)")
    parser.add_argument("--toy-batch", default="128x96", help="BxT for the toy model (a toy.yaml step: 128 x ~96)")
    dtype_help = "real shapes; auto: the trainer's default (fp32 master weights for full), bf16 where that won't fit"
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"), help=dtype_help)
    parser.add_argument("--steps", type=int, default=5, help="timed learner steps (after one warm-up)")
    parser.add_argument("--sync-steps", type=int, default=3, help="timed syncs (after one warm-up)")
    parser.add_argument("--lora-rank", type=int, default=1)
    parser.add_argument("--no-sync", action="store_true", help="skip the engine (learner only)")
    parser.add_argument("--output", type=Path, default=Path("runs/bench_training.json"))
    return parser.parse_args(argv), parser


def plan(args, workdir: Path) -> tuple[list[str], list[str]]:
    """(shapes, kinds) to measure; sets ``args.batch_for`` and ``args.dtype_for``: {shape: (B, T)} and {shape:
    (dtype option, why it is not auto)}, and clears ``args.batch`` where it is the device's default anyway."""
    default_batch = "8x1024" if torch.cuda.is_available() else "1x256"
    real_batch = args.batch or default_batch
    if args.batch == default_batch:
        args.batch = None  # the device's default: the result's name does not say it
    parse = lambda text: tuple(int(v) for v in text.lower().split("x"))  # noqa: E731
    shapes, kinds = args.shapes.split(","), args.kinds.split(",")
    args.batch_for = {s: parse(args.toy_batch if s == "toy" else real_batch) for s in shapes}
    args.dtype_for = {s: shape_dtype(s, "auto" if s == "toy" else args.dtype, kinds, workdir) for s in shapes}
    return shapes, kinds


def main(argv: list[str] | None = None) -> None:
    args, parser = arguments(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    set_vllm_log_level(None)  # warnings, unless $VLLM_LOGGING_LEVEL says otherwise
    workdir = Path(tempfile.mkdtemp(prefix="bench_training_"))
    rows = []
    try:
        shapes, kinds = plan(args, workdir)
        for shape in shapes:
            for kind in kinds:
                row = measure(shape, kind, args, workdir)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1))
    from benchmarks.results import load, markdown

    for name, title in record_tables(rows, args, parser):
        print(f"\n{title}\n\n" + markdown(load(name)))


if __name__ == "__main__":
    main()
