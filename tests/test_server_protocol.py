"""The server's request policy: every field honoured or refused with a 400 naming it, strict types,
seeds, vLLM's sampling and stopping fields, and what a probe found (long ids, HEAD, docs)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from speckv.controllers import make_controller
from speckv.decoding.builder import DecoderSpec
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.verify import SamplingConfig
from speckv.server import ServedModel, create_app

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
MESSAGES = [{"role": "user", "content": "w5 w6 w7"}]
PROMPT_IDS = [5, 6, 7]


@pytest.fixture(scope="module")
def served(tiny_target, tiny_drafts) -> ServedModel:
    return ServedModel(DecoderSpec(tiny_target, tiny_drafts["close"], "fixed:3").build(), "tiny")


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served)) as client:
        yield client


def assert_error(response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def text_of(client, **options) -> str:
    body = {"prompt": PROMPT_IDS, "max_tokens": 12, "temperature": 0} | options
    response = client.post(TEXT, json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


# --- refused with a 400 naming the field ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "extra", "param"),
    [
        (CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
        (CHAT, {"response_format": {"type": "text", "strict": True}}, "response_format"),
        (CHAT, {"repetition_penalty": 1.2}, "repetition_penalty"),
        (CHAT, {"presence_penalty": 0.5}, "presence_penalty"),
        (CHAT, {"logit_bias": {"5": 10}}, "logit_bias"),
        (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (CHAT, {"tool_choice": "required"}, "tool_choice"),
        (CHAT, {"functions": [{"name": "f"}]}, "functions"),
        (CHAT, {"modalities": ["text", "audio"]}, "modalities"),
        (CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        (CHAT, {"prediction": {"type": "content", "content": "w5"}}, "prediction"),
        (CHAT, {"top_logprobs": 2}, "top_logprobs"),
        (TEXT, {"logprobs": 0}, "logprobs"),
        (TEXT, {"best_of": 2}, "best_of"),
        (TEXT, {"suffix": "w9"}, "suffix"),
    ],
)
def test_options_the_server_cannot_honour_are_refused(client, url, extra, param):
    body = ({"messages": MESSAGES} if url == CHAT else {"prompt": "w5"}) | {"max_tokens": 2} | extra
    error = assert_error(client.post(url, json=body), 400, param, "unsupported")
    assert f"'{param}' is not supported" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES, "reasoning_effort": "low"}, "reasoning_effort"),
        ({"messages": MESSAGES, "guided_json": {}}, "guided_json"),
        (
            {"messages": MESSAGES, "stream_options": {"continuous_usage_stats": True}},
            "stream_options.continuous_usage_stats",
        ),
        ({"messages": [{"role": "user", "content": "w5", "weight": 2}]}, "messages.0.weight"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "w5", "x": 1}]}]},
            "messages.0.content.list[ContentPart].0.x",
        ),
    ],
)
def test_unknown_fields_are_refused_by_name(client, body, param):
    error = assert_error(client.post(CHAT, json=body), 400, param)
    assert error["message"].startswith(f"unrecognized request argument '{param}'")


@pytest.mark.parametrize("name", ["tool_calls", "function_call", "audio", "refusal"])
def test_a_replayed_reply_with_tool_calls_audio_or_a_refusal_is_refused(client, name):
    value = {
        "refusal": "no",
        "tool_calls": [{"id": "1"}],
        "function_call": {"name": "f"},
        "audio": {"id": "a"},
    }
    messages = [*MESSAGES, {"role": "assistant", "content": "w8", name: value[name]}, *MESSAGES]
    assert_error(client.post(CHAT, json={"messages": messages}), 400, f"messages.[1].{name}", "unsupported")


def test_harmless_fields_and_neutral_values_are_accepted_and_change_nothing(client):
    harmless = {
        "user": "someone",
        "metadata": {"team": "a"},
        "store": False,
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "parallel_tool_calls": True,
        "n": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1,
        "logit_bias": {},
        "logprobs": False,
        "top_logprobs": 0,
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "function_call": "auto",
        "modalities": ["text"],
        "stream_options": {"include_usage": False},
        "stream": None,
        "ignore_eos": None,
    }
    # What an OpenAI client sends back when it replays its own reply as history.
    replayed = {"role": "assistant", "content": "w8", "refusal": None, "tool_calls": None}
    replayed |= {"function_call": None, "audio": None, "annotations": []}
    messages = [*MESSAGES, replayed, {"role": "user", "content": "w9", "name": "ann"}]
    plain = client.post(CHAT, json={"messages": messages, "max_tokens": 8, "temperature": 0})
    dressed = client.post(CHAT, json={"messages": messages, "max_tokens": 8, "temperature": 0} | harmless)
    assert plain.status_code == dressed.status_code == 200, dressed.text
    assert dressed.json()["choices"] == plain.json()["choices"]


# --- strict types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 10.0}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"seed": "7"}, "seed"),
        ({"ignore_eos": "true"}, "ignore_eos"),
        ({"top_k": 2.0}, "top_k"),
        ({"stop_token_ids": ["5"]}, "stop_token_ids.0"),
        ({"model": 5}, "model"),
    ],
)
def test_loosely_typed_values_are_refused(client, extra, param):
    assert_error(client.post(CHAT, json={"messages": MESSAGES} | extra), 400, param)


def test_an_integer_is_a_number(client):
    assert text_of(client, temperature=0, top_p=1, min_p=0) == text_of(client, temperature=0.0, top_p=1.0)


# --- seeds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**70, 2**64, -1, -(2**63)])
@pytest.mark.parametrize("stream", [False, True])
def test_seeds_outside_64_bits_are_refused_before_anything_streams(client, seed, stream):
    body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 1, "seed": seed, "stream": stream}
    error = assert_error(client.post(CHAT, json=body), 400, "seed")
    assert len(error["message"]) < 200  # a huge seed is not echoed whole


def test_the_largest_seed_works_and_repeats(client):
    options = {"temperature": 1.0, "seed": 2**64 - 1}
    assert text_of(client, **options) == text_of(client, **options)


# --- vLLM's sampling and stopping fields ----------------------------------------------------------


def test_top_k_and_min_p_are_honoured(client):
    """Sampling among the top token only, or the tokens at least as likely as the top one, is
    greedy decoding; hot sampling without them is not (so the fields took effect)."""
    greedy = text_of(client)
    hot = {"temperature": 2.0, "seed": 1}
    assert text_of(client, **hot) != greedy
    assert text_of(client, **hot, top_k=1) == greedy
    assert text_of(client, **hot, min_p=1.0) == greedy
    # vLLM's -1 (like 0) keeps every token: the plain sampled output.
    assert text_of(client, **hot, top_k=-1) == text_of(client, **hot, top_k=0) == text_of(client, **hot)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"stop_token_ids": [64]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ],
)
def test_sampling_and_stopping_fields_are_range_checked(client, extra, param):
    assert_error(client.post(TEXT, json={"prompt": PROMPT_IDS, "max_tokens": 8} | extra), 400, param)


@pytest.fixture(scope="module")
def free_run(tiny_target) -> tuple[list[int], int]:
    """The target's greedy tokens after PROMPT_IDS (no stop), and the index of a token that first
    appears 3 or more tokens in: a stop id that ends the run early."""
    tokens = SpeculativeDecoder(tiny_target, eos_token_ids=()).generate(PROMPT_IDS, 30).token_ids
    return tokens, next(i for i, t in enumerate(tokens) if i >= 3 and t not in tokens[:i])


def decode(served, tokens: list[int]) -> str:
    return served.tokenizer.decode(tokens, skip_special_tokens=True)


def test_stop_token_ids_end_the_completion(client, served, free_run):
    tokens, index = free_run
    for extra in ({}, {"ignore_eos": True}):  # ignore_eos drops the model's EOS, not these
        body = {"prompt": PROMPT_IDS, "max_tokens": 30, "temperature": 0, "stop_token_ids": [tokens[index]]}
        reply = client.post(TEXT, json=body | extra).json()
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert reply["usage"]["completion_tokens"] == index + 1
        # A stop token that is not a special token is part of the text, as in vLLM.
        assert reply["choices"][0]["text"] == decode(served, tokens[: index + 1])


def test_min_tokens_holds_the_stop_tokens_back(client, served, tiny_target, free_run):
    tokens, index = free_run
    stop = tokens[index]
    body = {
        "prompt": PROMPT_IDS,
        "max_tokens": 30,
        "temperature": 0,
        "stop_token_ids": [stop],
        "ignore_eos": True,
    }
    reply = client.post(TEXT, json=body | {"min_tokens": index + 2}).json()
    # The decoder alone, target only, with the same rule: the server's speculative output is it.
    expected = SpeculativeDecoder(tiny_target, eos_token_ids=[stop]).generate(
        PROMPT_IDS, 30, min_new_tokens=index + 2
    )
    assert len(expected.token_ids) > index + 1  # the rule changed the output
    assert reply["choices"][0]["text"] == decode(served, expected.token_ids)
    assert reply["usage"]["completion_tokens"] == len(expected.token_ids)
    streamed = client.post(TEXT, json=body | {"min_tokens": index + 2, "stream": True})
    assert streamed.status_code == 200 and '"finish_reason"' in streamed.text
    # Sampled, too: never a stop token before min_tokens.
    sampled = SpeculativeDecoder(
        tiny_target, served.draft, make_controller("fixed:3"), SamplingConfig(1.5, seed=3), [stop]
    ).generate(PROMPT_IDS, 30, min_new_tokens=index + 2)
    assert stop not in sampled.token_ids[: index + 2]


# --- what a probe found ---------------------------------------------------------------------------


def test_an_unknown_model_id_is_not_echoed_whole(client):
    long_id = "x" * 100_000
    for response in (
        client.post(CHAT, json={"messages": MESSAGES, "model": long_id}),
        client.get(f"/v1/models/{long_id[:5000]}"),  # (an HTTP client's URL limit)
    ):
        error = assert_error(response, 404, "model", "model_not_found")
        assert "x" * 64 + "…" in error["message"] and len(error["message"]) < 200
    assert_error(
        client.post(CHAT, json={"messages": [{"role": "r" * 5000, "content": "w5"}]}),
        400,
        "messages.[0].role",
    )
    long_field = "f" * 5000
    error = assert_error(client.post(CHAT, json={"messages": MESSAGES, long_field: 1}), 400, "f" * 64 + "…")
    assert len(error["message"]) < 200


def test_head_on_health_and_metrics(client):
    for path in ("/health", "/metrics"):
        response = client.head(path)
        assert response.status_code == 200 and not response.content, path


def test_docs_are_off_unless_asked_for(served, client):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404, path
    with TestClient(create_app(served, docs=True)) as documented:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert documented.get(path).status_code == 200, path
        assert "/v1/chat/completions" in documented.get("/openapi.json").json()["paths"]
