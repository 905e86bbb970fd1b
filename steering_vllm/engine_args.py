"""What the plugin adds to vLLM's ``EngineArgs``: the ``--steering-*`` flags and an early check of the vectors.

vLLM has no hook for plugin arguments, so ``install()`` wraps three ``EngineArgs`` methods (vLLM loads general
plugins, and so calls ``install()``, before it uses any of them):

- ``add_cli_args``: adds ``--steering-vectors`` and ``--steering-scale`` (``vllm serve`` and friends);
- ``from_cli_args``: routes them into ``additional_config``, which reaches the model in every worker;
- ``create_engine_config``: checks the vectors against the model's config in the caller's process, so a
  wrong file fails at once with its own error instead of as a dead worker behind a generic RuntimeError;
  and gives steered models the worker extension that hot-swap (``update_steering``) calls.
"""

from __future__ import annotations

import argparse
import os

from steering_vllm.config import (
    DEFAULT_MAX_CONFIGS,
    MAX_CONFIGS_KEY,
    PHASE_KEY,
    PHASES,
    SCALE_KEY,
    SETS_KEY,
    VECTORS_KEY,
    check_set_name,
)
from steering_vllm.engine.families import check_vectors_against_model, is_steered
from steering_vllm.engine.scale_out import check_serving_mode
from steering_vllm.vectors.steering_vectors import SteeringVectors, SteeringVectorsError


def install() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_steering_vllm_installed", False):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__
    original_create = EngineArgs.create_engine_config

    def add_cli_args(parser, *args, **kwargs):
        parser = original_add(parser, *args, **kwargs)
        add_steering_args(parser)
        return parser

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original_from(cls, args)
        route_steering_args(args, engine_args)
        return engine_args

    def create_engine_config(self, *args, **kwargs):
        vllm_config = original_create(self, *args, **kwargs)
        check_vectors_against_model(vllm_config)
        check_serving_mode(vllm_config)
        add_worker_extension(vllm_config)
        if is_steered(vllm_config.model_config):
            from steering_vllm.per_request import frontend

            # This process builds an engine's front end (LLM, a serve process, or one of several API servers):
            # it resolves each request's steering choice, or refuses one the engine cannot honour.
            frontend.install_hooks()
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    EngineArgs._steering_vllm_installed = True


def add_steering_args(parser: argparse.ArgumentParser) -> None:
    if any("--steering-vectors" in action.option_strings for action in parser._actions):
        return
    group = parser.add_argument_group("Steering", "Per-layer steering vectors (steering-vllm plugin).")
    group.add_argument(
        "--steering-vectors",
        type=_vectors_file,
        default=None,
        metavar="PATH",
        help="Steering vectors to serve with: our .safetensors format, an HF checkpoint with "
        "mlp.down_proj.bias tensors, the paper's .npy [L, d] or a GGUF control vector. Checked against the "
        "model when the engine starts. Default: none (all zero; output equals stock vLLM).",
    )
    group.add_argument(
        "--steering-scale",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="Multiply the steering vectors by this factor (default 1.0).",
    )
    group.add_argument(
        "--steering-sets",
        type=_named_vectors_file,
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="Named steering sets served side by side with the default (--steering-vectors): a request picks one "
        'with vllm_xargs {"steering": NAME} (or names with "steering_scale" weights, or "none"), or by NAME in the '
        "OpenAI model field. Turns on per-request steering.",
    )
    group.add_argument(
        "--max-steering-configs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="Per-request steering: distinct vector configurations served at once (one table row each); requests "
        f"with a new one wait for a free row. Default {DEFAULT_MAX_CONFIGS} when --steering-sets is given; "
        "giving it alone turns on per-request steering with no sets yet.",
    )
    group.add_argument(
        "--steering-phase",
        choices=PHASES,
        default=None,
        help='Positions steered for requests that do not choose (vllm_xargs {"steering_phase": ...}): all '
        "(default), the prompt's only, or the generated tokens' only. A phase other than all turns on "
        "per-request steering.",
    )
    group.add_argument(
        "--steering-dir",
        type=_directory,
        default=None,
        metavar="DIR",
        help="Let PUT /v1/steering load vector files by name from this directory (nothing outside it). "
        "Default: none (PUT takes vectors in the request body only). The endpoint is on when "
        "VLLM_PLUGINS names steering_vllm.",
    )


def route_steering_args(args: argparse.Namespace, engine_args) -> None:
    routed = {}
    path = getattr(args, "steering_vectors", None)
    if path is not None:
        routed[VECTORS_KEY] = path
        routed[SCALE_KEY] = getattr(args, "steering_scale", 1.0)
    elif getattr(args, "steering_scale", 1.0) != 1.0:
        raise SteeringVectorsError(
            "--steering-scale scales --steering-vectors, which was not given (a request "
            'scales a set with vllm_xargs {"steering": NAME, "steering_scale": X})'
        )
    sets = getattr(args, "steering_sets", None)
    if sets:
        names = [name for name, _ in sets]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise SteeringVectorsError(f"--steering-sets names {duplicated} more than once")
        routed[SETS_KEY] = dict(sets)
    max_configs = getattr(args, "max_steering_configs", None)
    if max_configs is not None:
        routed[MAX_CONFIGS_KEY] = max_configs
    phase = getattr(args, "steering_phase", None)
    if phase is not None:
        routed[PHASE_KEY] = phase
    if routed:
        engine_args.additional_config = {**(engine_args.additional_config or {}), **routed}


def _named_vectors_file(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{value!r}: give NAME=PATH")
    try:
        check_set_name(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name, _vectors_file(path)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a positive integer")
    return number


def _vectors_file(value: str) -> str:
    """Check the file on its own (format, names, shapes, values) before any engine starts."""
    path = os.path.abspath(value)
    try:
        SteeringVectors.load(path)
    except SteeringVectorsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def _directory(value: str) -> str:
    path = os.path.realpath(value)
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{value}: not a directory")
    return path


def add_worker_extension(vllm_config) -> None:
    """Give steered models' workers the hot-swap methods, unless the user named an extension of their own."""
    from steering_vllm.serve.worker import EXTENSION

    parallel_config = vllm_config.parallel_config
    if is_steered(vllm_config.model_config) and not parallel_config.worker_extension_cls:
        parallel_config.worker_extension_cls = EXTENSION
