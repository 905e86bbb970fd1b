"""Per-request steering in the engine's front end (``LLMEngine`` behind ``vllm.LLM``, ``AsyncLLM`` behind
``vllm serve``): resolve each request's choice, key its prefix cache, admit it, and tell the workers.

``install(engine)`` (called by the plugin after a steered model's engine is built) wraps methods of that
engine instance, nothing global. Without ``steering_sets`` / ``max_steering_configs`` it only refuses
requests that choose vectors (``refuse_choice``: they would silently get the engine's one set). With them:

- ``input_processor.process_inputs`` (and its async twin): resolve the request's ``extra_args`` to a
  configuration (a bad choice raises ValueError here, before anything is scheduled), record its hash in
  ``extra_args`` for the workers, and fold it into ``cache_salt`` so blocks are shared only by requests
  with the same vectors;
- ``engine_core.add_request`` (sync or async): count the request as live with its configuration and,
  the first time, send the configuration to every worker before the request itself. When
  ``max_steering_configs`` configurations are live, ``AsyncLLM`` waits for one to end; ``LLM`` refuses
  the request in ``process_inputs`` with a clear error;
- ``engine_core.get_output`` / ``abort_requests``: requests that finished or were aborted stop counting.

The engine-core client's half is ``admission``: one core for both engines, with a thin shell for each.

A request's vectors are fixed when it is admitted: replacing or removing its set later changes what new
requests resolve to, never what it is served with (DESIGN.md §4).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from contextvars import ContextVar

from vllm.exceptions import VLLMValidationError

from steering_vllm.config import PHASE_KEY, default_phase, per_request_options, steering_options
from steering_vllm.per_request.admission import Admission, wrap_async_client, wrap_sync_client
from steering_vllm.per_request.guard import START_WITH_SETS, STEERING_KEYS
from steering_vllm.per_request.sets import (
    CONFIG_KEY,
    Configuration,
    SteeringSets,
    parse_choice,
    parse_phase,
    salted,
)
from steering_vllm.vectors.steering_vectors import SteeringVectors, SteeringVectorsError

# An HTTP request's steering choice, resolved once on arrival (``endpoint.SetAsModelMiddleware``) and used for
# each of its prompts: a set replaced while the request is being processed cannot give its prompts other
# vectors than its x-steering-hash header names. A mutable holder, so the tasks vLLM spawns per prompt (which
# copy the context) see the same one.
PINNED_CHOICE: ContextVar[dict | None] = ContextVar("steering_pinned_choice", default=None)


def resolve_pinned(sets: SteeringSets, extra_args: dict | None) -> Configuration:
    """``sets.resolve(extra_args)``, or the configuration this HTTP request's choice was pinned to."""
    pin = PINNED_CHOICE.get()
    if pin is None:
        return sets.resolve(extra_args)
    choice = parse_choice(extra_args)
    if "configuration" not in pin:
        pin["choice"], pin["configuration"] = choice, sets.resolve(extra_args)
    elif pin["choice"] != choice:
        return sets.resolve(extra_args)
    return pin["configuration"]


class SteeringChoiceError(VLLMValidationError, ValueError):
    """A request's steering choice cannot be served: a ValueError to Python callers, and a validation error that
    vLLM's servers answer with 400 on every route (a plain ValueError raised while vLLM 0.32 processes a
    request's inputs becomes a 500 with an empty message)."""


def install_hooks() -> None:
    """Make every ``LLMEngine`` and ``AsyncLLM`` built from now on call ``install`` on itself."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine

    for cls in (LLMEngine, AsyncLLM):
        if "_steering_vllm_installed" in vars(cls):
            continue
        build = cls.__init__

        @functools.wraps(build)
        def __init__(self, *args, _build=build, **kwargs):
            _build(self, *args, **kwargs)
            install(self)

        cls.__init__ = __init__
        cls._steering_vllm_installed = True


def install(engine) -> None:
    """Give ``engine`` (an ``LLMEngine`` or ``AsyncLLM``) per-request steering if its config asks for it; a
    steered engine without it refuses requests that choose vectors (they would get the global ones)."""
    from steering_vllm.engine.families import is_steered

    vllm_config = engine.vllm_config
    if not is_steered(vllm_config.model_config):
        return
    if per_request_options(vllm_config.additional_config) is None:
        _wrap_process_inputs(engine, refuse_choice)
        return
    engine.steering_sets = sets = load_sets(vllm_config.model_config, vllm_config.additional_config)
    front = SteeringFrontEnd(sets, engine, default_phase(vllm_config.additional_config))
    _wrap_process_inputs(engine, front.resolve)
    if front.is_async:  # AsyncLLM

        def abort_output(request_ids):
            engine.output_processor.abort_requests(request_ids, internal=True)

        wrap_async_client(engine.engine_core, front.admission, abort_output)
    else:
        wrap_sync_client(engine.engine_core, front.admission)
    engine.steering_front_end = front


def _wrap_process_inputs(engine, then) -> None:
    """Pass every request ``engine``'s input processor makes through ``then`` (which may raise ValueError)."""
    processor = engine.input_processor
    process_inputs, process_inputs_async = processor.process_inputs, processor.process_inputs_async

    def processed(*args, **kwargs):
        return then(process_inputs(*args, **kwargs))

    async def processed_async(*args, **kwargs):
        return then(await process_inputs_async(*args, **kwargs))

    processor.process_inputs, processor.process_inputs_async = processed, processed_async


def refuse_choice(request):
    """A steered engine without per-request sets: refuse a request that chooses vectors, before scheduling."""
    params = request.sampling_params
    extra_args = (params.extra_args if params is not None else None) or {}
    asked = [key for key in STEERING_KEYS if key in extra_args]
    if asked:
        choice = {key: extra_args[key] for key in asked}
        raise SteeringChoiceError(
            f"steering choice {choice} needs per-request steering, and this server serves one set of vectors to "
            f"every request: {START_WITH_SETS}"
        )
    return request


def load_sets(model_config, additional_config) -> SteeringSets:
    """The default set and the named sets of ``additional_config``, checked against the model."""
    text_config = model_config.hf_text_config
    num_layers = text_config.num_hidden_layers
    paths, max_configs = per_request_options(additional_config)
    sets = SteeringSets(num_layers, text_config.hidden_size, max_configs, model=model_config.model)
    path, scale = steering_options(additional_config)
    if path is not None:
        default = SteeringVectors.load(path, num_layers=num_layers)
        sets.put(None, default.scale(scale) if scale != 1.0 else default)
    for name, path in paths.items():
        try:
            sets.put(name, SteeringVectors.load(path, num_layers=num_layers))
        except SteeringVectorsError as e:
            raise SteeringVectorsError(f"steering set {name!r}: {e}") from None
    return sets


class SteeringFrontEnd:
    def __init__(self, sets: SteeringSets, engine, phase: str = "all"):
        self.sets = sets
        self.engine = engine
        self.phase = phase  # for requests that do not choose one
        from vllm.v1.engine.async_llm import AsyncLLM

        self.is_async = isinstance(engine, AsyncLLM)
        self.known: OrderedDict[str, Configuration] = OrderedDict()  # recently resolved, by hash
        self.admission = Admission(sets, self.configuration_of)

    # ---- resolution (process_inputs) ---------------------------------------------------------------------

    def resolve(self, request):
        params = request.sampling_params
        if params is None:  # pooling requests are not steered per request
            return request
        try:
            configuration = resolve_pinned(self.sets, params.extra_args)
            phase = parse_phase(params.extra_args, self.phase)
        except ValueError as e:
            raise SteeringChoiceError(str(e)) from None
        if not self.is_async:  # AsyncLLM waits for a row when the client adds the request; LLM refuses it now
            self.admission.refuse_when_full(configuration)
        phase = "all" if configuration.is_zero else phase  # unsteered at every position either way
        params.extra_args = {**(params.extra_args or {}), CONFIG_KEY: configuration.content_hash, PHASE_KEY: phase}
        prompt_length = _prompt_length(request)
        request.cache_salt = salted(configuration.content_hash, request.cache_salt, phase, prompt_length)
        self.known[configuration.content_hash] = configuration
        self.known.move_to_end(configuration.content_hash)
        if len(self.known) > 4 * self.sets.max_configs:
            self.known.popitem(last=False)
        return request

    def configuration_of(self, request) -> Configuration | None:
        params = request.sampling_params
        content_hash = (params.extra_args or {}).get(CONFIG_KEY) if params is not None else None
        if content_hash is None:
            if params is None:
                return None
            self.resolve(request)  # an EngineCoreRequest built by the caller, not through process_inputs
            content_hash = params.extra_args[CONFIG_KEY]
        if content_hash == self.sets.zero.content_hash:
            return self.sets.zero
        configuration = self.known.get(content_hash) or self.sets.live_configuration(content_hash)
        if configuration is None:  # resolved long ago (many others since): resolve again, it must still agree
            configuration = self.sets.resolve(params.extra_args)
            if configuration.content_hash != content_hash:
                raise RuntimeError(
                    f"steering: request {request.request_id}'s set changed while it was being admitted; send it again"
                )
        return configuration


def _prompt_length(request) -> int:
    """The number of prompt positions of an ``EngineCoreRequest`` (token ids or embeddings)."""
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    return int(request.prompt_embeds.shape[0]) if request.prompt_embeds is not None else 0
