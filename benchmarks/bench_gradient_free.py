"""What the learner saves by giving gradient-free sequences a forward and no backward (``trainer.update.learn``).

A sequence whose advantage is exactly 0 (every sample of its prompt scored the same) or that is masked out adds
nothing to the gradient when ``kl_coef`` is 0. On a real model early in RL most groups score all zero, so most
of a step's backward is wasted work. This times whole ``learn`` steps (forward, loss, backward, clip, AdamW)
with the trainer's own code on the real-model fixture (SmolLM2-135M-Instruct, fp32), the skip on against every
sequence through a backward (the same call with ``gradient_free`` answering "none"), on the same batch, taken in
turn, medians of whole steps. An A/A row times the every-backward path against itself.

  python -m trainer.real_model && python -m benchmarks.bench_gradient_free [--steps 3] [--batch 16x128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _batch(vocab_size: int, sequences: int, completion: int, zero_share: float, generator):
    from trainer.rollout import Sample

    batch = []
    for i in range(sequences):
        prompt = torch.randint(1, vocab_size, (100 + 10 * (i % 4),), generator=generator).tolist()
        tokens = torch.randint(1, vocab_size, (completion,), generator=generator).tolist()
        batch.append((prompt, Sample(tokens, (-torch.rand(completion, generator=generator)).tolist(), "", False)))
    zero = int(round(zero_share * sequences))
    advantage = torch.cat([torch.zeros(zero), torch.randn(sequences - zero, generator=generator)])
    return batch, advantage, torch.ones(sequences)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    from trainer import update
    from trainer.real_model import build
    from trainer.trainables import SteeringTrainable
    from trainer.update import LossOptions, learn

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gradient_free", description=__doc__)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender and case (medians)")
    parser.add_argument("--batch", default="16x128", help="SEQUENCESxCOMPLETION_TOKENS (prompts of 100-130)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    sequences, completion = map(int, args.batch.split("x"))
    model_dir = build()["model"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainable = SteeringTrainable(model, None, False, model_dir)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    options = LossOptions(1.0, args.micro_batch_size, "token_sum", completion, 1.0)
    skipping = update.gradient_free

    def every_backward(advantage, keep, options):
        return [False] * len(advantage)

    contenders = {"skip": skipping, "every backward": every_backward, "every backward (A/A)": every_backward}
    rows = []
    for zero_share in (1.0, 0.75, 0.5):
        batch, advantage, keep = _batch(model.config.vocab_size, sequences, completion, zero_share,
                                        torch.Generator().manual_seed(0))  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.steps + 1):  # the first round warms up
            for name, gradient_free in contenders.items():
                update.gradient_free = gradient_free
                start = time.perf_counter()
                learn(trainable, optimizer, scheduler, batch, advantage, keep, options, 0)
                times[name].append(time.perf_counter() - start)
        update.gradient_free = skipping
        medians = {name: statistics.median(values[1:]) for name, values in times.items()}
        rows.append((zero_share, medians))
    from benchmarks.results import load, markdown, record

    table = [{"share": f"{zero_share:.0%}", "every": m["every backward"], "skip": m["skip"],
              "speedup": m["every backward"] / m["skip"], "aa": m["every backward"] / m["every backward (A/A)"]}
             for zero_share, m in rows]  # fmt: skip
    title = (f"learn() step on SmolLM2-135M-Instruct, fp32, {sequences} sequences x {completion} completion "
             f"tokens, micro-batches of {args.micro_batch_size}, {torch.get_num_threads()} threads; "
             f"medians of {args.steps}")  # fmt: skip
    columns = [("share", "gradient-free share", ""), ("every", "every backward (s)", ".2f"),
               ("skip", "skip (s)", ".2f"), ("speedup", "speed-up", ".2f}x"), ("aa", "A/A", ".2f")]  # fmt: skip
    record("gradient_free", title, columns, table)
    print(f"\n{title}\n\n" + markdown(load("gradient_free")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
