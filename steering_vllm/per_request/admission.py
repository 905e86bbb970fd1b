"""Admitting requests into an engine with per-request steering, once for ``LLMEngine`` and ``AsyncLLM``.

``Admission`` makes the decisions: may a request's configuration take a table row now, what the workers must be
sent before the request reaches them (its configuration, once, then any stored configuration no live request
uses any more), and which requests stopped counting. It does no I/O: ``worker_calls`` names the calls to make,
in order, and the two shells below make them through the engine-core client they wrap, ``LLMEngine``'s
(``collective_rpc``, blocking) or ``AsyncLLM``'s (``collective_rpc_async``, awaited). The shells differ only
where the two engines do: ``AsyncLLM`` waits for a row and sends under a lock; ``LLMEngine`` refuses a request
that finds every row taken before it is scheduled (``refuse_when_full``, from the front end's
``process_inputs`` hook: by the time the client sees the request, ``LLMEngine``'s output processor holds it).

Plain Python and asyncio, no vLLM import: tested with a fake client (tests/steering_vllm/test_admission.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from steering_vllm.per_request.sets import Configuration, SteeringRowsExhausted, SteeringSets

# The worker methods (``serve.worker.SteeringWorkerExtension``) the front end calls on every worker.
STORE = "steering_store_configuration"  # (content hash, safetensors bytes)
FORGET = "steering_forget_configurations"  # ([content hash, ...],)


class Admission:
    """Which requests are live with which configuration (kept by ``sets``), and what the workers must hold.

    ``configuration_of(request)`` is the configuration a request resolved to (None: not steered per request,
    e.g. a pooling request)."""

    def __init__(self, sets: SteeringSets, configuration_of: Callable[[object], Configuration | None]):
        self.sets = sets
        self.configuration_of = configuration_of
        self.freed = asyncio.Event()  # set whenever a configuration stops being live (binds to a loop on first wait)

    def refuse_when_full(self, configuration: Configuration) -> None:
        """Raise SteeringRowsExhausted if ``configuration`` needs a row and every row serves live requests."""
        if not self.sets.can_admit(configuration):
            raise SteeringRowsExhausted(
                f"this request needs a steering configuration of its own, and all {self.sets.max_configs} "
                f"(max_steering_configs) are taken by requests already added; raise max_steering_configs"
            )

    async def wait_for_room(self, configuration: Configuration) -> None:
        """Return once ``configuration`` may be admitted: at once, or when a live configuration ends (as vLLM's
        scheduler makes a LoRA request wait for an adapter slot)."""
        while not self.sets.can_admit(configuration):
            # No await between the check and clear(): a release cannot fall in between and be missed.
            self.freed.clear()
            await self.freed.wait()

    def admit(self, request_id: str, configuration: Configuration) -> bool:
        """Count ``request_id`` as live with ``configuration``; True if the workers may not hold it yet (then
        make ``worker_calls(configuration)`` before the request reaches the engine)."""
        return self.sets.admit(request_id, configuration)

    def worker_calls(self, configuration: Configuration) -> Iterator[tuple[str, tuple]]:
        """(method, args) for every worker, in order: store ``configuration`` unless the workers hold it, then
        forget what they no longer need. A generator: the books record the store only when the caller comes back
        for the next call, i.e. after the store call returned; if it raises, nothing is recorded."""
        if configuration.content_hash in self.sets.stored:  # sent meanwhile for another request
            return
        yield STORE, (configuration.content_hash, configuration.to_bytes())
        forget = self.sets.mark_stored(configuration)
        if forget:
            yield FORGET, (forget,)

    def release(self, request_ids) -> None:
        """Requests that ended (finished, aborted, or failed to be added) stop counting."""
        if self.sets.release(request_ids):
            self.freed.set()

    def release_finished(self, outputs) -> None:
        """Release the requests an ``EngineCoreOutputs`` reports finished."""
        self.release([output.request_id for output in outputs.outputs if output.finished])


def wrap_sync_client(client, admission: Admission) -> None:
    """Admit every request ``LLMEngine``'s engine-core ``client`` adds, release those that end."""
    add, abort, get_output = client.add_request, client.abort_requests, client.get_output

    def add_request(request):
        try:
            configuration = admission.configuration_of(request)
            if configuration is not None and admission.admit(request.request_id, configuration):
                for method, args in admission.worker_calls(configuration):
                    client.collective_rpc(method, args=args)
            add(request)
        except BaseException:
            admission.release([request.request_id])
            raise

    def abort_requests(request_ids):
        abort(request_ids)
        admission.release(request_ids)

    def get_output_():
        outputs = get_output()
        admission.release_finished(outputs)
        return outputs

    client.add_request, client.abort_requests, client.get_output = add_request, abort_requests, get_output_


def wrap_async_client(client, admission: Admission, abort_output: Callable[[list[str]], None]) -> None:
    """Admit every request ``AsyncLLM``'s engine-core ``client`` adds, release those that end.

    ``abort_output(request_ids)`` drops requests from ``AsyncLLM``'s output processor, which registers a request
    before the client sees it; when adding a single request raises, ``AsyncLLM.generate`` aborts nothing (it has
    no queue yet; vLLM 0.32). A request cancelled while it waits for a row, or whose configuration could not be
    sent, is dropped from it here; a failure of the engine core's own add is left to vLLM, as without steering."""
    add, abort, get_output = client.add_request_async, client.abort_requests_async, client.get_output_async
    sending = asyncio.Lock()  # one send per configuration, even when its first requests come together

    async def add_request_async(request):
        configuration = admission.configuration_of(request)
        if configuration is not None:
            try:
                await admission.wait_for_room(configuration)
                if admission.admit(request.request_id, configuration):  # no await since the wait: room is there
                    async with sending:
                        for method, args in admission.worker_calls(configuration):
                            await client.collective_rpc_async(method, args=args)
            except BaseException:
                admission.release([request.request_id])
                abort_output([request.request_id])
                raise
        try:
            await add(request)
        except BaseException:
            admission.release([request.request_id])
            raise

    async def abort_requests_async(request_ids):
        await abort(request_ids)
        admission.release(request_ids)

    async def get_output_async():
        outputs = await get_output()
        admission.release_finished(outputs)
        return outputs

    client.add_request_async = add_request_async
    client.abort_requests_async = abort_requests_async
    client.get_output_async = get_output_async
