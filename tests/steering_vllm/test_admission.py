"""The admission core and its two shells against a fake engine-core client, without an engine: a configuration
reaches every worker before its first request and is sent once; requests that finish, are aborted or fail to be
added stop counting; the workers forget what no live request uses; with every row live ``AsyncLLM``'s requests
wait and ``LLM``'s are refused. The fake client records its calls in order."""

import asyncio
from types import SimpleNamespace

import pytest
import torch

from steering_vllm import SteeringVectors
from steering_vllm.per_request.admission import FORGET, STORE, Admission, wrap_async_client, wrap_sync_client
from steering_vllm.per_request.sets import SteeringRowsExhausted, SteeringSets

L, D = 3, 8
WAIT = 5.0  # seconds a test waits for something that should happen at once


class FakeClient:
    """An engine-core client whose workers keep what they are sent, as ``SteeringWorkerExtension`` does, and whose
    engine refuses a steered request whose configuration no worker holds, as the row assigner does. ``calls``:
    ("store", hash), ("forget", [hashes]), ("add", id), ("abort", [ids]), ("outputs", [finished ids])."""

    def __init__(self):
        self.calls = []
        self.workers = {}  # content hash -> [L, d] vectors
        self.finished = []  # request ids the next get_output reports finished
        self.fail_add = set()  # request ids whose add raises
        self.fail_store = False
        self.add_gate = None  # an asyncio.Event the async add waits for, when set

    def _rpc(self, method, args):
        if method == STORE:
            if self.fail_store:
                raise RuntimeError("a worker died")
            content_hash, payload = args
            self.workers[content_hash] = SteeringVectors.from_bytes(payload).to_tensor()
            self.calls.append(("store", content_hash))
        else:
            assert method == FORGET
            (hashes,) = args
            for content_hash in hashes:
                del self.workers[content_hash]
            self.calls.append(("forget", list(hashes)))

    def _add(self, request):
        if request.request_id in self.fail_add:
            raise RuntimeError("the engine core is gone")
        configuration = request.configuration
        if configuration is not None and not configuration.is_zero:
            assert configuration.content_hash in self.workers, f"{request.request_id}: configuration never sent"
            assert torch.equal(self.workers[configuration.content_hash], configuration.table)
        self.calls.append(("add", request.request_id))

    def _outputs(self):
        finished, self.finished = self.finished, []
        self.calls.append(("outputs", finished))
        return SimpleNamespace(outputs=[SimpleNamespace(request_id=r, finished=True) for r in finished])

    # LLMEngine's client
    def collective_rpc(self, method, args=()):
        self._rpc(method, args)

    def add_request(self, request):
        self._add(request)

    def abort_requests(self, request_ids):
        self.calls.append(("abort", list(request_ids)))

    def get_output(self):
        return self._outputs()

    # AsyncLLM's client: every call yields to the event loop, as a call to the engine-core process does
    async def collective_rpc_async(self, method, args=()):
        await asyncio.sleep(0)
        self._rpc(method, args)

    async def add_request_async(self, request):
        if self.add_gate is not None:
            await self.add_gate.wait()
        await asyncio.sleep(0)
        self._add(request)

    async def abort_requests_async(self, request_ids):
        await asyncio.sleep(0)
        self.abort_requests(request_ids)

    async def get_output_async(self):
        await asyncio.sleep(0)
        return self._outputs()


def _vectors():
    return SteeringVectors.from_tensor(torch.randn(L, D))


@pytest.fixture
def sets():
    sets = SteeringSets(L, D, max_configs=2)
    for name in "abc":
        sets.put(name, _vectors())
    return sets


def _request(request_id, configuration):
    return SimpleNamespace(request_id=request_id, configuration=configuration)


class Front:
    """A fake client wrapped by the sync or the async shell, driven the same way (one test covers both)."""

    def __init__(self, sets, flavour):
        self.flavour = flavour
        self.client = FakeClient()
        self.admission = Admission(sets, lambda request: request.configuration)
        self.aborted_outputs = []  # what the async shell dropped from AsyncLLM's output processor
        if flavour == "sync":
            wrap_sync_client(self.client, self.admission)
        else:
            wrap_async_client(self.client, self.admission, self.aborted_outputs.extend)

    def _call(self, name, *args):
        if self.flavour == "sync":
            return getattr(self.client, name)(*args)
        return asyncio.run(asyncio.wait_for(getattr(self.client, f"{name}_async")(*args), WAIT))  # fail, not hang

    def add(self, request_id, configuration):
        self._call("add_request", _request(request_id, configuration))

    def finish(self, *request_ids):
        self.client.finished = list(request_ids)
        self._call("get_output")

    def abort(self, *request_ids):
        self._call("abort_requests", list(request_ids))

    @property
    def calls(self):
        return self.client.calls

    def stored(self):
        return [call[1] for call in self.calls if call[0] == "store"]


@pytest.fixture(params=["sync", "async"])
def front(request, sets):
    return Front(sets, request.param)


def test_a_new_configuration_reaches_every_worker_before_its_first_request(sets, front):
    a, zero = sets.resolve({"steering": "a"}), sets.resolve({"steering": "none"})
    front.add("r1", a)
    assert front.calls == [("store", a.content_hash), ("add", "r1")]
    front.add("r2", a)  # the workers hold it: not sent again
    front.add("r3", zero)  # unsteered: row 0, nothing to send
    front.add("r4", None)  # not steered per request (a pooling request)
    assert front.calls[2:] == [("add", "r2"), ("add", "r3"), ("add", "r4")]
    assert sets.live_requests() == 3 and sets.status()["live_configurations"] == {a.content_hash: 2}


def test_a_configuration_whose_first_requests_come_together_is_sent_once(sets):
    front = Front(sets, "async")
    a, b = sets.resolve({"steering": "a"}), sets.resolve({"steering": "b"})
    requests = [_request("r1", a), _request("r2", a), _request("r3", b), _request("r4", a)]

    async def together():
        await asyncio.gather(*(front.client.add_request_async(request) for request in requests))

    asyncio.run(together())
    assert sorted(front.stored()) == sorted([a.content_hash, b.content_hash])  # each once
    assert sorted(call[1] for call in front.calls if call[0] == "add") == ["r1", "r2", "r3", "r4"]
    assert sets.live_requests() == 4  # (and each add found its configuration on the workers: FakeClient._add)


def test_finished_and_aborted_requests_stop_counting(sets, front):
    a, b = sets.resolve({"steering": "a"}), sets.resolve({"steering": "b"})
    front.add("r1", a)
    front.add("r2", b)
    front.add("r3", b)
    front.finish("r1", "r2")
    assert sets.live_requests() == 1
    assert sets.live_configuration(a.content_hash) is None and sets.live_configuration(b.content_hash) is b
    front.abort("r3")
    assert front.calls[-1] == ("abort", ["r3"])
    assert sets.live_requests() == 0 and sets.status()["live_configurations"] == {}


def test_a_request_that_fails_to_be_added_stops_counting(sets, front):
    a = sets.resolve({"steering": "a"})
    front.client.fail_add = {"r1"}
    with pytest.raises(RuntimeError, match="engine core is gone"):
        front.add("r1", a)
    assert sets.live_requests() == 0 and sets.live_configuration(a.content_hash) is None
    assert front.aborted_outputs == []  # vLLM's own add failed: AsyncLLM handles it as without steering
    front.add("r2", a)  # the workers were sent a: not sent again
    assert front.stored() == [a.content_hash] and front.calls[-1] == ("add", "r2")


def test_a_configuration_that_could_not_be_sent_drops_its_request(sets, front):
    b = sets.resolve({"steering": "b"})
    front.client.fail_store = True
    with pytest.raises(RuntimeError, match="a worker died"):
        front.add("r1", b)
    assert sets.live_requests() == 0 and b.content_hash not in sets.stored and ("add", "r1") not in front.calls
    assert front.aborted_outputs == ([] if front.flavour == "sync" else ["r1"])  # AsyncLLM's output processor
    front.client.fail_store = False
    front.add("r2", b)  # not recorded as stored: sent now
    assert front.calls[-2:] == [("store", b.content_hash), ("add", "r2")]


def test_the_workers_forget_stored_configurations_no_live_request_uses(sets, front):
    """max_configs 2: the workers keep at most 4 configurations, oldest forgotten first; a live one never."""
    held = sets.resolve({"steering": "a"})
    front.add("held", held)
    others = [sets.resolve({"steering": "b", "steering_scale": 1.0 + i}) for i in range(5)]
    for i, configuration in enumerate(others):
        front.add(f"r{i}", configuration)
        front.finish(f"r{i}")
    forgets = [(i, call[1]) for i, call in enumerate(front.calls) if call[0] == "forget"]
    assert [hashes for _, hashes in forgets] == [[others[0].content_hash], [others[1].content_hash]]
    for i, _ in forgets:  # each right after the store that overfilled the workers, before that store's request
        assert front.calls[i - 1][0] == "store" and front.calls[i + 1][0] == "add"
    assert list(front.client.workers) == [held.content_hash, *(c.content_hash for c in others[2:])]
    assert list(sets.stored) == list(front.client.workers)  # the books agree with the workers
    front.add("again", others[0])  # forgotten: sent again
    expected = [("store", others[0].content_hash), ("forget", [others[2].content_hash]), ("add", "again")]
    assert front.calls[-3:] == expected


def test_with_every_row_live_asyncs_new_configuration_waits_for_one_to_end(sets):
    front = Front(sets, "async")
    client = front.client
    a, b, c = (sets.resolve({"steering": name}) for name in "abc")

    async def scenario():
        for request in (_request("r1", a), _request("r2", a), _request("r3", b)):
            await client.add_request_async(request)
        waiting = asyncio.create_task(client.add_request_async(_request("r4", c)))
        await _settle()
        _assert_pending(waiting)
        assert c.content_hash not in client.workers
        await asyncio.wait_for(client.add_request_async(_request("r5", b)), WAIT)  # b is live: no wait
        client.finished = ["r1"]
        await client.get_output_async()  # a is still live (r2): no row is free
        await _settle()
        _assert_pending(waiting)
        await client.abort_requests_async(["r2"])  # a ends: its row is free
        await asyncio.wait_for(waiting, WAIT)

    asyncio.run(scenario())
    assert front.calls[-2:] == [("store", c.content_hash), ("add", "r4")]
    assert sets.status()["live_configurations"] == {b.content_hash: 2, c.content_hash: 1}


def test_asyncs_request_cancelled_while_it_waits_is_dropped(sets):
    front = Front(sets, "async")
    client = front.client
    a, b, c = (sets.resolve({"steering": name}) for name in "abc")

    async def scenario():
        await client.add_request_async(_request("r1", a))
        await client.add_request_async(_request("r2", b))
        waiting = asyncio.create_task(client.add_request_async(_request("r3", c)))
        await _settle()
        waiting.cancel()  # the HTTP client went away
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(scenario())
    assert front.aborted_outputs == ["r3"] and sets.live_requests() == 2
    assert ("add", "r3") not in front.calls and c.content_hash not in client.workers


def test_a_failed_add_frees_its_row_for_a_waiting_request(sets):
    """r1 takes the last row, then its add fails: r3, waiting for a row, goes on without another request ending."""
    front = Front(sets, "async")
    client = front.client
    a, b, c = (sets.resolve({"steering": name}) for name in "abc")

    async def scenario():
        await client.add_request_async(_request("r0", b))
        client.add_gate, client.fail_add = asyncio.Event(), {"r1"}
        failing = asyncio.create_task(client.add_request_async(_request("r1", a)))
        await _settle()
        waiting = asyncio.create_task(client.add_request_async(_request("r3", c)))
        await _settle()
        _assert_pending(failing)  # r1 is being added
        _assert_pending(waiting)  # r3 waits for a row
        client.add_gate.set()
        with pytest.raises(RuntimeError, match="engine core is gone"):
            await failing
        await asyncio.wait_for(waiting, WAIT)

    asyncio.run(scenario())
    assert front.calls[-2:] == [("store", c.content_hash), ("add", "r3")]


def test_with_every_row_live_syncs_new_configuration_is_refused(sets):
    front = Front(sets, "sync")
    a, b, c = (sets.resolve({"steering": name}) for name in "abc")
    front.add("r1", a)
    front.add("r2", b)
    with pytest.raises(SteeringRowsExhausted, match=r"all 2 \(max_steering_configs\) are taken"):
        front.admission.refuse_when_full(c)  # in process_inputs: before LLMEngine's output processor holds it
    front.admission.refuse_when_full(a)  # a live configuration, or none, needs no row of its own
    front.admission.refuse_when_full(sets.resolve({"steering": "none"}))
    calls = list(front.calls)
    with pytest.raises(SteeringRowsExhausted):  # a request that reaches the client all the same
        front.add("r3", c)
    assert front.calls == calls and sets.live_requests() == 2
    front.finish("r1")
    front.admission.refuse_when_full(c)
    front.add("r3", c)
    assert front.calls[-2:] == [("store", c.content_hash), ("add", "r3")]


def _assert_pending(task):
    """Fail (with what it returned or raised) if ``task`` ended; an exception left unread would only be logged."""
    if task.done():
        outcome = "cancelled" if task.cancelled() else repr(task.exception() or task.result())
        raise AssertionError(f"{task.get_coro().__qualname__} ended instead of waiting: {outcome}")


async def _settle():
    """Let every task that can run, run (each fake engine call yields once)."""
    for _ in range(20):
        await asyncio.sleep(0)
