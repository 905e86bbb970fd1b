"""The hot-swap benchmark's bookkeeping: clients keep requests streaming, the stall after a swap waits for every
request running at the swap, and the recorded table puts idle swaps, swaps while serving and restarts side by side,
a row per shape, under a name of its own for another workload."""

import asyncio
from types import SimpleNamespace

from benchmarks import results
from benchmarks.bench_hot_swap import COLUMNS, Clients, arguments, record_table, summarize


class FakeEngine:
    """Streams one token per ``tick`` seconds per request, up to max_tokens; ``paused`` holds every stream."""

    def __init__(self, tick=0.005):
        self.tick, self.paused, self.started = tick, False, 0

    async def generate(self, prompt, params, request_id):
        self.started += 1
        tokens = []
        while len(tokens) < params.max_tokens:
            await asyncio.sleep(self.tick)
            if not self.paused:
                tokens.append(1)
                yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(tokens))])


def test_clients_keep_every_request_slot_streaming_and_the_stall_waits_for_all_of_them():
    async def scenario():
        engine = FakeEngine()
        clients = Clients(engine, count=3, prompt_len=4, max_tokens=5)
        await asyncio.wait_for(clients.all_streaming(), 120)  # the first request imports vllm
        assert len(clients.streamed) == 3 and all(clients.streamed.values())
        engine.paused = True
        before = dict(clients.streamed)
        waiting = asyncio.create_task(clients.streamed_again(before))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # paused: nobody streamed again
        engine.paused = False
        await asyncio.wait_for(waiting, 60)
        await asyncio.sleep(0.2)  # requests of 5 tokens end; their clients send new ones
        assert engine.started > 3 and len(clients.streamed) == 3
        await clients.stop()
        assert all(task.done() for task in clients.tasks)

    asyncio.run(scenario())


MEASURED = {"idle_llm": [0.004, 0.005, 0.006], "idle_async": [0.03, 0.025, 0.035], "restarts": [20.0, 22.0, 30.0],
            "busy": [{"swap": 0.05, "running": 8, "streamed_again": 1.0},
                     {"swap": 0.07, "running": 7, "streamed_again": 2.0},
                     {"swap": 0.04, "running": 8, "streamed_again": 3.0}]}  # fmt: skip


def test_the_table_reports_idle_serving_and_restart_side_by_side():
    rows = [summarize("qwen2.5-7b", 28, 3584, MEASURED), summarize("qwen2.5-14b", 48, 5120, MEASURED)]
    assert rows[0]["busy_ms"] == 50.0 and rows[0]["running"] == (7, 8) and rows[0]["restart_s"] == 22.0
    args, parser = arguments([])
    name, title = record_table(rows, args, parser)
    recorded = results.load(name)
    assert name == f"hot_swap_{results.device()}" and recorded["title"] == title
    assert [tuple(c) for c in recorded["columns"]] == COLUMNS and len(recorded["rows"]) == 2  # a row per shape
    assert recorded["rows"][0]["raw"]["idle_llm"] == MEASURED["idle_llm"]  # the samples stay in the file
    text = results.markdown(recorded)
    line = ("| Qwen2.5-7B | 28 | 3584 | 401,408 | 5.00 | 30.00 | 50.00 | 70.00 | 7-8 | 2000 | 22.0 | 4,400x "
            "| 440x |")  # fmt: skip
    assert line in text.splitlines() and "| Qwen2.5-14B | 48 | 5120 | 983,040 |" in text
    assert "3 swaps each" in title and "3 engine starts" in title and "8 clients streaming" in title


def test_a_run_with_another_workload_has_a_name_of_its_own():
    row = summarize("qwen2.5-7b", 28, 3584, MEASURED)
    for argv, suffix in (([], ""), (["--restarts", "10", "--swaps", "5"], ""), (["--clients", "16"], "_clients16"),
                         (["--shapes", "qwen2.5-7b", "--heads", "2"], "_shapesqwen2.5-7b_heads2")):  # fmt: skip
        args, parser = arguments(argv)
        assert record_table([row], args, parser)[0] == f"hot_swap_{results.device()}{suffix}"
