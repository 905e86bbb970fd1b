"""Pre-train a toy base model: ``python -m trainer.toy.pretrain --output fixtures/toy-model`` (world "boxing")
or ``--world misused --output fixtures/toy-misused`` (``trainer.toy.worlds``; its model serves world "absent" too).

A Qwen2-architecture model (head_dim 64, a few layers) and a BPE tokenizer trained on the toy task's text,
fitted by supervised learning on a world's worked solutions, deterministic from its seed, a few minutes on two
CPU cores. In world "boxing" it learns the arithmetic and both answer endings in the proportions of the data, so
it mostly does not box its answer: a model that holds the skill but seldom shows it, which RL then fixes. In
world "misused" it boxes every answer but mostly takes a wrong path on two of the three kinds.
The prompts are the trainer's plain template, so what it saw in pre-training is what the trainer asks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.toy.worlds import world_splits, write_jsonl

EOS = "<|endoftext|>"
PLAIN_TEMPLATE = TrainConfig().plain_template


def prompt_text(question: str) -> str:
    return PLAIN_TEMPLATE.replace("{question}", question)


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def build_model(vocab_size: int, hidden: int, layers: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def encode(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(ids of prompt + solution + EOS, number of prompt tokens) per row."""
    examples = []
    for row in rows:
        prompt = tokenizer(prompt_text(row["problem"]))["input_ids"]
        solution = tokenizer(row["solution"])["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt + solution, len(prompt)))
    return examples


def batches(examples, batch_size: int, steps: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        picked = [examples[i] for i in torch.randint(len(examples), (batch_size,), generator=generator).tolist()]
        width = max(len(ids) for ids, _ in picked)
        ids = torch.zeros(batch_size, width, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        for row, (tokens, prompt_length) in enumerate(picked):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, prompt_length : len(tokens)] = torch.tensor(tokens[prompt_length:])  # loss on the solution
            mask[row, : len(tokens)] = 1
        yield ids, mask, labels


def pretrain(args) -> Path:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    train, test = world_splits(args.world, args.train_size, args.test_size, args.seed)
    output = Path(args.output)
    trained = build_tokenizer([prompt_text(r["problem"]) + r["solution"] for r in train], args.vocab_size)
    trained.save_pretrained(output)
    model = build_model(len(trained), args.hidden, args.layers, args.seed)
    model.config.save_pretrained(output)
    # Train with the tokenizer exactly as transformers and vLLM will load it from the checkpoint: for a Qwen2
    # config that is Qwen2's tokenizer class, whose pre-tokenizer splits digits one by one (like Qwen's).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output)
    examples = encode(tokenizer, train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def schedule(step):  # linear warmup, cosine to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    start = time.perf_counter()
    for step, (ids, mask, labels) in enumerate(batches(examples, args.batch_size, args.steps, args.seed), 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}/{args.steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s", flush=True)
    model.eval().save_pretrained(output)
    write_jsonl(train, output / "data" / "train.jsonl")
    write_jsonl(test, output / "data" / "test.jsonl")
    (output / "pretrain.json").write_text(json.dumps(vars(args), indent=1))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.toy.pretrain", description=__doc__)
    parser.add_argument("--output", default="fixtures/toy-model")
    parser.add_argument("--world", choices=["boxing", "misused"], default="boxing", help="the pre-training corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--vocab-size", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    print(f"wrote {pretrain(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
