"""Running the real vLLM engine (CPU) in tests, and the independent HF reference it is compared with.

The reference is an HF transformers model with forward hooks that add s_l to decoder layer l's output: the
method's definition, implemented without our op or plugin.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import subprocess
import sys
from pathlib import Path

import torch

ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # lets tests ask the worker for its model class (LLM.apply_model sends a callable)
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
}
ENGINE_KWARGS = dict(dtype="float32", gpu_memory_utilization=0.05, max_model_len=1024, seed=0)
for key, value in ENGINE_ENV.items():
    os.environ.setdefault(key, value)


def random_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (length,), generator=g).tolist() for _ in range(count)]


def start_engine(model_dir, **kwargs):
    from vllm import LLM

    return LLM(str(model_dir), **{**ENGINE_KWARGS, **kwargs})


def greedy(llm, prompts: list[list[int]], max_tokens: int, lora_request=None) -> list[dict]:
    """[{'tokens': [...], 'logprobs': [...]}] for greedy decoding, with the sampled tokens' logprobs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    outputs = llm.generate(requests, params, use_tqdm=False, lora_request=lora_request)
    results = []
    for output in outputs:
        completion = output.outputs[0]
        logprobs = [
            entry[token].logprob for token, entry in zip(completion.token_ids, completion.logprobs, strict=True)
        ]
        results.append({"tokens": list(completion.token_ids), "logprobs": logprobs})
    return results


def model_class_name(llm) -> str:
    # a lambda would not pickle; attrgetter pickles by its attribute path
    return llm.apply_model(operator.attrgetter("__class__.__name__"))[0]


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def hf_reference(model_dir, table: torch.Tensor | None, prompts, generations, phase: str = "all") -> list[dict]:
    """Teacher-forced HF logprobs of the generated tokens, and the HF argmax at each step. ``phase``: add the
    vectors at every position, at the prompt's positions only, or at the generated tokens' only."""
    model = _hf_model(
        str(model_dir), tuple(p.stat().st_mtime_ns for p in sorted(Path(model_dir).glob("*.safetensors")))
    )
    if table is None:
        return teacher_forced(model, prompts, generations)
    results = []
    for prompt, generation in zip(prompts, generations, strict=True):
        positions = torch.arange(len(prompt) + len(generation["tokens"]))
        steered = {"all": positions >= 0, "prompt": positions < len(prompt), "generation": positions >= len(prompt)}
        mask = steered[phase][None, :, None].float()
        handles = [
            block.register_forward_hook(_add_to_output(table[layer], mask))
            for layer, block in enumerate(model.model.layers)
        ]
        try:
            results += teacher_forced(model, [prompt], [generation])
        finally:
            for handle in handles:
                handle.remove()
    return results


@functools.lru_cache(maxsize=2)  # a module compares several runs with one model; the weights' times key the cache
def _hf_model(model_dir: str, weights_mtimes: tuple[int, ...]):
    from transformers import AutoModelForCausalLM

    # eager attention: SDPA drops Gemma 2's attention logit soft cap, which vLLM applies
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def teacher_forced(model, prompts, generations) -> list[dict]:
    """``hf_reference`` for a given HF model object (e.g. one being trained)."""
    results = []
    with torch.no_grad():
        for prompt, generation in zip(prompts, generations, strict=True):
            ids = torch.tensor([prompt + generation["tokens"]])
            logprobs = model(ids).logits[0].log_softmax(-1)[len(prompt) - 1 : -1]
            tokens = torch.tensor(generation["tokens"])
            results.append(
                {
                    "argmax": logprobs.argmax(-1).tolist(),
                    "logprobs": logprobs.gather(1, tokens[:, None])[:, 0].tolist(),
                }
            )
    return results


def _add_to_output(vector, mask=None):
    """A forward hook adding ``vector`` to a decoder layer's output (at the positions ``mask`` [1, T, 1] marks)."""
    added = vector if mask is None else mask * vector

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + added, *output[1:])
        return output + added

    return hook


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


_RESULT = "ENGINE-RESULT "


def greedy_runs_in_subprocess(runs, env: dict[str, str], **engine_kwargs) -> list[dict]:
    """``greedy`` of each (model_dir, prompts, max_tokens), plus the model class, in a fresh interpreter (e.g. with
    ``VLLM_PLUGINS=''`` for stock vLLM): one engine after another, so each costs an engine start, not also an
    interpreter's start and vLLM's import. These are references, not the engine under test: each runs its engine
    core and worker inside that interpreter (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which spares the two spawned
    interpreters of every start (three Qwen2 engines: 25 s instead of 122 s on two busy cores, the same tokens
    and logprobs)."""
    request = [{"model": str(m), "prompts": p, "max_tokens": t, "engine": engine_kwargs} for m, p, t in runs]
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env},
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"engine subprocess failed:\n{result.stderr[-4000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith(_RESULT)]
    if len(lines) != len(request):
        raise RuntimeError(f"engine subprocess printed {len(lines)} of {len(request)} results:\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")  # fmt: skip
    return [json.loads(line[len(_RESULT) :]) for line in lines]


def _subprocess_main() -> None:
    for request in json.loads(sys.stdin.read()):
        llm = start_engine(request["model"], **request["engine"])
        outputs = greedy(llm, request["prompts"], request["max_tokens"])
        print(_RESULT + json.dumps({"model_class": model_class_name(llm), "outputs": outputs}), flush=True)
        shutdown(llm)


if __name__ == "__main__":
    _subprocess_main()
