"""Steering vectors from contrasting prompts, without training: ``python -m trainer.extract --model M --pairs
pairs.jsonl --output v.safetensors``.

Contrastive activation addition: each pair's positive and negative texts run through the frozen model, the
residual stream is read at the end of every decoder layer (where ``layers.{l}`` is added, DESIGN.md §2: the
learner's own forward, so there is one definition of "end of layer l"), and each layer's vector is

- ``mean_diff``: the mean over pairs of (positive - negative);
- ``pca``: as repeng's ``pca_diff``, the first principal component of the centred paired differences; its
  sign and length are those of the differences' mean projection on it (repeng keeps a unit vector signed by a
  majority of pairs), so a shift along one direction gives the same vector either way.

Read at the last token (default) or as the mean over the completion's tokens (the text after ``prompt``).
``--normalize F`` scales each layer's vector to F times that layer's mean residual norm at the read positions.

``pairs.jsonl``: one object per line, ``{"positive": "...", "negative": "..."}``, optionally with a shared
``"prompt"`` that both continue (with ``--chat-template`` the prompt is a user turn and the two texts are the
assistant's reply).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steering_vllm.vectors.convert import parse_layers
from steering_vllm.vectors.steering_vectors import SteeringVectors, SteeringVectorsError
from trainer.learner import check_steerable, steered_hidden_states

logger = logging.getLogger(__name__)

METHODS = ("mean_diff", "pca")
POSITIONS = ("last", "mean")


@dataclass(frozen=True)
class Pair:
    positive: str
    negative: str
    prompt: str = ""


def read_pairs(path: Path) -> list[Pair]:
    """The pairs of a JSON-lines file; a line that is not a pair is refused naming its number."""
    pairs = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the pairs ({e.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("positive", "negative")):
            raise ValueError(f'{path}:{number}: expected {{"positive": str, "negative": str[, "prompt": str]}}')
        prompt = item.get("prompt", "")
        if not isinstance(prompt, str):
            raise ValueError(f"{path}:{number}: 'prompt' must be a string, got {type(prompt).__name__}")
        pairs.append(Pair(item["positive"], item["negative"], prompt))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def tokenize(tokenizer, prompt: str, completion: str, chat_template: bool) -> tuple[list[int], int]:
    """The token ids of prompt + completion and where the completion starts (the two tokenized apart, so the
    boundary is exact)."""
    if chat_template:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds its own specials
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not completion_ids and not prompt_ids:
        raise ValueError(f"empty text: prompt {prompt!r}, completion {completion!r}")
    return list(prompt_ids) + list(completion_ids), len(prompt_ids)


@dataclass(frozen=True)
class Activations:
    """``streams`` [N, L, d]: each text's residual stream at the end of each layer, at its last token or averaged
    over its completion; ``norms`` [N, L]: the mean norm of the per-token streams read (what ``--normalize``
    scales to: the mean of norms, not the norm of the mean)."""

    streams: torch.Tensor
    norms: torch.Tensor


@torch.no_grad()
def read_activations(model, texts, position: str = "last", batch_size: int = 8, progress: bool = True) -> Activations:
    """``texts``: (token ids, completion start) each; the residual streams at the end of each layer (no vectors
    added), float32."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    config = model.config
    device = model.get_input_embeddings().weight.device
    table_dtype = torch.float64 if model.dtype == torch.float64 else torch.float32  # the op's table is fp32 or fp64
    zeros = torch.zeros(config.num_hidden_layers, 1, config.hidden_size, dtype=table_dtype, device=device)
    out = torch.empty(len(texts), config.num_hidden_layers, config.hidden_size, dtype=torch.float32)
    norms = torch.empty(len(texts), config.num_hidden_layers, dtype=torch.float32)
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="activations", unit="batch", disable=not progress):
        batch = texts[start : start + batch_size]
        length = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        read = torch.zeros(len(batch), length, dtype=torch.float32)  # each sequence's weights over its positions
        for row, (tokens, completion_start) in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
            if position == "last" or completion_start >= len(tokens):
                read[row, len(tokens) - 1] = 1.0
            else:
                read[row, completion_start : len(tokens)] = 1.0 / (len(tokens) - completion_start)
        streams: list[torch.Tensor] = []
        steered_hidden_states(model, zeros, ids.to(device), mask.to(device), streams=streams)
        read = read.to(device)
        layers = [torch.einsum("bti,bt->bi", stream.float(), read) for stream in streams]
        out[start : start + len(batch)] = torch.stack(layers, dim=1).cpu()
        token_norms = [(stream.float().norm(dim=-1) * read).sum(dim=1) for stream in streams]
        norms[start : start + len(batch)] = torch.stack(token_norms, dim=1).cpu()
    return Activations(out, norms)


def directions(positive: torch.Tensor, negative: torch.Tensor, method: str = "mean_diff") -> torch.Tensor:
    """[N, L, d] activations of the positive and negative texts -> [L, d] vectors (float64 inside)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    differences = (positive.double() - negative.double()).transpose(0, 1)  # [L, N, d]
    if method == "mean_diff":
        return differences.mean(dim=1).float()
    if differences.shape[1] < 2:
        raise ValueError("pca needs at least 2 pairs")
    mean = differences.mean(dim=1)
    centred = differences - mean[:, None]
    _, singular, right = torch.linalg.svd(centred, full_matrices=False)
    unit = right[:, 0, :]  # [L, d], either sign
    # Differences that do not vary (one shift, or duplicated pairs) have no first component: their direction is
    # the mean's. Relative to the mean's size, the spread is float64 rounding there.
    flat = singular[:, 0] <= 1e-9 * mean.norm(dim=-1) * differences.shape[1] ** 0.5
    if bool(flat.any()):
        logger.warning("extract: layers %s: the differences do not vary; pca takes the mean difference's direction",
                       flat.nonzero().flatten().tolist())  # fmt: skip
        unit = torch.where(flat[:, None], torch.nn.functional.normalize(mean, dim=-1), unit)
    length = torch.einsum("lnd,ld->ln", differences, unit).mean(dim=1)  # signed: points the vector positive-ward
    return (unit * length[:, None]).float()


def extract(
    model,
    tokenizer,
    pairs: list[Pair],
    method: str = "mean_diff",
    position: str = "last",
    layers: list[int] | None = None,
    normalize: float | None = None,
    chat_template: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> SteeringVectors:
    """Vectors from ``pairs`` on a transformers decoder of a family the learner steers."""
    check_steerable(model)
    if chat_template and any(not pair.prompt for pair in pairs):
        raise ValueError("--chat-template needs a 'prompt' in every pair (it becomes the user turn)")
    texts = []
    for pair in pairs:
        for completion in (pair.positive, pair.negative):
            texts.append(tokenize(tokenizer, pair.prompt, completion, chat_template))
    activations = read_activations(model, texts, position, batch_size, progress)
    table = directions(activations.streams[0::2], activations.streams[1::2], method)
    if normalize is not None:
        if not normalize > 0:
            raise ValueError(f"--normalize must be positive, got {normalize}")
        mean_norm = activations.norms.double().mean(dim=0)  # [L]
        table = table.double()
        table = (table * (normalize * mean_norm / table.norm(dim=-1).clamp_min(1e-30))[:, None]).float()
    provenance = {
        "made_by": "trainer.extract",
        "method": method,
        "position": position,
        "pairs": str(len(pairs)),
        "normalize": "none" if normalize is None else f"{normalize:g} x mean residual norm",
        "chat_template": str(chat_template).lower(),
    }
    name = getattr(model.config, "_name_or_path", None) or None
    vectors = SteeringVectors.from_tensor(table, model=name, source="<extracted>", provenance=provenance)
    return vectors if layers is None else vectors.select_layers(layers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model name or directory (a family the learner steers)")
    parser.add_argument("--pairs", required=True, type=Path, help='JSON lines {"positive", "negative"[, "prompt"]}')
    parser.add_argument("--output", required=True, type=Path, help="vectors to write (.safetensors, .gguf, .npy)")
    parser.add_argument("--method", choices=METHODS, default="mean_diff")
    parser.add_argument("--position", choices=POSITIONS, default="last",
                        help="read the last token, or the mean over the completion's tokens")  # fmt: skip
    parser.add_argument("--layers", type=parse_layers, help="layers to keep, e.g. '4-12' (the others are zero)")
    parser.add_argument("--normalize", type=float, help="scale each layer to this fraction of its mean residual norm")
    parser.add_argument("--chat-template", action="store_true", help="prompt as a user turn, texts as the reply")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        pairs = read_pairs(args.pairs)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        model = model.to(args.device).eval()
        vectors = extract(model, tokenizer, pairs, args.method, args.position, args.layers, args.normalize,
                          args.chat_template, args.batch_size)  # fmt: skip
        vectors.model = args.model
        vectors.save(args.output)
    except (ValueError, SteeringVectorsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    norms = ", ".join(f"{layer}: {norm:.3g}" for layer, norm in enumerate(vectors.norms()) if norm)
    print(f"wrote {args.output}: {args.method} over {len(pairs)} pairs; layer norms {norms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
