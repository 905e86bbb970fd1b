"""GPU check of the trainer's learner (trainer/learner.py): the Triton op in its autograd form inside a real
model forward/backward, one prepared script, about a minute on one GPU.

1. correctness: a small Qwen2 (random weights, fp32) on CUDA, the learner's token logprobs and the
   gradient of the vectors against HF forward hooks that add s_l to decoder layer l's output;
2. cost at a real shape (Qwen2.5-1.5B's config, random bf16 weights): one learner step (forward, backward
   into the vectors only, AdamW) on 8 sequences of 1024 tokens, with and without activation checkpointing:
   median time and peak memory, next to the same forward/backward through HF's own model (hooks).

Writes ``benchmarks/results/learner_gpu.json`` (the cost table, with the correctness figures in its notes), from
which the GPU page's table is generated.

python -m benchmarks.gpu_check_learner
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from trainer.learner import SteeredLearner

failures: list[str] = []
measured: dict[str, float] = {}


def check(ok: bool, what: str) -> None:
    print(("  ok    " if ok else "  FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


def qwen2(hidden, layers, heads, kv_heads, intermediate, vocab, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)  # fmt: skip
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to("cuda", dtype).eval()


def hooked_logprobs(model, table, ids, mask):
    handles = [block.register_forward_hook(lambda m, a, out, v=table[i]: out + v.to(out.dtype))
               for i, block in enumerate(model.model.layers)]  # fmt: skip
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    finally:
        for handle in handles:
            handle.remove()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]


def correctness() -> None:
    print("1. learner vs HF hooks (fp32, CUDA, Triton op)", flush=True)
    model = qwen2(256, 4, 4, 2, 512, 1000, torch.float32)
    table = torch.randn(4, 256, device="cuda") * 0.3
    ids = torch.randint(0, 1000, (3, 300), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 200:] = 0
    valid = mask[:, 1:].bool()
    reference_table = table.clone().requires_grad_(True)
    reference = hooked_logprobs(model, reference_table, ids, mask)
    (reference * valid).sum().backward()
    learner = SteeredLearner(model, table)
    ours = learner.token_logprobs(ids, mask)
    (ours * valid).sum().backward()
    diff = (ours - reference)[valid].abs().max().item()
    grad = ((learner.steering.grad - reference_table.grad).abs().max() / reference_table.grad.abs().max()).item()
    measured.update(logprob_diff=diff, grad_rel_diff=grad)
    check(
        diff < 1e-3,
        f"logprobs max |diff| {diff:.2e} (< 1e-3; TF32 matmuls off? {not torch.backends.cuda.matmul.allow_tf32})",
    )
    check(grad < 1e-3, f"d_steering max rel diff {grad:.2e} (< 1e-3)")


def timed(fn, repeats=5) -> tuple[float, float]:
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def _step(loss_fn, optimizer):
    def step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def cost() -> list[dict]:
    print("2. learner step at Qwen2.5-1.5B shape (bf16, 8 x 1024 tokens)", flush=True)
    model = qwen2(1536, 28, 12, 2, 8960, 151936, torch.bfloat16)
    ids = torch.randint(0, 151936, (8, 1024), device="cuda")
    mask = torch.ones_like(ids)
    rows = []
    for checkpointing in (False, True):
        learner = SteeredLearner(model, None, gradient_checkpointing=checkpointing)
        optimizer = torch.optim.AdamW([learner.steering], lr=1e-3)
        step = _step(lambda learner=learner: -learner.token_logprobs(ids, mask).mean(), optimizer)
        name = "ours (fused op), activation checkpointing" if checkpointing else "ours (fused op)"
        rows.append((name, *timed(step)))
        del learner, optimizer, step
    table = torch.zeros(28, 1536, device="cuda", requires_grad=True)
    optimizer = torch.optim.AdamW([table], lr=1e-3)
    hooked_step = _step(lambda: -hooked_logprobs(model, table, ids, mask).mean(), optimizer)
    rows.append(("HF model + forward hooks (baseline)", *timed(hooked_step)))
    base = rows[-1][1]
    print(f"  {'':48s} {'median s':>9s} {'vs hooks':>9s} {'peak GiB':>9s}")
    for name, seconds, peak in rows:
        print(f"  {name:48s} {seconds:9.3f} {seconds / base:9.2f} {peak:9.1f}", flush=True)
    return [{"way": name, "median_s": seconds, "vs_hooks": seconds / base, "peak_gib": peak}
            for name, seconds, peak in rows]  # fmt: skip


def record_results(rows: list[dict]) -> None:
    from benchmarks.results import record

    columns = [("way", "learner step, Qwen2.5-1.5B shape, 8 x 1024 tokens, bf16", ""), ("median_s", "median s", ".3f"),
               ("vs_hooks", "vs hooks", ".2f"), ("peak_gib", "peak GiB", ".1f")]  # fmt: skip
    notes = (f"{torch.cuda.get_device_name()}; correctness (fp32, small Qwen2): logprobs within "
             f"{measured['logprob_diff']:.1e} of the hooks, vector gradient within {measured['grad_rel_diff']:.1e} "
             "(relative)")  # fmt: skip
    record("learner_gpu", "The learner on a GPU: one step against HF forward hooks", columns, rows, notes)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    correctness()
    record_results(cost())
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("all checks passed", flush=True)
