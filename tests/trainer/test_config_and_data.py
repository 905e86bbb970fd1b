"""Trainer configuration (YAML + overrides, validation) and data (files, prompts, the batch order)."""

import json

import pytest
import yaml
from tiny_models import build_tokenizer

from trainer.config import SYSTEM_PROMPT, load_config, save_config
from trainer.data import Example, PromptBuilder, batch_indices, gold_answer, load_examples

REQUIRED = ["--model", "m", "--output_dir", "o", "--train_data", "d.jsonl"]


def test_yaml_then_overrides_and_the_resolved_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "output_dir": "o", "train_data": "d.jsonl", "steps": 5,
                                    "engine": {"enforce_eager": True}}))  # fmt: skip
    config = load_config(["--config", str(path), "--steps", "7", "--learning-rate", "2e-3", "--resume"])
    assert (config.steps, config.learning_rate, config.resume, config.engine) == (
        7,
        2e-3,
        True,
        {"enforce_eager": True},
    )
    assert (config.temperature, config.prompts_per_step, config.advantage, config.system_prompt) == (
        1.0, 128, "rloo", SYSTEM_PROMPT)  # fmt: skip
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(["--config", str(tmp_path / "resolved.yaml")]) == config


def test_a_path_option_starting_with_a_tilde_is_in_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(["--model", "~/m", "--output_dir", "~/o", "--train_data", "~/d.jsonl", "--eval_data", "e~"])
    assert (config.model, config.output_dir, config.train_data) == (
        f"{tmp_path}/m",
        f"{tmp_path}/o",
        f"{tmp_path}/d.jsonl",
    )
    assert config.eval_data == "e~" and config.system_prompt == SYSTEM_PROMPT


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stepz", "3"], r"unknown option\(s\) \['stepz'\]"),
        (["--steps", "many"], "option steps: expected int, got 'many'"),
        (["--steps", "true"], "option steps: expected int, got True"),
        (["--advantage", "ppo"], r"option advantage: 'ppo' is not one of \['rloo', 'group_mean'\]"),
        (["--samples_per_prompt", "1"], "samples_per_prompt must be >= 2"),
        (["--temperature", "0"], "temperature must be > 0"),
        (["--top_p", "1.5"], r"top_p must be in \(0, 1\]"),
        (["--weight_decay", ".nan"], "weight_decay must be >= 0, got nan"),
        (["--lora_alpha", "0"], "lora_alpha must be > 0"),
        (["--top_p", "0.9", "--importance_correction", "tis"], "importance_correction 'tis' with top_p 0.9"),
        (["--steps"], "option --steps needs a value"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_options_name_the_key(extra, message):
    with pytest.raises(ValueError, match=message):
        load_config(REQUIRED + extra)


def test_required_options():
    with pytest.raises(ValueError, match=r"missing required option\(s\) \['output_dir', 'train_data'\]"):
        load_config(["--model", "m"])


def test_examples_from_jsonl_and_parquet(tmp_path):
    rows = [{"q": f"question {i}", "a": i} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "lines.json").write_text((tmp_path / "d.jsonl").read_text())  # datasets' to_json writes lines
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.jsonl", "d.parquet", "lines.json", "d.json"):
        examples = load_examples(str(tmp_path / name), "q", "a")
        assert [(e.question, e.answer) for e in examples] == [(f"question {i}", str(i)) for i in range(5)]
    with pytest.raises(ValueError, match=r"row 1 has no field\(s\) \['problem'\]"):
        load_examples(str(tmp_path / "d.jsonl"), "problem", "a")
    (tmp_path / "null.jsonl").write_text('{"q": "x", "a": 1}\n{"q": "y", "a": null}\n')
    with pytest.raises(ValueError, match=r"row 2 has no answer \(a is null\)"):
        load_examples(str(tmp_path / "null.jsonl"), "q", "a")
    (tmp_path / "broken.json").write_text('[{"q": "x", ')
    with pytest.raises(ValueError, match="broken.json: not JSON"):
        load_examples(str(tmp_path / "broken.json"), "q", "a")
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such data file"):
        load_examples(str(tmp_path / "missing.jsonl"), "q", "a")


def test_examples_through_the_datasets_library(tmp_path):
    """The path a hub name takes after download: ``datasets`` reading a folder of data files, and a dataset
    written by ``save_to_disk`` (a DatasetDict by split, or one Dataset)."""
    import datasets

    rows = {"train": [{"q": "1 + 1", "a": "2"}, {"q": "2 + 3", "a": "5"}], "test": [{"q": "4 * 4", "a": "16"}]}
    files = tmp_path / "files"
    files.mkdir()
    for split, split_rows in rows.items():
        (files / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    expected = {split: [Example(r["q"], r["a"]) for r in split_rows] for split, split_rows in rows.items()}
    assert load_examples(str(files), "q", "a", "test") == expected["test"]

    saved = tmp_path / "saved"
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(str(saved))
    assert load_examples(str(saved), "q", "a", "train") == expected["train"]
    with pytest.raises(ValueError, match=r"no split 'validation' \(it has \['test', 'train'\]\)"):
        load_examples(str(saved), "q", "a", "validation")
    one = tmp_path / "one"
    datasets.Dataset.from_list(rows["test"]).save_to_disk(str(one))
    assert load_examples(str(one), "q", "a", "train") == expected["test"]


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch():
    batches = [batch_indices(10, 4, step, seed=3) for step in range(5)]  # 20 indices: two epochs of 10
    assert batches == [batch_indices(10, 4, step, seed=3) for step in range(5)]
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new permutation each epoch
    assert batch_indices(10, 4, 0, seed=4) != batches[0]


def test_plain_and_chat_prompts(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    plain = PromptBuilder(tokenizer, "auto", SYSTEM_PROMPT, "Q: {question}\nA:")
    assert plain.template == "plain"
    assert tokenizer.decode(plain("1 + 1 = ?")) == "Q: 1 + 1 = ?\nA:"
    with pytest.raises(ValueError, match="no chat template"):
        PromptBuilder(tokenizer, "chat", SYSTEM_PROMPT, "")
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    chat = PromptBuilder(tokenizer, "auto", SYSTEM_PROMPT, "")
    assert tokenizer.decode(chat("1 + 1 = ?")) == f"<system>{SYSTEM_PROMPT}<user>1 + 1 = ?<assistant>"
    assert (
        tokenizer.decode(PromptBuilder(tokenizer, "chat", "", "")("1 + 1 = ?")) == "<system><user>1 + 1 = ?<assistant>"
    )
    # Gemma's templates refuse a system turn: the system prompt opens the user turn instead
    tokenizer.chat_template = (
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + tokenizer.chat_template
    )
    gemma = PromptBuilder(tokenizer, "chat", SYSTEM_PROMPT, "")
    assert tokenizer.decode(gemma("1 + 1 = ?")) == f"<user>{SYSTEM_PROMPT}\n\n1 + 1 = ?<assistant>"
    assert tokenizer.decode(PromptBuilder(tokenizer, "chat", "", "")("1 + 1 = ?")) == "<user>1 + 1 = ?<assistant>"


def test_gold_answers():
    assert gold_answer("She pays 2 * 36 = $72.\n#### 1,072") == "1072"  # GSM8K
    assert gold_answer("\\frac{1}{2}") == "\\frac{1}{2}"
