"""The baselines of ``--trainable``: every weight (``full``) or a rank-r LoRA on every ``mlp.down_proj`` (``lora``,
the paper's App. D), with the learner, rollouts and objective otherwise those of the steering run.

Both keep the learner's steering parameter frozen at zero, so its fused op adds nothing and the learner computes
the plain model. Same protocol as ``trainer.trainables.SteeringTrainable``.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from trainer.learner import SteeredLearner

MODEL_DIR = "model"
ADAPTER_DIR = "lora_adapter"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
SYNC_BUCKET_BYTES = 512 * 2**20


class FullTrainable:
    """Every weight of the HF model trains. ``sync`` reloads all of them into the engine in place.

    Memory, beyond the model, its gradients and the optimizer state: a frozen copy of the initial weights in host
    memory (for ``reference_logprobs`` and the update norm), copied onto the model's device for each reference
    pass (one more transient copy of the weights there); and in ``sync`` one bucket of weights (at most
    ``sync_bucket_bytes``, at the engine's dtype) as safetensors bytes, plus what the RPC transport and the
    worker's deserialization hold of it.
    """

    def __init__(self, model, gradient_checkpointing: bool, tokenizer=None):
        self.learner = SteeredLearner(model, None, gradient_checkpointing)
        self.learner.steering.requires_grad_(False)
        model.requires_grad_(True)  # after SteeredLearner, which freezes the model
        self.model = model
        self._base = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
        self.sync_bucket_bytes = SYNC_BUCKET_BYTES
        self.tokenizer = tokenizer

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def engine_kwargs(self) -> dict:
        from trainer.full_weights_worker import EXTENSION

        return {"worker_extension_cls": EXTENSION}

    def sync(self, engine) -> None:
        """Reload every weight into the running engine in place (vLLM's layerwise reload), then reset its prefix
        cache.

        The weights travel in buckets of whole decoder layers (``sync_bucket_bytes`` each, at the engine's
        dtype): each RPC's payload is copied a few times on its way into the worker, so one payload of the whole
        model would need several times the model's size in host memory (at 1.5B parameters, more than a 24 GiB
        machine has). A bucket holds whole layers because vLLM fuses a layer's q/k/v and gate/up projections;
        layers a bucket does not carry keep their weights. Tied embeddings: ``named_parameters`` names the
        shared tensor once (``model.embed_tokens.weight``); the worker repacks its tied ``lm_head``.
        """
        from safetensors.torch import save

        llm = getattr(engine, "llm", engine)  # a RolloutEngine or a vllm.LLM
        dtype = llm.llm_engine.vllm_config.model_config.dtype
        for bucket in layer_buckets(self.model.named_parameters(), self.sync_bucket_bytes, dtype):
            tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in bucket}
            counts = llm.collective_rpc("load_weights_bytes", args=(save(tensors),))
            if any(count != len(tensors) for count in counts):
                raise RuntimeError(f"full sync: workers loaded {counts} tensors, expected {len(tensors)}")
        if not llm.reset_prefix_cache():
            raise RuntimeError("full sync: the prefix cache could not be reset (requests still running?)")

    def lora_request(self):
        return None

    @torch.no_grad()
    def reference_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        with _swapped_parameters(self.model, self._base):
            return self.learner.token_logprobs(input_ids, attention_mask, temperature)

    def save(self, output_dir: Path) -> Path:
        """The whole model in HF format, with the tokenizer when one was given, so that ``vllm serve`` and
        ``trainer.eval`` can load the directory as it is."""

        def write(directory: Path) -> None:
            self.model.save_pretrained(directory)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(directory)

        return _atomic_dir(Path(output_dir) / MODEL_DIR, write)

    def state_dict(self) -> dict:
        return {"model": {name: p.detach().to("cpu", copy=True) for name, p in self.model.named_parameters()}}

    def load_state_dict(self, state: dict) -> None:
        _copy_named(self.model.named_parameters(), state["model"])

    @torch.no_grad()
    def metrics(self) -> dict:
        """The distance from the initial weights (one pass over all weights: a device-to-host copy on GPU)."""
        squares = sum(
            float((p.detach().float().cpu() - self._base[name].float()).pow(2).sum())
            for name, p in self.model.named_parameters()
        )
        return {"weight_update_norm": round(squares**0.5, 6)}


class LoraTrainable:
    """Rank-``rank`` LoRA (peft) on every ``mlp.down_proj``; only its A and B train, B starts at zero.

    peft's ``inject_adapter_in_model`` wraps the ``down_proj`` modules in place, so the model object and the
    submodules ``SteeredLearner`` calls stay the same. vLLM serves the adapter through a ``LoRARequest``: ``sync``
    writes it in PEFT format to a fresh directory under a new id and name (vLLM caches adapters by id and keys
    prefix-cache blocks by name and path, so no block computed with an older adapter is reused).
    """

    def __init__(self, model, gradient_checkpointing: bool, rank: int, alpha: float):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import cast_adapter_dtype

        self.config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=["down_proj"],
            lora_dropout=0.0,
            bias="none",
            base_model_name_or_path=getattr(model, "name_or_path", None) or None,
        )
        inject_adapter_in_model(self.config, model)
        cast_adapter_dtype(model, "default")  # as get_peft_model does: adapters of a bf16/fp16 model train in fp32
        self.learner = SteeredLearner(model, None, gradient_checkpointing)  # freezes every weight
        self.learner.steering.requires_grad_(False)
        self.model = model
        self._lora = {name: p for name, p in model.named_parameters() if ".lora_" in name}
        if not self._lora:
            raise ValueError("lora: the model has no down_proj modules to adapt")
        for p in self._lora.values():
            p.requires_grad_(True)
        self._root = Path(tempfile.mkdtemp(prefix="steering-lora-"))
        weakref.finalize(self, shutil.rmtree, self._root, True)
        self._ids = itertools.count(1)
        self._request = None
        self._write_request()  # generation goes through the adapter from the start (B = 0: the base model)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self._lora.values())

    def engine_kwargs(self) -> dict:
        max_rank = next((r for r in VLLM_LORA_RANKS if r >= self.config.r), None)
        if max_rank is None:
            raise ValueError(f"lora: rank {self.config.r} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")
        return {"enable_lora": True, "max_lora_rank": max_rank, "max_loras": 1}

    def sync(self, engine) -> None:
        """A new adapter directory and request; the engine loads it with the first request that names it."""
        self._write_request()

    def lora_request(self):
        return self._request

    @torch.no_grad()
    def reference_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        with _adapters_disabled(self.model):
            return self.learner.token_logprobs(input_ids, attention_mask, temperature)

    def save(self, output_dir: Path) -> Path:
        return _atomic_dir(Path(output_dir) / ADAPTER_DIR, self._write_adapter)

    def state_dict(self) -> dict:
        return {"lora": {name: p.detach().to("cpu", copy=True) for name, p in self._lora.items()}}

    def load_state_dict(self, state: dict) -> None:
        _copy_named(self._lora.items(), state["lora"])

    @torch.no_grad()
    def metrics(self) -> dict:
        """``||scaling * B A||_F`` over all adapted layers, via ``tr((B^T B)(A A^T))`` (r x r products only)."""
        squares = 0.0
        for module in self._lora_modules():
            a = module.lora_A["default"].weight.float()
            b = module.lora_B["default"].weight.float()
            squares += float(((b.T @ b) * (a @ a.T)).sum()) * module.scaling["default"] ** 2
        return {"lora_update_norm": round(max(squares, 0.0) ** 0.5, 6)}

    def _lora_modules(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def _write_adapter(self, directory: Path) -> None:
        """PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors`` with PeftModel's names."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = get_peft_model_state_dict(self.model)
        tensors = {f"base_model.model.{name}": t.detach().to("cpu").contiguous() for name, t in state.items()}
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        self.config.save_pretrained(str(directory))

    def _write_request(self) -> None:
        from vllm.lora.request import LoRARequest

        lora_id = next(self._ids)
        directory = self._root / f"adapter-{lora_id}"
        self._write_adapter(directory)
        previous, self._request = self._request, LoRARequest(f"trainable-lora-{lora_id}", lora_id, str(directory))
        if previous is not None:  # superseded: vLLM read it already, or never will
            shutil.rmtree(previous.lora_path, ignore_errors=True)


def layer_buckets(named_parameters, limit_bytes: int, dtype: torch.dtype) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of parameters, one group per decoder layer (``model.layers.N.*``) and one per other
    module, packed into buckets of at most ``limit_bytes`` at ``dtype`` (a group larger than that alone)."""
    groups: dict[str, list] = {}
    for name, p in named_parameters:
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else ".".join(parts[:-1])
        groups.setdefault(key, []).append((name, p))
    itemsize = torch.empty((), dtype=dtype).element_size()
    buckets, current, size = [], [], 0
    for group in groups.values():
        group_size = sum(p.numel() for _, p in group) * itemsize
        if current and size + group_size > limit_bytes:
            buckets.append(current)
            current, size = [], 0
        current += group
        size += group_size
    if current:
        buckets.append(current)
    return buckets


@contextlib.contextmanager
def _swapped_parameters(model, tensors: dict[str, torch.Tensor]):
    """``model``'s parameters temporarily hold ``tensors`` (by name); the trained values are put back after."""
    saved = {}
    try:
        for name, p in model.named_parameters():
            saved[name] = p.data
            p.data = tensors[name].to(p.device, p.dtype)
        yield
    finally:
        for name, p in model.named_parameters():
            if name in saved:
                p.data = saved[name]


@contextlib.contextmanager
def _adapters_disabled(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = {p: p.requires_grad for m in layers for p in m.parameters()}  # peft's toggle resets requires_grad
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _copy_named(named_parameters, state: dict[str, torch.Tensor]) -> None:
    named = dict(named_parameters)
    if set(named) != set(state):
        missing, unexpected = sorted(set(named) - set(state)), sorted(set(state) - set(named))
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(state[name])


def _atomic_dir(target: Path, write) -> Path:
    """``write(tmp)`` into a fresh directory next to ``target``, then swap it in for ``target`` (the old one is
    removed). Readers never see a partial directory (between the two renames, briefly none); a failed write
    leaves the old one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
    try:
        write(tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target
