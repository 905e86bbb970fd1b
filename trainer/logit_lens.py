"""Logit lens of trained steering vectors: ``python -m trainer.logit_lens VECTORS --model M``.

A steering vector ``s_l`` is added to the residual stream after decoder layer ``l`` (DESIGN.md §2). Read
through the model's unembedding (the "logit lens"), it shows which output tokens that direction pushes
up: its cosine similarity with each unembedding row ranks the tokens it promotes (top) and suppresses
(bottom); the dot product also weighs each token row's length. ``--apply-norm-weight`` multiplies the
vector by the final RMSNorm's weight first, as the model does before its unembedding. Layer norms and the
layer-by-layer cosine matrix show where training put its budget and how similar the layers' directions are.

Writes ``logit_lens.md``, ``logit_lens.json``, ``norms.png`` and ``similarity.png`` into the output
directory (default: ``<stem>_logit_lens/`` next to VECTORS).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steering_vllm.engine.families import norm_weight_offset
from steering_vllm.vectors.steering_vectors import SteeringVectors, SteeringVectorsError

_CHUNK_ROWS = 8192  # unembedding rows converted to float32 at a time


def analyse(
    vectors: SteeringVectors,
    unembedding: torch.Tensor,
    tokenizer,
    top_k: int = 10,
    norm_weight: torch.Tensor | None = None,
    progress: bool = False,
) -> dict:
    """Per-layer top/bottom tokens by cosine and top tokens by dot product, norms, and the [L, L] cosine matrix.

    ``unembedding`` is [V, d] in any float dtype and on any device; its rows are taken in float32 in chunks.
    Rows past the tokenizer's vocabulary (padding rows of real checkpoints) are ignored. Returns plain
    JSON-able values; layers whose vector is zero (absent from the file or all zeros) get empty token lists.
    """
    table = vectors.to_tensor()
    num_layers, hidden = table.shape
    if unembedding.dim() != 2 or unembedding.shape[1] != hidden:
        raise ValueError(f"unembedding has shape {tuple(unembedding.shape)}, expected [vocab, {hidden}]")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    vocab = min(unembedding.shape[0], len(tokenizer))
    directions = table if norm_weight is None else table * norm_weight.detach().float().cpu()
    directions = directions.to(unembedding.device)
    dots = torch.empty(vocab, num_layers, dtype=torch.float32)
    row_norms = torch.empty(vocab, dtype=torch.float32)
    starts = range(0, vocab, _CHUNK_ROWS)
    for start in tqdm(starts, desc="unembedding", unit="chunk", disable=not progress or len(starts) < 2):
        rows = unembedding[start : min(start + _CHUNK_ROWS, vocab)].detach().to(torch.float32)
        dots[start : start + len(rows)] = (rows @ directions.T).cpu()
        row_norms[start : start + len(rows)] = rows.norm(dim=1).cpu()
    cosines = dots / (row_norms[:, None] * directions.norm(dim=1).cpu()[None, :]).clamp_min(1e-30)

    k = min(top_k, vocab)
    norms = table.double().norm(dim=1)
    layers = []
    for layer in range(num_layers):
        entry = {"layer": layer, "norm": float(norms[layer]), "absent": layer not in vectors.vectors}
        entry["steered"] = bool(norms[layer] > 0)
        lists = {"top_cosine": (cosines, True), "bottom_cosine": (cosines, False), "top_dot": (dots, True)}
        for name, (scores, largest) in lists.items():
            entry[name] = _ranked(scores[:, layer], k, largest, tokenizer) if entry["steered"] else []
        layers.append(entry)

    unit = table.double() / norms.clamp_min(1e-300)[:, None]  # zero rows stay zero
    # the upper triangle mirrored: a BLAS product is not bitwise symmetric on every CPU, the matrix is
    gram = (unit @ unit.T).clamp(-1.0, 1.0)
    similarity = gram.triu() + gram.triu(1).T
    return {
        "source": vectors.source,
        "model": vectors.model,
        "num_layers": num_layers,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "top_k": k,
        "norm_weight_applied": norm_weight is not None,
        "norms": [float(n) for n in norms],
        "similarity": similarity.tolist(),
        "layers": layers,
    }


def _ranked(scores: torch.Tensor, k: int, largest: bool, tokenizer) -> list[dict]:
    values, ids = scores.topk(k, largest=largest)
    pairs = zip(values.tolist(), ids.tolist(), strict=True)
    return [{"id": i, "token": tokenizer.decode([i]), "score": v} for v, i in pairs]


def load_unembedding(model: str) -> tuple[torch.Tensor, torch.Tensor, object, object]:
    """(unembedding [V, d], final norm weight [d], text config, tokenizer) of an HF checkpoint or hub name.

    Weights keep the checkpoint's dtype (bf16 for most real models); ``analyse`` works in float32 per chunk.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
    norm = getattr(lm.get_decoder(), "norm", None)
    if lm.get_output_embeddings() is None or norm is None:
        raise ValueError(f"{model}: no output embeddings or final norm found on {type(lm).__name__}")
    # the weight the final norm multiplies by: 1 + weight for Gemma's. (Gemma's final logit soft-capping is
    # a monotone map of each logit, so it changes no ranking here.)
    norm_weight = norm.weight.detach() + norm_weight_offset(norm)
    return lm.get_output_embeddings().weight.detach(), norm_weight, lm.config.get_text_config(), tokenizer


# ---- writers -----------------------------------------------------------------------------------------------


def _md_token(entry: dict) -> str:
    """repr-quoted (whitespace and newlines visible) in a code span, '|' escaped for a table cell.

    A token that decodes to U+FFFD (part of a multi-byte character) gets its id, to tell such tokens apart.
    """
    quoted = repr(entry["token"]).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall("`+", quoted)), default=0) + 1)
    return f"{fence}{quoted}{fence}" + (f" #{entry['id']}" if "\ufffd" in entry["token"] else "")


def markdown_tokens(tokens: list[dict], n: int) -> str:
    """The first ``n`` tokens of a ranked list as one table cell: each quoted token and its score."""
    return ", ".join(f"{_md_token(t)} {t['score']:.3f}" for t in tokens[:n])


def write_markdown(result: dict, path) -> Path:
    lines = [
        f"# Logit lens: {result['source']}",
        "",
        f"Model `{result['model'] or '-'}`: {result['num_layers']} layers, hidden size {result['hidden_size']}, "
        f"vocabulary {result['vocab_size']}; top-k {result['top_k']}; final-norm weight applied: "
        f"{'yes' if result['norm_weight_applied'] else 'no'}.",
        "",
        "Scores are cosine similarities between the layer's vector and each token's unembedding row.",
        "",
        "| layer | norm | top 5 | bottom 5 |",
        "|---:|---:|---|---|",
    ]
    for entry in result["layers"]:
        if entry["steered"]:
            top, bottom = markdown_tokens(entry["top_cosine"], 5), markdown_tokens(entry["bottom_cosine"], 5)
        else:
            top, bottom = "(absent)" if entry["absent"] else "(zero vector)", ""
        lines.append(f"| {entry['layer']} | {entry['norm']:.4f} | {top} | {bottom} |")
    for entry in filter(lambda e: e["steered"], result["layers"]):
        lines += ["", f"## Layer {entry['layer']} (norm {entry['norm']:.4f})", ""]
        lines += ["| rank | top cosine | | bottom cosine | | top dot product | |", "|---:|---|---:|---|---:|---|---:|"]
        for rank, row in enumerate(zip(entry["top_cosine"], entry["bottom_cosine"], entry["top_dot"], strict=True), 1):
            cells = " | ".join(f"{_md_token(t)} | {t['score']:.4f}" for t in row)
            lines.append(f"| {rank} | {cells} |")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def write_json(result: dict, path) -> Path:
    Path(path).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def plot_norms(result: dict, path) -> Path:
    plt = _pyplot()
    layers = list(range(result["num_layers"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(layers)), 3.5), layout="constrained")
    ax.bar(layers, result["norms"], color="tab:blue")
    ax.set(xlabel="layer", ylabel="L2 norm", title="Steering vector norm by layer", xlim=(-0.6, len(layers) - 0.4))
    _integer_ticks(ax.xaxis)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_similarity(result: dict, path) -> Path:
    plt = _pyplot()
    size = min(12.0, max(4.5, 0.2 * result["num_layers"]))
    fig, ax = plt.subplots(figsize=(size + 1.2, size), layout="constrained")
    image = ax.imshow(result["similarity"], cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ax.set(xlabel="layer", ylabel="layer", title="Cosine similarity between layers' vectors")
    _integer_ticks(ax.xaxis, ax.yaxis)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# ---- CLI ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.logit_lens", description=__doc__.splitlines()[0])
    parser.add_argument("vectors", type=Path, help="steering vectors (.safetensors, .npy, .gguf, HF checkpoint)")
    parser.add_argument("--model", required=True, help="base model: HF checkpoint directory or hub name")
    parser.add_argument("--top-k", type=int, default=10, help="tokens listed per layer and list (default 10)")
    parser.add_argument("--apply-norm-weight", action="store_true", help="multiply by the final norm's weight")
    parser.add_argument("--output-dir", type=Path, help="default: <stem>_logit_lens/ next to VECTORS")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    from transformers import AutoConfig

    try:  # the config first (cheap), so that a file that does not fit fails before the weights load
        config = AutoConfig.from_pretrained(args.model).get_text_config()
    except (OSError, ValueError) as e:
        looks_like_path = args.model.startswith((".", "/", "~")) or args.model.count("/") > 1
        reason = "no such directory" if looks_like_path and not Path(args.model).exists() else e
        return _fail(f"cannot load model {args.model!r}: {reason}")
    try:
        vectors = SteeringVectors.load(args.vectors, num_layers=config.num_hidden_layers)
        vectors.check_compatible(config.num_hidden_layers, config.hidden_size, args.model)
    except SteeringVectorsError as e:
        return _fail(str(e))
    try:
        unembedding, norm_weight, _, tokenizer = load_unembedding(args.model)
    except (OSError, ValueError) as e:
        return _fail(f"cannot load model {args.model!r}: {e}")

    norm_weight = norm_weight if args.apply_norm_weight else None
    result = analyse(vectors, unembedding, tokenizer, args.top_k, norm_weight, progress=True)
    result["model"] = args.model
    out = args.output_dir or args.vectors.parent / f"{args.vectors.stem}_logit_lens"
    out.mkdir(parents=True, exist_ok=True)
    written = [
        write_markdown(result, out / "logit_lens.md"),
        write_json(result, out / "logit_lens.json"),
        plot_norms(result, out / "norms.png"),
        plot_similarity(result, out / "similarity.png"),
    ]
    print(f"wrote {', '.join(p.name for p in written)} to {out}")
    for entry in filter(lambda e: e["steered"], result["layers"]):
        top = ", ".join(repr(t["token"]) for t in entry["top_cosine"][:3])
        print(f"layer {entry['layer']:3d}  norm {entry['norm']:8.4f}  top: {top}")
    if not any(entry["steered"] for entry in result["layers"]):
        print("no layer is steered (all vectors are zero)")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
