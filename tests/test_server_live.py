"""A live `speckv serve` (uvicorn on a free loopback port, in a thread) used by the real clients:
the `openai` Python client, plain and streamed, and an HTTP client that hangs up mid-stream."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from speckv.decoding.builder import DecoderSpec
from speckv.server import ServedModel, create_app

PROMPT = "w5 w6 w7"


@pytest.fixture(scope="module")
def live(tiny_target, tiny_drafts):
    served = ServedModel(DecoderSpec(tiny_target, tiny_drafts["close"], "heuristic").build(), "tiny")
    app = create_app(served, max_running=2, max_queue=4)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    server.should_exit = True
    thread.join(20)
    sock.close()
    assert not thread.is_alive() and not app.state.scheduler.alive


@pytest.fixture(scope="module")
def client(live):
    url, _ = live
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_chat_plain_and_streamed(client):
    options = {"model": "tiny", "max_tokens": 16, "temperature": 0}
    messages = [{"role": "user", "content": PROMPT}]
    plain = client.chat.completions.create(messages=messages, **options)
    text = plain.choices[0].message.content
    assert text and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert plain.model_extra["speckv"]["controller"].startswith("heuristic")
    chunks = list(
        client.chat.completions.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **options
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_openai_client_completions_and_errors(client):
    options = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stop": ["w9 w"]}
    plain = client.completions.create(**options)
    streamed = list(client.completions.create(stream=True, **options))
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny", prompt=PROMPT, temperature=-1)
    assert error.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT)


def test_openai_client_passes_vllm_fields_and_gets_refusals_by_name(client):
    options = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 2.0, "seed": 5}
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    top_1 = client.completions.create(**options, extra_body={"top_k": 1, "min_tokens": 2})
    assert top_1.choices[0].text == greedy.choices[0].text
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(**options, extra_body={"repetition_penalty": 1.3})
    assert error.value.body["param"] == "repetition_penalty"


def test_head_through_uvicorn(live):
    url, _ = live
    with httpx.Client(base_url=url, timeout=30) as http:
        for path in ("/health", "/metrics"):
            response = http.head(path)
            assert response.status_code == 200 and response.content == b"", path
        assert http.get("/docs").status_code == 404


def test_client_hanging_up_mid_stream_frees_its_slot(live):
    url, app = live
    scheduler, registry = app.state.scheduler, app.state.metrics.registry
    scheduler.on_step = lambda job: time.sleep(0.005)  # slow enough to hang up halfway
    name = {"model_name": app.state.served.name}  # vLLM's label, on every series
    generated_before = registry.get_sample_value("speckv:generation_tokens_total", name) or 0
    try:
        body = {"prompt": PROMPT, "max_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(base_url=url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=body) as response,
        ):
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        deadline = time.monotonic() + 5
        while scheduler.running:
            assert time.monotonic() < deadline, "the slot was not freed"
            time.sleep(0.01)
    finally:
        scheduler.on_step = None
    assert registry.get_sample_value("speckv:request_failure_total", {"reason": "abort", **name}) == 1
    assert registry.get_sample_value("speckv:generation_tokens_total", name) - generated_before < 500
