"""Math rewards for the RL trainer: Math-Verify on the last boxed answer, run in killable worker processes.

Math-Verify's own timeouts use ``signal.alarm``, which only works in a main thread, and without them a
pathological expression can hang sympy forever. So verification runs in a pool of spawned worker processes
(each calls the reward function in its main thread) and the parent enforces a wall-clock deadline per task:
a worker that misses it is SIGKILLed and replaced, and the task scores as a "timeout" instead of hanging the
trainer.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import logging
import math
import multiprocessing
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from math_verify import parse, verify

logger = logging.getLogger(__name__)

STATUSES = ("correct", "wrong", "no_boxed", "parse_failure", "gold_parse_failure", "timeout", "error")

# (reward for "correct", reward for anything else) per mode. "signed" is what the paper's code uses.
MODE_REWARDS = {"binary": (1.0, 0.0), "signed": (1.0, -1.0)}

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


# ---------------------------------------------------------------------------------------------------------------
# Answer extraction and the default reward function (runs inside a worker)
# ---------------------------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\boxed ... without braces like `\\boxed 5`, and \\fbox{...}) in text,
    braces balanced; None if absent or unclosed.

    Boxes nested inside a box belong to it: in `\\boxed{\\boxed{1}+1}` the last box is the outer one. An unclosed
    box runs to the end of the text (a truncated completion), so it is the last one and the answer is None.
    """
    position, content = 0, None
    while match := _BOX_COMMAND.search(text, position):
        box = _read_box_argument(text, match.end())
        if box is None:
            return None
        content, position = box
    return content


def _read_box_argument(text: str, start: int) -> tuple[str, int] | None:
    """(argument, end index) of the box command whose name ends at start; None if it has no complete argument."""
    rest = text[start:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        open_brace = start + len(rest) - len(stripped)
        close_brace = _matching_brace(text, open_brace)
        return None if close_brace is None else (text[open_brace + 1 : close_brace], close_brace + 1)
    bare = re.match(r"[^\s$]+", stripped)  # `\boxed 5`: the token after the command, up to a space or a `$`
    if bare is None:
        return None
    return bare.group(), start + len(rest) - len(stripped) + bare.end()


def _matching_brace(text: str, open_brace: int) -> int | None:
    """Index of the brace closing the one at open_brace; escaped braces (`\\{`, `\\}`) do not count."""
    depth, index = 0, open_brace
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return None


def _has_math(parsed: list) -> bool:
    """Whether Math-Verify parsed something: its lists end with the raw string, which alone means it could not."""
    return any(not isinstance(item, str) for item in parsed)


def _parse_gold(gold: str) -> list | None:
    """Math-Verify's reading of the gold answer, or None if it holds no parsable math.

    Dataset golds are usually bare LaTeX (`\\frac{1}{2}`, `2\\sqrt{3}`, `(1,2]`, `x = 5`). A plain parse of those
    silently reads a wrong value (2, 2, nothing, 5), so a gold without `$` or `\\boxed` is read as `$gold$` first
    and the plain parse is only the fallback (it catches text like `5 dollars`). An escaped dollar (`\\$18.90`,
    MATH's currency) is not a delimiter.
    """
    delimited = re.search(r"(?<!\\)\$", gold) is not None or "\\boxed" in gold
    for candidate in (gold,) if delimited else (f"${gold}$", gold):
        parsed = parse(candidate)
        if _has_math(parsed):
            return parsed
    return None


def _as_text(value: object) -> str:
    """Datasets hand over ints for numeric golds and sometimes None: score them rather than crash."""
    return "" if value is None else str(value)


def math_verify_reward(completion: str, gold: str) -> bool | str:
    """Default reward function (runs inside a worker): Math-Verify on the completion's last boxed answer.

    Returns True/False, or "gold_parse_failure" (checked first, so a broken gold is reported whatever the
    completion), "no_boxed", or "parse_failure" (the boxed content holds no parsable math).
    """
    gold_parsed = _parse_gold(_as_text(gold))
    if gold_parsed is None:
        return "gold_parse_failure"
    answer = last_boxed(_as_text(completion))
    if answer is None:
        return "no_boxed"
    answer_parsed = parse(f"\\boxed{{{answer}}}")
    if not _has_math(answer_parsed):
        return "parse_failure"
    return bool(verify(gold_parsed, answer_parsed))


# ---------------------------------------------------------------------------------------------------------------
# Worker process
# ---------------------------------------------------------------------------------------------------------------


def load_reward_fn(path: str) -> Callable[[str, str], object]:
    """The function named by an import path "module:function"; ValueError naming the path if there is none."""
    module_name, _, function_name = path.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"reward_fn {path!r} is not an import path of the form 'module:function'")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward_fn {path!r} cannot be imported: {error}") from error
    if not callable(function):
        raise ValueError(f"reward_fn {path!r} is not callable")
    return function


def _plain_result(result: object) -> bool | float | str:
    """The reward function's answer as a bool, float or str (what the parent interprets); TypeError otherwise."""
    if isinstance(result, bool | str):
        return result
    if isinstance(result, int | float):
        return float(result)
    raise TypeError(f"reward function returned {type(result).__name__}, expected bool, float or a status string")


def _serve(conn: Connection, reward_fn_path: str) -> None:
    """Worker loop: announce readiness, then answer (task_id, completion, gold) with ("ok" | "error", task_id, value).

    Ctrl-C goes to the whole process group; the parent decides when workers stop, so they ignore SIGINT.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reward_fn = load_reward_fn(reward_fn_path)
    conn.send(("ready", None, None))
    while True:
        try:
            task_id, completion, gold = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", task_id, _plain_result(reward_fn(completion, gold))))
        except Exception as error:
            conn.send(("error", task_id, f"{type(error).__name__}: {error}"))


# ---------------------------------------------------------------------------------------------------------------
# Pool (parent side)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    reward: float  # what the trainer uses
    status: str  # one of STATUSES


@contextlib.contextmanager
def _main_module_hidden():
    """Hides the parent's main module from ``multiprocessing`` while a worker is spawned: spawn would import it
    again in the worker (as ``__mp_main__``; for ``python -m trainer.rloo``: torch, the op and the learner, about
    2 s and a few hundred MB a worker), and ``_serve`` needs only this module and the reward function's."""
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class _Worker:
    """One worker process, its end of the pipe, and the task it is working on (with that task's deadline)."""

    def __init__(self, context: multiprocessing.context.SpawnContext, reward_fn_path: str):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_conn, reward_fn_path), daemon=True)
        with _main_module_hidden():
            self.process.start()
        child_conn.close()  # so that the parent reads EOF when the worker dies
        self.ready = False
        self.task: int | None = None
        self.deadline = math.inf

    def dispatch(self, task: int, completion: str, gold: str, timeout_s: float) -> None:
        self.conn.send((task, completion, gold))
        self.task, self.deadline = task, time.monotonic() + timeout_s

    def finish(self) -> int:
        """The task this worker was on; it is idle afterwards."""
        task, self.task, self.deadline = self.task, None, math.inf
        return task

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class RewardPool:
    """Scores completions against gold answers in worker processes, each task under a wall-clock timeout.

    reward_fn: import path "module:function" of a function (completion: str, gold: str) returning a bool, a float
    (used as the reward as is; status "correct" if it equals the mode's success reward, else "wrong"; NaN or inf
    is an "error") or a status string from STATUSES (reward: the success reward for "correct", else the failure
    reward; any other string is an "error").
    mode: "binary" (correct 1.0, anything else 0.0) or "signed" (correct +1.0, anything else -1.0).
    Workers are spawned (never forked: the trainer holds a vLLM engine and torch threads) at construction.
    """

    def __init__(
        self,
        reward_fn: str = "trainer.rewards:math_verify_reward",
        mode: str = "binary",
        workers: int = 2,
        timeout_s: float = 10.0,
    ):
        if mode not in MODE_REWARDS:
            raise ValueError(f"mode {mode!r} is not one of {sorted(MODE_REWARDS)}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        load_reward_fn(reward_fn)  # fail here, in the parent, rather than in every worker
        self.reward_fn = reward_fn
        self.mode = mode
        self.timeout_s = timeout_s
        self.success_reward, self.failure_reward = MODE_REWARDS[mode]
        self.counts: collections.Counter[str] = collections.Counter()
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        for _ in range(workers):
            self._workers.append(_Worker(self._context, reward_fn))

    # -- public API ------------------------------------------------------------------------------------------

    def score(self, completions: list[str], golds: list[str], modes: list[str] | None = None) -> list[Score]:
        """One Score per (completion, gold), in order; tasks run concurrently across the workers. ``modes``: each
        task's reward mode (a sweep's runs may differ); None: the pool's."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        modes = [self.mode] * len(completions) if modes is None else modes
        if len(modes) != len(completions) or not set(modes) <= set(MODE_REWARDS):
            raise ValueError(f"modes: expected {len(completions)} of {sorted(MODE_REWARDS)}, got {sorted(set(modes))}")
        self._task_modes = modes
        if not self._workers:
            raise RuntimeError("RewardPool is closed")
        self._replace_busy_workers()
        scores: list[Score | None] = [None] * len(completions)
        pending = collections.deque(range(len(completions)))
        while any(score is None for score in scores):
            self._dispatch(pending, completions, golds)
            for worker, message in self._wait_for_messages():
                self._handle(worker, message, scores)
            self._expire_overdue(scores)
        self.counts.update(score.status for score in scores)
        return scores

    def close(self) -> None:
        """Kill the workers. Idempotent."""
        workers, self._workers = getattr(self, "_workers", []), []
        for worker in workers:
            worker.kill()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown can take multiprocessing's pieces away first
            pass

    # -- the event loop of score() ---------------------------------------------------------------------------

    def _replace_busy_workers(self) -> None:
        """Workers still on a task of a score() call that was interrupted (an exception, Ctrl-C) would answer it
        as if it were a task of this call: replace them."""
        for worker in list(self._workers):
            if worker.task is not None:
                self._replace(worker)

    def _dispatch(self, pending: collections.deque[int], completions: list[str], golds: list[str]) -> None:
        for worker in self._workers:
            if pending and worker.ready and worker.task is None:
                task = pending.popleft()
                try:
                    worker.dispatch(task, completions[task], golds[task], self.timeout_s)
                except OSError:  # it died while idle: wait() reports it, and the task goes to another worker
                    pending.appendleft(task)

    def _wait_for_messages(self) -> list[tuple[_Worker, tuple | None]]:
        """Block until a worker answers or dies, or the nearest deadline; (worker, message or None if it died)."""
        by_conn = {worker.conn: worker for worker in self._workers}
        by_sentinel = {worker.process.sentinel: worker for worker in self._workers}
        nearest = min(worker.deadline for worker in self._workers)
        timeout = None if nearest == math.inf else max(0.0, nearest - time.monotonic())
        woken = {(by_conn.get(ready) or by_sentinel[ready]) for ready in wait([*by_conn, *by_sentinel], timeout)}
        return [(worker, self._receive(worker)) for worker in woken]

    @staticmethod
    def _receive(worker: _Worker) -> tuple | None:
        """The worker's next message; None if it died (a dead worker's pipe reads EOF once drained)."""
        try:
            return worker.conn.recv() if worker.conn.poll() else None
        except (EOFError, OSError):
            return None

    def _handle(self, worker: _Worker, message: tuple | None, scores: list[Score | None]) -> None:
        if message is None:
            self._on_worker_died(worker, scores)
        elif message[0] == "ready":
            worker.ready = True
        elif message[0] == "ok":
            task = worker.finish()
            scores[task] = self._interpret(message[2], self._task_modes[task])
        else:
            task = worker.finish()
            logger.warning("reward function %s raised on task %d: %s", self.reward_fn, task, message[2])
            scores[task] = self._failure(task, "error")

    def _on_worker_died(self, worker: _Worker, scores: list[Score | None]) -> None:
        worker.kill()  # reaps it: the pipe can report EOF before the process is reaped and has an exit code
        if not worker.ready:
            code = worker.process.exitcode
            raise RuntimeError(f"reward worker for {self.reward_fn} exited while starting (exit code {code})")
        if worker.task is not None:
            logger.warning("reward worker died (exit code %s) on task %d", worker.process.exitcode, worker.task)
            task = worker.finish()
            scores[task] = self._failure(task, "error")
        self._replace(worker)

    def _expire_overdue(self, scores: list[Score | None]) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.deadline <= now:
                logger.warning("reward task %d timed out after %.1f s; worker replaced", worker.task, self.timeout_s)
                task = worker.finish()
                scores[task] = self._failure(task, "timeout")
                self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._context, self.reward_fn)

    # -- results ---------------------------------------------------------------------------------------------

    def _failure(self, task: int, status: str) -> Score:
        return Score(MODE_REWARDS[self._task_modes[task]][1], status)

    @staticmethod
    def _interpret(result: bool | float | str, mode: str) -> Score:
        """Score of a reward function's answer under ``mode`` (see the class docstring for the rules)."""
        success, failure = MODE_REWARDS[mode]
        if isinstance(result, bool):
            result = "correct" if result else "wrong"
        if isinstance(result, str):
            status = result if result in STATUSES else "error"
            return Score(success if status == "correct" else failure, status)
        if not math.isfinite(result):
            return Score(failure, "error")
        return Score(result, "correct" if result == success else "wrong")
