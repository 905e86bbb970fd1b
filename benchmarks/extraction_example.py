"""The extraction page's example, run: a sentiment vector for the real SmolLM2-135M-Instruct, read and served.

Runs the page's commands as a user would (``trainer.extract`` on ``examples/sentiment_pairs.jsonl``, the logit
lens with the final norm's weight, ``steering-vllm convert`` to ``happy`` (layer 15, x2) and ``grumpy`` (x-2)),
then serves both as per-request sets of one vLLM engine (torch.compile'd, greedy) beside the unsteered model,
and measures how far the layer-15 vector moves the word after "It was" toward positive words (log p of
" wonderful / great / happy" minus log p of " terrible / awful / sad", through the trainer's learner). Records
the late layers' lens rows, the completions and the log-odds.

  python -m trainer.real_model && python -m benchmarks.extraction_example
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.commands import run_command
from benchmarks.toy_analysis import lens_table

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ROOT / "examples" / "sentiment_pairs.jsonl"
LENS_LAYERS = (23, 26, 29)
PROMPTS = ("How was your weekend?", "Describe the restaurant you went to last night.")
CHOICES = (("unsteered", None), ("happy (layer 15, x2)", "happy"), ("grumpy (layer 15, x-2)", "grumpy"))
POSITIVE, NEGATIVE = (" wonderful", " great", " happy"), (" terrible", " awful", " sad")


def completions(model: str, sets: dict[str, str], max_tokens: int) -> list[dict]:
    """Each choice's greedy completion of each prompt, all in one ``generate`` call of one engine."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = AutoTokenizer.from_pretrained(model)
    llm = LLM(model, seed=0, gpu_memory_utilization=0.1, max_model_len=1024,
              additional_config={"steering_sets": sets})  # fmt: skip
    requests, params = [], []
    for _, name in CHOICES:
        for prompt in PROMPTS:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)  # fmt: skip
            requests.append(TokensPrompt(prompt_token_ids=tokenizer(text, add_special_tokens=False)["input_ids"]))
            extra = {"steering": name} if name else None
            params.append(SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=extra))
    texts = [output.outputs[0].text for output in llm.generate(requests, params, use_tqdm=False)]
    rows = []
    for number, (label, _) in enumerate(CHOICES):
        row = {"request": label}
        for i in range(len(PROMPTS)):
            row[f"prompt{i}"] = " ".join(texts[number * len(PROMPTS) + i].split())
        rows.append(row)
    return rows


def log_odds(model_path: str, vectors_path: Path, layer: int = 15) -> list[dict]:
    """log p(positive words) - log p(negative words) for the word after "It was", vectors at ``layer`` scaled."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steering_vllm import SteeringVectors
    from trainer.learner import SteeredLearner

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    config = model.config
    vectors = SteeringVectors.load(vectors_path, num_layers=config.num_hidden_layers).to_tensor()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                         tokenize=False) + "It was"  # fmt: skip
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])

    def first(words):
        return [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]

    rows = []
    for scale in (0.0, 2.0, -2.0):
        table = torch.zeros(config.num_hidden_layers, config.hidden_size)
        table[layer] = scale * vectors[layer]
        with torch.no_grad():
            hidden = SteeredLearner(model, table)(ids, torch.ones_like(ids))[:, -1]
            logprobs = model.get_output_embeddings()(hidden).log_softmax(-1)[0]
        margin = logprobs[first(POSITIVE)].logsumexp(0) - logprobs[first(NEGATIVE)].logsumexp(0)
        rows.append({"scale": scale, "log_odds": float(margin)})
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    from benchmarks.results import load, markdown, record
    from trainer.real_model import build

    parser = argparse.ArgumentParser(prog="python -m benchmarks.extraction_example", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=40, help="new tokens per completion")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # the engine below runs in this process
    model = build()["model"]
    work = Path(tempfile.mkdtemp(prefix="extraction-example-"))
    vectors = work / "sentiment.safetensors"
    print("[1/4] trainer.extract, the logit lens, convert", flush=True)
    extract_s = run_command([sys.executable, "-m", "trainer.extract", "--model", model, "--pairs", str(PAIRS),
                             "--chat-template", "--position", "mean", "--output", str(vectors)])  # fmt: skip
    run_command([sys.executable, "-m", "trainer.logit_lens", str(vectors), "--model", model, "--apply-norm-weight",
                 "--top-k", "5", "--output-dir", str(work / "lens")])  # fmt: skip
    convert = [str(Path(sys.executable).parent / "steering-vllm"), "convert", str(vectors)]
    run_command([*convert, str(work / "happy.safetensors"), "--layers", "15", "--scale", "2"])
    run_command([*convert, str(work / "grumpy.safetensors"), "--layers", "15", "--scale", "-2"])
    lens = json.loads((work / "lens" / "logit_lens.json").read_text())
    record("extraction_lens", "Logit lens of the sentiment vector (SmolLM2-135M-Instruct), final norm's weight "
           "applied: cosine with each token's unembedding row", [("layer", "layer", ""),
           ("top", "top 5", ""), ("bottom", "bottom 5", "")], lens_table(lens, layers=LENS_LAYERS),
           notes=f"trainer.extract took {extract_s:.1f} s (the whole command)")  # fmt: skip
    print("[2/4] one engine: unsteered, happy and grumpy side by side", flush=True)
    sets = {"happy": str(work / "happy.safetensors"), "grumpy": str(work / "grumpy.safetensors")}
    rows = completions(model, sets, args.max_tokens)
    columns = [("request", "request", ""), *[(f"prompt{i}", f'"{p}"', "") for i, p in enumerate(PROMPTS)]]
    record("extraction_generations", f"Greedy completions, {args.max_tokens} new tokens, three choices in one batch "
           "of one torch.compile'd engine", columns, rows)  # fmt: skip
    print("[3/4] log-odds of the next word after 'It was'", flush=True)
    record("extraction_log_odds", "log p(' wonderful / great / happy') - log p(' terrible / awful / sad') after "
           "'It was', the vector at layer 15 scaled", [("scale", "scale", ".0f"), ("log_odds", "log-odds", ".1f")],
           log_odds(model, vectors))  # fmt: skip
    names = ("extraction_lens", "extraction_generations", "extraction_log_odds")
    print("[4/4] done\n\n" + "\n".join(markdown(load(name)) for name in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
