"""Named steering sets and the configurations requests resolve to (the engine's front end; DESIGN.md §4).

A request chooses its vectors with ``SamplingParams.extra_args``: ``{"steering": "a"}``, ``{"steering": "a",
"steering_scale": 0.5}``, ``{"steering": ["a", "b"], "steering_scale": [1.0, -0.5]}`` (the weighted sum) or
``{"steering": "none"}``; without the key it gets the default set. ``"steering_phase"`` (``all``, ``prompt``,
``generation``) limits the vectors to the prompt's positions or the generated ones. The choice resolves to a
*configuration*: the [L, d] vectors it asks for, named by their content hash. Requests with equal vectors share a
configuration, whatever names they used, and the prefix cache is keyed by it (``salted``).

``SteeringSets`` also keeps the books the workers rely on: which requests are live with which configuration
(at most ``max_configs`` distinct non-zero ones at a time: one table row each) and which configurations the
workers hold. Everything here is plain Python and torch, so it is tested without an engine.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from steering_vllm.config import PHASE_KEY, check_phase, check_set_name
from steering_vllm.vectors.steering_vectors import SteeringVectors

CHOICE_KEY = "steering"
SCALE_KEY = "steering_scale"
CONFIG_KEY = "steering_config"  # set by the engine: the resolved configuration's content hash
NO_STEERING = "none"
SALT_PREFIX = "steering:"


@dataclass(frozen=True)
class Configuration:
    """The vectors a request is served with: [L, d] float32 and their content hash."""

    content_hash: str
    table: torch.Tensor
    is_zero: bool

    def to_bytes(self) -> bytes:
        return SteeringVectors.from_tensor(self.table, source=f"configuration {self.content_hash[:12]}").to_bytes()


RESOLVED_KEPT = 256  # choices whose resolved table the front end keeps (live requests hold their own)


class SteeringRowsExhausted(RuntimeError):
    """Every table row is taken by a configuration that live requests use."""


def parse_choice(extra_args: dict | None) -> tuple[tuple[str, float], ...] | None:
    """A request's choice as ((set name, scale), ...); () for ``none``, None for the default set.

    Raises ValueError naming what is wrong (the HTTP layer answers 400 with it)."""
    extra_args = extra_args or {}
    if CHOICE_KEY not in extra_args:
        if SCALE_KEY in extra_args:
            raise ValueError(f"{SCALE_KEY!r} was given without {CHOICE_KEY!r} (name the set(s) it scales)")
        return None
    names, scales = extra_args[CHOICE_KEY], extra_args.get(SCALE_KEY)
    if isinstance(names, str):
        if isinstance(scales, list):
            raise ValueError(f"{CHOICE_KEY!r} names one set, so {SCALE_KEY!r} must be one number, got {scales!r}")
        names, scales = [names], [1.0 if scales is None else scales]
    elif isinstance(names, list) and names:
        if scales is None:
            scales = [1.0] * len(names)
        if not isinstance(scales, list) or len(scales) != len(names):
            raise ValueError(
                f"{CHOICE_KEY!r} names {len(names)} sets, so {SCALE_KEY!r} must be a list of {len(names)} numbers, "
                f"got {scales!r}"
            )
    else:
        raise ValueError(f"{CHOICE_KEY!r} must be a set name or a non-empty list of names, got {names!r}")
    if len(set(map(repr, names))) != len(names):  # also bounds the weighted sum by the number of sets
        raise ValueError(f"{CHOICE_KEY!r} names a set more than once ({names!r}): give each set one scale")
    choice = []
    for name, scale in zip(names, scales, strict=True):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not _finite(scale):
            raise ValueError(f"{SCALE_KEY!r} for set {name!r} must be a finite number, got {scale!r}")
        if name == NO_STEERING and len(names) == 1:
            return ()
        check_set_name(name)
        choice.append((name, float(scale)))
    return tuple(choice)


def _finite(scale: int | float) -> bool:
    try:
        return math.isfinite(scale)
    except OverflowError:  # an int beyond float's range
        return False


def parse_phase(extra_args: dict | None, default: str = "all") -> str:
    """The positions a request is steered at: its ``steering_phase``, or ``default``."""
    return check_phase((extra_args or {}).get(PHASE_KEY, default), repr(PHASE_KEY))


def salted(content_hash: str, user_salt: str | None, phase: str = "all", prompt_length: int = 0) -> str:
    """The request's ``cache_salt``: its configuration, plus any salt the user gave (both key every block).

    A phase other than ``all`` adds the phase and the prompt's length: a block's keys and values depend on where
    the steered positions start, and vLLM caches generated tokens' blocks too, so a request whose prompt is
    another's prompt plus part of its generation must not reuse those blocks (their positions were steered as
    generation there, as prompt here). Requests of one phase share blocks when their prompts have one length
    (the n samples of a prompt, a repeated prompt)."""
    salt = SALT_PREFIX + content_hash
    if phase != "all":
        salt = f"{salt}:{phase}:{prompt_length}"
    return salt if user_salt is None else f"{salt}|{user_salt}"


class SteeringSets:
    """The sets an engine serves, what requests resolve to, and which configurations are live."""

    def __init__(self, num_layers: int, hidden_size: int, max_configs: int, model: str | None = None):
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.max_configs = max_configs
        self.model = model
        self.default = SteeringVectors.zeros(num_layers, hidden_size)
        self.sets: dict[str, SteeringVectors] = {}
        self.zero = self._configuration(torch.zeros(num_layers, hidden_size))
        self._resolved: OrderedDict[tuple | None, Configuration] = OrderedDict()  # the latest RESOLVED_KEPT
        self._configs: dict[str, Configuration] = {}  # hash -> configuration of a live request
        self._request_config: dict[str, str] = {}  # live request id -> configuration hash
        self._users: dict[str, int] = {}  # configuration hash -> live requests
        self.stored: OrderedDict[str, None] = OrderedDict()  # configurations the workers hold, oldest first

    # ---- the sets ------------------------------------------------------------------------------------------

    def put(self, name: str | None, vectors: SteeringVectors) -> None:
        """Add or replace set ``name`` (None: the default set). Live requests keep what they resolved to."""
        vectors.check_compatible(self.num_layers, self.hidden_size, self.model)
        if name is None:
            self.default = vectors
        else:
            self.sets[check_set_name(name)] = vectors
        self._resolved.clear()

    def remove(self, name: str) -> None:
        if name not in self.sets:
            raise KeyError(f"no steering set named {name!r}; sets: {sorted(self.sets)}")
        del self.sets[name]
        self._resolved.clear()

    # ---- requests ------------------------------------------------------------------------------------------

    def resolve(self, extra_args: dict | None) -> Configuration:
        """The configuration a request's ``extra_args`` ask for; ValueError for an unknown name or bad choice."""
        choice = parse_choice(extra_args)
        configuration = self._resolved.get(choice)
        if configuration is None:
            configuration = self._resolve(choice)
            self._resolved[choice] = configuration
            if len(self._resolved) > RESOLVED_KEPT:  # a table each: requests with ever new scales must not
                self._resolved.popitem(last=False)  # grow the front end's memory without bound
        else:
            self._resolved.move_to_end(choice)
        return configuration

    def _resolve(self, choice: tuple[tuple[str, float], ...] | None) -> Configuration:
        if choice is None:
            return self._configuration(self.default.to_tensor())
        table = torch.zeros(self.num_layers, self.hidden_size)
        for name, scale in choice:
            vectors = self.sets.get(name)
            if vectors is None:
                known = ", ".join(sorted(self.sets)) or "none loaded"
                raise ValueError(f"unknown steering set {name!r} (sets: {known})")
            table += scale * vectors.to_tensor()
        if not bool(torch.isfinite(table).all()):
            raise ValueError(f"steering choice {list(choice)} overflows float32")
        return self._configuration(table)

    def _configuration(self, table: torch.Tensor) -> Configuration:
        vectors = SteeringVectors.from_tensor(table)
        return Configuration(vectors.content_hash(), table, not bool(table.any()))

    def admit(self, request_id: str, configuration: Configuration) -> bool:
        """Count ``request_id`` as live with ``configuration``; True if the workers must be sent its vectors.

        Raises SteeringRowsExhausted when the configuration is new and ``max_configs`` others are live."""
        key = configuration.content_hash
        if not configuration.is_zero and key not in self._users and len(self._users) >= self.max_configs:
            raise SteeringRowsExhausted(
                f"all {self.max_configs} steering configurations are in use by running requests "
                f"(max_steering_configs={self.max_configs}); a request with a new one must wait or the limit be raised"
            )
        self._request_config[request_id] = key
        if not configuration.is_zero:
            self._users[key] = self._users.get(key, 0) + 1
            self._configs[key] = configuration
        if configuration.is_zero or key in self.stored:
            if key in self.stored:
                self.stored.move_to_end(key)
            return False
        return True

    def can_admit(self, configuration: Configuration) -> bool:
        key = configuration.content_hash
        return configuration.is_zero or key in self._users or len(self._users) < self.max_configs

    def mark_stored(self, configuration: Configuration) -> list[str]:
        """Record that the workers hold ``configuration``; returns stored ones they may now forget (not live),
        so that workers keep at most 2 x ``max_configs`` configurations."""
        self.stored[configuration.content_hash] = None
        forget = []
        for key in list(self.stored):
            if len(self.stored) - len(forget) <= 2 * self.max_configs:
                break
            if key not in self._users:
                forget.append(key)
        for key in forget:
            del self.stored[key]
        return forget

    def release(self, request_ids) -> bool:
        """Requests that ended (finished or aborted); True if a configuration stopped being live."""
        freed = False
        for request_id in request_ids:
            key = self._request_config.pop(request_id, None)
            if key is None or key not in self._users:
                continue
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
                del self._configs[key]
                freed = True
        return freed

    def live_configuration(self, content_hash: str) -> Configuration | None:
        return self._configs.get(content_hash)

    def live_requests(self) -> int:
        return len(self._request_config)

    # ---- what GET /v1/steering reports -----------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "default": self.default.summary(),
            "sets": {name: vectors.summary() for name, vectors in sorted(self.sets.items())},
            "max_steering_configs": self.max_configs,
            "live_configurations": {key: count for key, count in self._users.items()},
        }
