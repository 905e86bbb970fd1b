"""Questions and gold answers, the prompts built from them, and the order in which training sees them."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Example:
    question: str
    answer: str


def load_examples(source: str, question_field: str, answer_field: str, split: str = "train") -> list[Example]:
    """From a local .jsonl / .json / .parquet file, or through ``datasets``: a Hugging Face dataset name (hub or
    cache), a local folder of data files, or a folder written by ``save_to_disk``."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such data file")
        rows = _read_rows(path)
    else:
        rows = _hub_rows(source, split)
    examples = []
    for number, row in enumerate(rows, 1):
        missing = [f for f in (question_field, answer_field) if f not in row]
        if missing:
            raise ValueError(f"{source}: row {number} has no field(s) {missing} (it has {sorted(row)}); "
                             "set question_field / answer_field")  # fmt: skip
        answer = row[answer_field]
        if answer is None:
            raise ValueError(f"{source}: row {number} has no answer ({answer_field} is null)")
        answer = ", ".join(map(str, answer)) if isinstance(answer, list) else str(answer)  # OlympiadBench: a list
        examples.append(Example(str(row[question_field]), gold_answer(answer)))
    if not examples:
        raise ValueError(f"{source}: no examples")
    return examples


def gold_answer(answer: str) -> str:
    """GSM8K's answers are worked solutions ending in ``#### 72``: the gold is what follows the marker.
    Others (a bare answer, or a solution with ``\\boxed{}`` as in MATH) are left to the reward's parser."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    return answer


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install 'steering-vllm[data]')") from None

        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
            return rows if isinstance(rows, list) else rows.get("data", [])
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # else JSON lines under .json, as `datasets`' to_json writes them
                raise ValueError(f"{path}: not JSON ({e})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not JSON ({e})") from None
    return rows


def _hub_rows(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{name}: not a local .jsonl/.json/.parquet file, and loading a Hugging Face dataset needs `datasets` "
            "(pip install 'steering-vllm[data]')"
        ) from None
    path = Path(name)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # written by save_to_disk
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{name}: no split {split!r} (it has {sorted(loaded)})")
            loaded = loaded[split]
        return list(loaded)
    return list(datasets.load_dataset(name, split=split))


class PromptBuilder:
    """Token ids of the prompt for a question: the model's chat template with the system prompt, or plain text."""

    def __init__(self, tokenizer, template: str, system_prompt: str, plain_template: str):
        if template == "auto":
            template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_template 'chat': the tokenizer has no chat template; use 'plain'")
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.plain_template = plain_template
        # a system turn even when empty: Qwen's templates put their own default system prompt where none is given
        self.system_turn = template == "chat" and _takes_a_system_turn(tokenizer)
        if template == "chat" and system_prompt and not self.system_turn:
            print(
                "the chat template refuses a system turn (as Gemma's do): the system prompt opens the user turn",
                file=sys.stderr,
            )

    def __call__(self, question: str) -> list[int]:
        if self.template == "chat":
            messages = [{"role": "user", "content": question}]
            if self.system_turn:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            elif self.system_prompt:
                messages[0]["content"] = f"{self.system_prompt}\n\n{question}"
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(self.plain_template.replace("{question}", question))["input_ids"]


def _takes_a_system_turn(tokenizer) -> bool:
    """Whether the chat template renders a system message (Gemma's raise "System role not supported")."""
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    try:
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja2's TemplateError from the template's raise_exception
        if "system" not in str(error).lower():
            raise
        return False
    return True


def stop_token_ids(tokenizer, model_dir: str | None = None) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (chat models end turns with their own token)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if model_dir is not None:
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except OSError:
            pass
    return sorted(ids)


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of training step ``step`` (0-based): epochs of seeded permutations, read in order.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have seen.
    """
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_examples)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(indices), num_examples - offset)
        indices.extend(order[offset : offset + take].tolist())
    return indices
