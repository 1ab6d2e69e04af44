"""The server's scheduler and concurrency: interleaving, FIFO queue, 429, disconnects, shutdown.

Scheduler rules are tested with fake jobs; the HTTP paths drive the ASGI app directly (httpx's
ASGITransport, or hand-made ASGI messages to disconnect mid-stream) with the worker started by
hand, so a test can fill the queue before any decoding starts.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from speckv.decoding.builder import DecoderSpec
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.models import encode_prompt
from speckv.server import ServedModel, create_app
from speckv.server import app as app_module
from speckv.server.scheduler import QueueFull, Scheduler

CHAT = "/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "w5 w6 w7"}], "temperature": 0, "ignore_eos": True}


class FakeJob:
    def __init__(self, name: str, steps: int, fail_at: int | None = None):
        self.id, self.steps, self.fail_at = name, steps, fail_at
        self.started = self.done = 0
        self.ended: str | None = None
        self.cancelled = False

    def start(self):
        self.started += 1

    def step(self) -> bool:
        self.done += 1
        if self.done == self.fail_at:
            raise RuntimeError("boom")
        return self.done >= self.steps

    def abort(self, reason):
        self.ended = reason

    def fail(self, error):
        self.ended = f"error: {error}"


def test_round_robin_fifo_and_bounded_queue():
    counts = []
    scheduler = Scheduler(max_running=2, max_queue=1, on_queue=lambda r, w: counts.append((r, w)))
    a, b, c, d = FakeJob("a", 3), FakeJob("b", 1), FakeJob("c", 2), FakeJob("d", 1)
    for job in (a, b, c):
        scheduler.submit(job)
    with pytest.raises(QueueFull):
        scheduler.submit(d)
    while scheduler.running or scheduler.waiting:
        scheduler.tick()
    # a and b interleave; c takes b's slot after b finished, and then interleaves with a.
    assert [job for _, job in scheduler.trace] == ["a", "b", "a", "c", "a", "c"]
    assert counts[:3] == [(0, 1), (0, 2), (0, 3)] and counts[-1] == (0, 0)
    assert (a.started, b.started, c.started) == (1, 1, 1)


def test_the_busy_message_states_the_limits_not_a_passing_count():
    """A slot freed since the last tick still holds its next job in the queue: the counts of that
    moment (1 running, 2 waiting here; "3 running and 65 waiting" with 4 and 64) misstate the
    limits, so the 429 names the limits."""
    scheduler = Scheduler(max_running=2, max_queue=1)
    for job in (FakeJob("a", 1), FakeJob("b", 5), FakeJob("c", 5)):
        scheduler.submit(job)
    scheduler.tick()  # a and b start, a finishes: its slot waits for the next tick
    scheduler.submit(FakeJob("d", 5))
    assert (scheduler.running, scheduler.waiting) == (1, 2)
    with pytest.raises(QueueFull) as error:
        scheduler.submit(FakeJob("e", 1))
    assert str(error.value) == (
        "the server is busy: all 2 running slots and 1 queue places are taken "
        "(--max-running 2, --max-queue 1); retry later"
    )


def test_cancel_failure_and_shutdown():
    scheduler = Scheduler(max_running=1, max_queue=3)
    running, failing, waiting = FakeJob("r", 10), FakeJob("f", 5, fail_at=1), FakeJob("w", 1)
    for job in (running, failing, waiting):
        scheduler.submit(job)
    scheduler.tick()
    scheduler.cancel(waiting)  # waiting: leaves the queue at once
    assert waiting.ended == "abort" and scheduler.waiting == 1
    running.cancelled = True  # running: dropped at its next step, which never runs
    scheduler.tick()
    assert running.ended == "abort" and running.done == 1 and scheduler.running == 0
    scheduler.tick()  # the failing job gets the slot and raises: reported, removed
    assert failing.ended == "error: boom" and scheduler.running == 0
    left = FakeJob("l", 9)
    scheduler.submit(left)
    scheduler.stop()  # every job still there ends, saying why
    assert left.ended == "shutdown" and left.done == 0
    with pytest.raises(QueueFull):
        scheduler.submit(FakeJob("late", 1))


@pytest.fixture(scope="module")
def served(tiny_target, tiny_drafts) -> ServedModel:
    return ServedModel(DecoderSpec(tiny_target, tiny_drafts["close"], "fixed:3").build(), "tiny")


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def sample(app, name: str, labels: dict | None = None) -> float:
    labels = {**(labels or {}), "model_name": app.state.served.name}  # vLLM's label on every series
    return app.state.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("max_running", [2, 1])
def test_concurrent_requests_interleave_and_429(served, max_running):
    app = create_app(served, max_running=max_running, max_queue=2 - max_running)
    scheduler = app.state.scheduler

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = asyncio.create_task(client.post(CHAT, json=BODY | {"max_tokens": 12, "stream": True}))
            second = asyncio.create_task(client.post(CHAT, json=BODY | {"max_tokens": 12}))
            await wait_for(lambda: scheduler.waiting == 2)  # the worker has not started yet
            assert sample(app, "speckv:num_requests_waiting") == 2
            busy = await client.post(CHAT, json=BODY)
            assert busy.status_code == 429
            assert busy.json()["error"]["type"] == "rate_limit_error"
            scheduler.start()
            try:
                return await first, await second
            finally:
                await asyncio.to_thread(scheduler.stop)

    first, second = asyncio.run(scenario())
    assert first.status_code == second.status_code == 200
    assert sample(app, "speckv:request_failure_total", {"reason": "queue_full"}) == 1
    order = [job for _, job in scheduler.trace]
    ids = list(dict.fromkeys(order))
    assert len(ids) == 2
    end_of_first = min(len(order) - 1 - order[::-1].index(job) for job in ids)
    if max_running == 2:  # both advanced, alternately, before either finished
        assert set(order[: end_of_first + 1]) == set(ids)
        assert all(order[i] != order[i + 1] for i in range(end_of_first))
    else:  # one slot: strictly one after the other, in arrival order
        assert order == sorted(order, key=ids.index) and end_of_first == order.index(ids[1]) - 1


def asgi_scope(path: str) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
    }


async def call_and_disconnect(app, body: dict, after_chunks: int | None, after_s: float = 0.0) -> list:
    """POST `body`; the client disconnects after `after_chunks` body chunks, or after `after_s`."""
    gone = asyncio.Event()
    requested = False
    messages = []

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            if after_chunks is None:  # a timer: the server's disconnect polls cancel their receive()
                asyncio.get_running_loop().call_later(after_s, gone.set)
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)
        chunks = [m for m in messages if m["type"] == "http.response.body" and m.get("body")]
        if after_chunks is not None and len(chunks) >= after_chunks:
            gone.set()

    await app(asgi_scope(CHAT), receive, send)
    return messages


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(served, monkeypatch, stream):
    monkeypatch.setattr(app_module, "DISCONNECT_POLL_S", 0.02)
    app = create_app(served, max_running=1, max_queue=0, on_step=lambda job: time.sleep(0.005))
    scheduler = app.state.scheduler

    async def scenario():
        scheduler.start()
        try:
            body = BODY | {"max_tokens": 400, "stream": stream}
            # Streamed: gone after the role chunk and the first text; plain: gone after 0.1 s.
            await call_and_disconnect(app, body, 2 if stream else None, 0.1)
            await wait_for(lambda: scheduler.running == 0, timeout=2.0)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.post(CHAT, json=BODY | {"max_tokens": 3})
        finally:
            await asyncio.to_thread(scheduler.stop)

    after = asyncio.run(scenario())
    assert after.status_code == 200  # the one slot was free again
    assert sample(app, "speckv:request_failure_total", {"reason": "abort"}) == 1
    assert sample(app, "speckv:generation_tokens_total") < 400 + 3


def test_running_requests_share_target_passes_and_decode_as_alone(tiny_target, tiny_drafts):
    # A mix of drafters: every request's output must be its own greedy decode, batched or not.
    served = ServedModel(DecoderSpec(tiny_target, tiny_drafts["close"], "tree:4").build(), "tiny")
    app = create_app(served, max_running=4, max_queue=4, prompt_budget=8)
    prompts = ["w5 w6 w7", "w9", " ".join(f"w{3 + i % 40}" for i in range(30)), "w11 w12 w11 w12 w11"]

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            body = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
            calls = [
                asyncio.create_task(client.post("/v1/completions", json=body | {"prompt": p}))
                for p in prompts
            ]
            await wait_for(lambda: app.state.scheduler.waiting == len(prompts))  # all admitted at once
            app.state.scheduler.start()
            try:
                return await asyncio.gather(*calls)
            finally:
                await asyncio.to_thread(app.state.scheduler.stop)

    replies = asyncio.run(scenario())
    for prompt, reply in zip(prompts, replies, strict=True):
        ids = encode_prompt(tiny_target.tokenizer, prompt, raw=True)
        alone = SpeculativeDecoder(tiny_target, eos_token_ids=()).generate(ids, 10).token_ids
        assert reply.json()["choices"][0]["text"] == tiny_target.tokenizer.decode(
            alone, skip_special_tokens=True
        )
    passes = sample(app, "speckv:batch_size_count")
    sequences = sample(app, "speckv:batch_size_sum")
    assert passes > 0 and sequences / passes > 1.5  # requests were decoded together, not in turn


def test_a_request_whose_cleanup_fails_does_not_stop_the_server(served, monkeypatch, caplog):
    from speckv.decoding.engine import SequenceRun

    close = SequenceRun.close
    broken = []

    def close_once_broken(self):
        if not broken:
            broken.append(self)
            raise RuntimeError("a row that will not go back")
        close(self)

    monkeypatch.setattr(SequenceRun, "close", close_once_broken)
    app = create_app(served, max_running=2, max_queue=4)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            app.state.scheduler.start()
            try:
                body = {"prompt": "w5 w6", "max_tokens": 4, "temperature": 0}
                first = await client.post("/v1/completions", json=body)
                second = await client.post("/v1/completions", json=body)
                return first, second, app.state.scheduler.alive
            finally:
                await asyncio.to_thread(app.state.scheduler.stop)

    first, second, alive = asyncio.run(scenario())
    assert broken and first.status_code == 200 and second.status_code == 200 and alive
    assert "closing request" in caplog.text
