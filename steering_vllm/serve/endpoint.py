"""``GET`` / ``PUT /v1/steering`` on ``vllm serve``: a vLLM endpoint plugin (entry point ``vllm.endpoint_plugins``).

vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them, so the routes exist only with
``VLLM_PLUGINS=steering_vllm`` (which also allows the general plugin of the same name, the steered models).
They live under ``/v1``, so ``--api-key`` guards them like every other route.

- ``GET`` answers the engine's own record: the active vectors' hash, source, layers, norms, the time they
  were set, and the last swaps (``steering_vllm.engine.models``); the workers are asked, not a copy kept here.
- ``PUT`` swaps in place with ``update_steering_async`` (a swap lands between engine steps; requests keep
  running). The body is either safetensors bytes in our format (any content type but JSON), or JSON
  ``{"file": NAME}`` naming a file inside ``--steering-dir``. ``?scale=F`` multiplies the vectors.
  PUTs are serialised; any failure answers 4xx/5xx and leaves the previous vectors active.
- Every response carries ``x-steering-hash``: the vectors active when the request arrived.

With per-request sets (``--steering-sets`` / ``--max-steering-configs``):

- ``PUT /v1/steering/sets/{name}`` adds or replaces a set (same bodies, limits and errors as ``PUT
  /v1/steering``, which now replaces the default set); ``DELETE /v1/steering/sets/{name}`` removes one;
  ``GET /v1/steering`` lists the default and every set with hashes and norms, the live configurations and each
  worker's table rows (configuration, requests using it, hash read back). Running requests keep the
  vectors they were admitted with.
- A set is also chosen by its name in the OpenAI ``model`` field (as a LoRA adapter is): the body is
  rewritten to the base model with ``vllm_xargs.steering`` set; each set is listed in ``/v1/models``.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path, PurePath

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from steering_vllm.config import check_set_name
from steering_vllm.engine.families import is_steered
from steering_vllm.engine.scale_out import front_end_count, serves_one_rank_of_many
from steering_vllm.per_request.frontend import PINNED_CHOICE
from steering_vllm.per_request.sets import CHOICE_KEY, parse_choice
from steering_vllm.serve.hot_swap import (
    NO_SETS_MESSAGE,
    remove_steering,
    rpc_every_rank,
    steering_sets,
    update_steering_async,
)
from steering_vllm.vectors.steering_vectors import SteeringVectors, SteeringVectorsError

ROUTE = "/v1/steering"
SETS_ROUTE = ROUTE + "/sets/{name}"
HASH_HEADER = "x-steering-hash"
GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
MAX_JSON_BYTES = 64 * 1024


class HTTPProblem(Exception):
    """A request the endpoint refuses: becomes a JSON error response with this status."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status = status
        self.kind = kind


class SteeringEndpoint:
    """The entry point object: vLLM calls ``attach_router`` while building the app, then ``init_state``."""

    name = "steering_vllm"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.control: SteeringControl | None = None

    def attach_router(self, app: FastAPI) -> None:
        app.add_api_route(ROUTE, self.get, methods=["GET"], tags=["steering"])
        app.add_api_route(ROUTE, self.put, methods=["PUT"], tags=["steering"])
        app.add_api_route(SETS_ROUTE, self.put_set, methods=["PUT"], tags=["steering"])
        app.add_api_route(SETS_ROUTE, self.delete_set, methods=["DELETE"], tags=["steering"])
        app.add_middleware(HashHeaderMiddleware, endpoint=self)
        app.add_middleware(SetAsModelMiddleware, endpoint=self)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:  # the render-only server has no engine
            return
        self.control = SteeringControl(engine_client, getattr(args, "steering_dir", None))
        if self.control.steered:
            await self.control.status()
        serving_models = getattr(state, "openai_serving_models", None)
        if self.control.sets is not None and serving_models is not None:
            self.control.base_model_name = serving_models.base_model_paths[0].name
            self.control.serving_models = serving_models
            list_sets_in_models(serving_models, self.control.sets)
        state.steering = self.control

    async def get(self, request: Request) -> JSONResponse:
        """The active steering vectors: content hash, source, layers, per-layer norms, when set, last swaps."""
        return await _answer(lambda: self._control().status())

    async def put(self, request: Request) -> JSONResponse:
        """Swap the steering vectors in place: safetensors bytes in the body, or JSON {"file": NAME}."""
        return await _answer(lambda: self._control().put(request))

    async def put_set(self, name: str, request: Request) -> JSONResponse:
        """Add or replace steering set ``name``: safetensors bytes in the body, or JSON {"file": NAME}."""
        return await _answer(lambda: self._control().put(request, set_name=name))

    async def delete_set(self, name: str, request: Request) -> JSONResponse:
        """Remove steering set ``name``; requests already running with it keep their vectors."""
        return await _answer(lambda: self._control().delete_set(name))

    def _control(self) -> SteeringControl:
        if self.control is None:
            raise HTTPProblem(503, "steering endpoint: no engine behind this server", "ServiceUnavailableError")
        if not self.control.steered:
            raise HTTPProblem(409, self.control.not_steered_message(), "ConflictError")
        return self.control


class SteeringControl:
    """The engine's steering, as the HTTP routes see it."""

    def __init__(self, engine, steering_dir: str | None):
        self.engine = engine
        self.model_config = engine.vllm_config.model_config
        self.steered = is_steered(self.model_config)
        self.steering_dir = Path(steering_dir).resolve() if steering_dir else None
        text_config = self.model_config.hf_text_config
        self.num_layers = text_config.num_hidden_layers
        # Our file is 4 bytes per value plus a small header; readers also take float64, so allow twice that.
        self.max_body_bytes = 8 * text_config.num_hidden_layers * text_config.hidden_size + (1 << 20)
        self.active_hash: str | None = None
        self.sets = steering_sets(engine)
        self.base_model_name = self.model_config.model
        self.serving_models = None  # the server's, once it has them: served names and LoRA adapters
        parallel_config = engine.vllm_config.parallel_config
        self.shares_engine = front_end_count(parallel_config) > 1
        self.one_rank_of_many = serves_one_rank_of_many(parallel_config)
        self._lock = asyncio.Lock()

    async def current_hash(self, scope) -> str | None:
        """The active vectors' hash for a response's header. With several API servers a swap may have come
        through another one, so a generation request asks the workers (one cheap RPC)."""
        generation = scope["method"] == "POST" and scope["path"] in GENERATION_ROUTES
        if self.steered and self.shares_engine and self.sets is None and generation:
            self.active_hash = (await rpc_every_rank(self.engine, "steering_hash"))[0]
        return self.active_hash

    def not_steered_message(self) -> str:
        architectures = getattr(self.model_config.hf_config, "architectures", None)
        return f"model {self.model_config.model} ({architectures}) is not served with steering"

    async def status(self) -> dict:
        if self.sets is not None:  # each request's own configuration is in its x-steering-hash
            # the front end's books, and each worker's table rows (every rank of every data-parallel engine)
            return {**self.sets.status(), "workers": await rpc_every_rank(self.engine, "steering_rows_status")}
        statuses = await rpc_every_rank(self.engine, "steering_status")
        hashes = {s["content_hash"] for s in statuses}
        if len(hashes) != 1:
            raise HTTPProblem(500, f"workers disagree on the active vectors: {sorted(hashes)}", "InternalServerError")
        self.active_hash = statuses[0]["content_hash"]
        return statuses[0]

    async def put(self, request: Request, set_name: str | None = None) -> dict:
        if self.one_rank_of_many:
            raise HTTPProblem(
                409,
                "this server is one data-parallel rank behind an external load balancer: a swap here would reach "
                "this rank only. Restart every rank with the new --steering-vectors, or serve with internal load "
                "balancing (--data-parallel-size N --api-server-count 1)",
                "ConflictError",
            )
        if set_name is not None:
            self._check_set_name(set_name)
            if set_name in self._model_names():
                raise HTTPProblem(409, f"{set_name!r} already names a served model or LoRA adapter: a set of that "
                                  "name would take the requests that name it in `model`; choose another name",
                                  "ConflictError")  # fmt: skip
        scale = _scale(request.query_params.get("scale"))
        if _content_type(request) == "application/json":
            vectors = await self._from_file(await _read_body(request, MAX_JSON_BYTES), scale)
        else:
            vectors = _from_body(await _read_body(request, self.max_body_bytes), scale)
        async with self._lock:
            try:
                await update_steering_async(self.engine, vectors, name=set_name)
            except SteeringVectorsError as e:
                raise HTTPProblem(400, str(e)) from None
            except Exception as e:  # the engine failed the swap: say so, and report what is active now
                raise HTTPProblem(500, f"swap failed: {type(e).__name__}: {e}", "InternalServerError") from None
            return await self.status()

    async def delete_set(self, name: str) -> dict:
        self._check_set_name(name)
        async with self._lock:
            try:
                remove_steering(self.engine, name)
            except KeyError as e:
                raise HTTPProblem(404, str(e.args[0]), "NotFoundError") from None
            return await self.status()

    def _model_names(self) -> set[str]:
        """The names a request's ``model`` can already mean: the served names and any LoRA adapter."""
        if self.serving_models is None:
            return {self.base_model_name}
        names = {path.name for path in self.serving_models.base_model_paths}
        return names | set(getattr(self.serving_models, "lora_requests", {}))

    def _check_set_name(self, name: str) -> None:
        if self.sets is None:
            raise HTTPProblem(409, NO_SETS_MESSAGE, "ConflictError")
        try:
            check_set_name(name)
        except ValueError as e:
            raise HTTPProblem(400, str(e)) from None

    async def _from_file(self, body: bytes, scale: float | None) -> SteeringVectors:
        try:
            spec = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPProblem(400, f"request body is not valid JSON ({e})") from None
        except RecursionError:
            raise HTTPProblem(400, "request body is JSON nested too deeply") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
            raise HTTPProblem(400, 'a JSON body must be {"file": NAME}, NAME a file in the server\'s --steering-dir')
        if set(spec) != {"file"}:
            raise HTTPProblem(400, f'unknown key(s) {sorted(set(spec) - {"file"})}; a JSON body is {{"file": NAME}}')
        name = spec["file"]
        path = self.allowed_file(name)
        try:
            vectors = await asyncio.to_thread(SteeringVectors.load, path, self.num_layers)
        except SteeringVectorsError as e:
            raise HTTPProblem(400, str(e).replace(str(path), name)) from None
        vectors.source = name
        return _scaled(vectors, scale)

    def allowed_file(self, name: str) -> Path:
        if self.steering_dir is None:
            raise HTTPProblem(
                403, "loading vectors by file name is off: start the server with --steering-dir DIR", "ForbiddenError"
            )
        return resolve_inside(self.steering_dir, name)


def resolve_inside(directory: Path, name: str) -> Path:
    """``name`` resolved inside ``directory`` (itself resolved); refuses absolute names, ``..``, links out."""
    if not name or PurePath(name).is_absolute() or ".." in PurePath(name).parts or "\\" in name:
        raise HTTPProblem(403, f"{name!r}: give a relative name inside the steering directory", "ForbiddenError")
    path = (directory / name).resolve()
    if not path.is_relative_to(directory):
        raise HTTPProblem(403, f"{name!r} resolves outside the steering directory", "ForbiddenError")
    if not path.exists():
        raise HTTPProblem(404, f"{name!r}: no such file in the steering directory", "NotFoundError")
    return path


class HashHeaderMiddleware:
    """Adds ``x-steering-hash`` (the vectors active when the request arrived) to every HTTP response."""

    def __init__(self, app, endpoint: SteeringEndpoint):
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope, receive, send):
        control = self.endpoint.control
        active = await control.current_hash(scope) if control is not None and scope["type"] == "http" else None
        if scope["type"] != "http" or active is None:
            return await self.app(scope, receive, send)
        return await self.app(scope, receive, _with_header(send, (HASH_HEADER.encode(), active.encode())))


class SetAsModelMiddleware:
    """Per-request sets on the OpenAI routes. A completion naming a steering set in ``model`` is served by the
    base model with that set, the way vLLM serves a LoRA adapter named there: the JSON body is rewritten to
    the base model's name with ``vllm_xargs.steering`` set. The choice is resolved on arrival, so a bad one
    is answered 400 at once, and the response's ``x-steering-hash`` is the configuration it resolved to."""

    def __init__(self, app, endpoint: SteeringEndpoint):
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope, receive, send):
        control = self.endpoint.control
        sets = control.sets if control is not None else None
        generation = scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATION_ROUTES
        if sets is None or not generation:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        pin: dict = {}
        try:
            rewritten, xargs = _with_set_from_model(body, sets, control.base_model_name)
            if xargs is not None:
                pin = {"choice": parse_choice(xargs), "configuration": sets.resolve(xargs)}
        except HTTPProblem as e:
            return await _problem(e)(scope, _replay([], receive), send)
        except ValueError as e:
            return await _problem(HTTPProblem(400, str(e)))(scope, _replay([], receive), send)
        if rewritten is not body:
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(rewritten)).encode())]}
        token = PINNED_CHOICE.set(pin)  # every prompt of this request is served the configuration resolved here
        try:
            return await self.app(
                scope,
                _replay([{"type": "http.request", "body": rewritten, "more_body": False}], receive),
                _with_pinned_hash(send, pin),
            )
        finally:
            PINNED_CHOICE.reset(token)


def _with_set_from_model(body: bytes, sets, base_name: str) -> tuple[bytes, dict | None]:
    """(``body`` with a set named in ``model`` moved into ``vllm_xargs``, the request's ``vllm_xargs``); the
    body unchanged (and None) when it is not a JSON object vLLM would accept."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return body, None  # vLLM answers malformed JSON itself
    xargs = request.get("vllm_xargs") if isinstance(request, dict) else None
    if not isinstance(request, dict) or not isinstance(xargs or {}, dict):
        return body, None
    xargs = dict(xargs or {})
    name = request.get("model")
    if not isinstance(name, str) or name not in sets.sets:
        return body, xargs
    if CHOICE_KEY in xargs and xargs[CHOICE_KEY] != name:
        raise HTTPProblem(400, f"model names steering set {name!r} but vllm_xargs.steering is {xargs[CHOICE_KEY]!r}")
    xargs[CHOICE_KEY] = name
    return json.dumps({**request, "model": base_name, "vllm_xargs": xargs}).encode(), xargs


def _with_pinned_hash(send, pin: dict):
    """``send`` adding x-steering-hash: the configuration the request's prompts were pinned to, if any."""

    async def send_with_hash(message):
        if message["type"] == "http.response.start" and "configuration" in pin:
            header = (HASH_HEADER.encode(), pin["configuration"].content_hash.encode())
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return send_with_hash


def _with_header(send, header: tuple[bytes, bytes]):
    async def send_with_header(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return send_with_header


def _replay(messages, receive):
    """``receive`` with ``messages`` (already read from it) given back first; then the client's own messages,
    so a handler that listens for the disconnect (vLLM's do) waits for the real one."""
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def list_sets_in_models(serving_models, sets) -> None:
    """Make ``/v1/models`` list each steering set after the base model (and any LoRA adapters)."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

    show = serving_models.show_available_models
    base = serving_models.base_model_paths[0].name

    async def show_available_models():
        models = await show()
        for name, vectors in sorted(sets.sets.items()):
            models.data.append(ModelCard(id=name, root=vectors.source, parent=base, permission=[ModelPermission()]))
        return models

    serving_models.show_available_models = show_available_models


def _problem(e: HTTPProblem) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": str(e), "type": e.kind, "param": None, "code": e.status}}, status_code=e.status
    )


async def _answer(action) -> JSONResponse:
    try:
        return JSONResponse(await action())
    except HTTPProblem as e:
        return _problem(e)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, f"request body of {declared} bytes exceeds this model's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, f"request body exceeds this model's limit of {limit} bytes")
        chunks.append(chunk)
    if size == 0:
        raise HTTPProblem(400, 'empty body: send safetensors bytes, or JSON {"file": NAME} with a JSON content type')
    return b"".join(chunks)


def _from_body(body: bytes, scale: float | None) -> SteeringVectors:
    try:
        return _scaled(SteeringVectors.from_bytes(body, source="request body"), scale)
    except SteeringVectorsError as e:
        raise HTTPProblem(400, str(e)) from None


def _scale(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        scale = float(value)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale):
        raise HTTPProblem(400, f"scale must be a finite number, got {value!r}")
    return scale


def _scaled(vectors: SteeringVectors, scale: float | None) -> SteeringVectors:
    if scale is None or scale == 1.0:
        return vectors
    scaled = vectors.scale(scale)
    scaled.source = f"{vectors.source} (scale {scale:g})"
    return scaled
