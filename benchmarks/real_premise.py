"""The real model's premise: does the base model ever earn a reward on GSM8K before training?

RL with a 0/1 reward learns only from groups where some samples score and others do not. This samples the base
model of the real-model fixture (SmolLM2-135M-Instruct) the way the trainer would (T = 1, 8 samples per problem,
the chat template, the trainer's system prompt) on the first training problems, once more with one worked example
ending in ``\\boxed{7}`` added to the system prompt, and greedily on held-out problems, each through the command a
user would run (``python -m trainer.eval``, torch.compile'd engine, ``--save-samples``). Per setting: avg@k and
pass@k as Math-Verify scores them, how many completions box an answer, how many end with the gold number (boxed or
not: the skill, whatever the form), how many hit the token limit, and the command's wall time.

  python -m trainer.real_model && python -m benchmarks.real_premise [--problems 32] [--held-out 200]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from benchmarks.commands import run_command
from trainer.config import SYSTEM_PROMPT

ENGINE = "{gpu_memory_utilization: 0.1, max_model_len: 2048}"
ONE_SHOT = (
    f"{SYSTEM_PROMPT}\n\nExample.\nQuestion: A baker makes 12 muffins in the morning and 15 in the afternoon. She "
    "sells 20 of them. How many muffins are left?\nAnswer: She makes 12 + 15 = 27 muffins. After selling 20 of "
    "them, 27 - 20 = 7 are left. The final answer is \\boxed{7}."
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in ``text``, thousands separators and a trailing ``.0`` dropped."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def gsm8k_gold(answer: str) -> str:
    """GSM8K's answer field ends with ``#### N``."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def sample_counts(samples: list[dict]) -> dict[str, int]:
    """Completions in all; those that box an answer; those whose last number is the gold one."""
    completions = [(text, gsm8k_gold(s["gold"])) for s in samples for text in s["completions"]]
    return {"completions": len(completions),
            "boxed": sum("\\boxed{" in text for text, _ in completions),
            "last_number_right": sum(last_number(text) == gold for text, gold in completions)}  # fmt: skip


def run_setting(fixture: dict, output: Path, data: str, problems: int, k: int, temperature: float,
                max_new_tokens: int, system_prompt: str) -> dict:  # fmt: skip
    command = [sys.executable, "-m", "trainer.eval", "--model", fixture["model"], "--benchmarks", f"gsm8k={data}",
               "--question-field", "question", "--answer-field", "answer", "--limit", str(problems),
               "--k", str(k), "--temperature", str(temperature), "--seeds", "1", "--max-new-tokens",
               str(max_new_tokens), "--system-prompt", system_prompt, "--save-samples", "--engine", ENGINE,
               "--output-dir", str(output)]  # fmt: skip
    wall = run_command(command)
    benchmark = json.loads((output / "results.json").read_text())[0]["benchmarks"][0]
    seed = benchmark["seeds"][0]
    counts = sample_counts(seed["samples"])
    return {"avg": benchmark["mean"], "pass": seed["pass_at_k"], **counts, "truncated": seed["truncated"],
            "problems": problems, "k": k, "temperature": temperature, "max_new_tokens": max_new_tokens,
            "wall_s": wall, "statuses": seed["statuses"]}  # fmt: skip


def _fraction(row: dict, key: str) -> str:
    return f"{row[key]} / {row['completions']}"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.results import load, markdown, record
    from trainer.real_model import build

    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_premise", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--problems", type=int, default=32, help="first training problems, sampled at T = 1")
    parser.add_argument("--k", type=int, default=8, help="samples per training problem")
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--held-out", type=int, default=200, help="held-out problems, greedy")
    parser.add_argument("--held-out-tokens", type=int, default=400)
    args = parser.parse_args(argv)
    fixture = build()
    work = Path(tempfile.mkdtemp(prefix="real-premise-"))
    settings = [
        ("trainer's system prompt", "train", fixture["gsm8k_train"], args.problems, args.k, 1.0,
         args.max_new_tokens, SYSTEM_PROMPT),
        ("the same + one worked example", "train", fixture["gsm8k_train"], args.problems, args.k, 1.0,
         args.max_new_tokens, ONE_SHOT),
        ("trainer's system prompt, greedy", "held-out", fixture["gsm8k_heldout"], args.held_out, 1, 0.0,
         args.held_out_tokens, SYSTEM_PROMPT),
    ]  # fmt: skip
    rows = []
    for number, (label, split, data, problems, k, temperature, tokens, system_prompt) in enumerate(settings):
        print(f"[{number + 1}/{len(settings)}] {label}: {problems} {split} problems x {k}, T = {temperature}, "
              f"up to {tokens} new tokens", flush=True)  # fmt: skip
        row = run_setting(fixture, work / f"setting{number}", data, problems, k, temperature, tokens, system_prompt)
        row.update(setting=label, split=split)
        row.update(
            boxed_of=_fraction(row, "boxed"),
            right_of=_fraction(row, "last_number_right"),
            truncated_of=_fraction(row, "truncated"),
        )
        rows.append(row)
    columns = [("setting", "setting", ""), ("split", "problems", ""), ("problems", "n", ""), ("k", "k", ""),
               ("temperature", "T", ".1f"), ("max_new_tokens", "max new tokens", ""), ("avg", "avg@k (%)", ".1f"),
               ("pass", "pass@k (%)", ".1f"), ("boxed_of", "boxed", ""), ("right_of", "last number = gold", ""),
               ("truncated_of", "truncated", ""), ("wall_s", "command (s)", ".0f")]  # fmt: skip
    title = (f"SmolLM2-135M-Instruct (the real-model fixture) on GSM8K before any training: {args.problems} training "
             f"problems x {args.k} samples at T = 1, and {args.held_out} held-out problems greedy, through "
             "trainer.eval (chat template, torch.compile'd engine); wall time of whole commands")  # fmt: skip
    record("real_premise", title, columns, rows)
    print(f"\n{title}\n\n" + markdown(load("real_premise")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
