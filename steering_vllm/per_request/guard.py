"""The engine core's last check: no request is served vectors it did not ask for.

The front end resolves each request's steering choice (``steering_vllm.per_request.frontend``). A request that reaches
the engine core unresolved came through a front end without the plugin's hooks (a mode the start-up checks
did not foresee, an external front end) or asks an engine for something it was not started to do. Such a
request is refused here, in the engine core's input thread, where vLLM answers a failed
``preprocess_add_request`` with an error for that request alone; the engine keeps serving the others.

- engine with per-request sets: every sampling request must carry the configuration its front end
  resolved (``extra_args["steering_config"]``); without it the workers would serve row 0 (no steering)
  where the request may have asked for a set or the default vectors;
- engine without per-request sets: a request carrying a steering choice is refused (it would silently
  get the global vectors instead).
"""

from __future__ import annotations

import functools

from steering_vllm.config import PHASE_KEY, per_request_options
from steering_vllm.per_request.sets import CHOICE_KEY, CONFIG_KEY, SCALE_KEY, parse_phase

STEERING_KEYS = (CHOICE_KEY, SCALE_KEY, PHASE_KEY, CONFIG_KEY)
START_WITH_SETS = (
    "start the server with --steering-sets NAME=PATH (or --max-steering-configs N, or --steering-phase for a phase)"
)


def install() -> None:
    """Wrap ``EngineCore.preprocess_add_request`` (every engine core built in this process checks requests)."""
    from vllm.v1.engine.core import EngineCore

    if "_steering_vllm_guarded" in vars(EngineCore):
        return
    preprocess = EngineCore.preprocess_add_request

    @functools.wraps(preprocess)
    def preprocess_add_request(self, request):
        check_request(request.request_id, request.sampling_params, _per_request(self))
        return preprocess(self, request)

    EngineCore.preprocess_add_request = preprocess_add_request
    EngineCore._steering_vllm_guarded = True


def _per_request(engine_core) -> bool:
    per_request = getattr(engine_core, "_steering_per_request", None)
    if per_request is None:
        from steering_vllm.engine.families import is_steered

        config = engine_core.vllm_config
        per_request = is_steered(config.model_config) and per_request_options(config.additional_config) is not None
        engine_core._steering_per_request = per_request
    return per_request


def check_request(request_id: str, sampling_params, per_request: bool) -> None:
    """Raise ValueError for a request this engine cannot serve with the vectors it asked for."""
    if sampling_params is None:  # pooling requests are not steered per request
        return
    extra_args = sampling_params.extra_args or {}
    if per_request:
        try:
            parse_phase(extra_args)
        except ValueError as e:
            raise ValueError(f"steering: request {request_id}: {e}") from None
        if not isinstance(extra_args.get(CONFIG_KEY), str):
            raise ValueError(
                f"steering: request {request_id} reached the engine without a resolved steering configuration: "
                "its front end does not run steering_vllm's per-request hooks (several API servers, or a front end "
                "of another process?). Serve per-request sets through one API server (--api-server-count 1)."
            )
        return
    asked = sorted(key for key in STEERING_KEYS if key in extra_args)
    if asked:
        raise ValueError(
            f"steering: request {request_id} chooses vectors ({', '.join(asked)}) but this engine serves one set to "
            f"every request; to choose per request, {START_WITH_SETS}"
        )
