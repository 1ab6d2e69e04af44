"""`speckv serve --api-key` / SPECKV_API_KEY: every path but /health needs the bearer key."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from speckv.cli.main import build_parser
from speckv.cli.serve import build_app
from speckv.decoding.builder import DecoderSpec
from speckv.errors import SpecKVError
from speckv.server import ServedModel, create_app
from speckv.server import auth as auth_module
from speckv.server.auth import bearer_matches

KEY = "s3cret-key"
CHAT = "/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 3, "temperature": 0}


def test_bearer_matches_by_hand():
    assert bearer_matches("Bearer s3cret-key", KEY)
    assert bearer_matches("bearer s3cret-key", KEY)  # the scheme's case does not matter
    assert bearer_matches("  Bearer   s3cret-key ", KEY)
    for header in (
        None,
        "",
        "s3cret-key",
        "Basic s3cret-key",
        "Bearer",
        "Bearer s3cret",
        "Bearer s3cret-key2",
    ):
        assert not bearer_matches(header, KEY), header
    assert bearer_matches("Bearer ключ", "ключ") and not bearer_matches("Bearer ключ", "ключи")


def test_keys_are_compared_in_constant_time(monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    assert bearer_matches("Bearer abc", "abc") and calls == [(b"abc", b"abc")]


@pytest.fixture(scope="module")
def served(tiny_target) -> ServedModel:
    return ServedModel(DecoderSpec(tiny_target).build(), "tiny")


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served, api_key=KEY, docs=True)) as client:
        yield client


def assert_unauthorised(response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert KEY not in response.text


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}],
)
def test_every_endpoint_but_health_needs_the_key(client, headers):
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/tiny"),
        ("POST", CHAT),
        ("POST", "/v1/completions"),
        ("GET", "/metrics"),
        ("HEAD", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/v1/nowhere"),  # a 401, not a 404 that would map the API
    ]:
        response = client.request(method, path, headers=headers, json=BODY if method == "POST" else None)
        if method == "HEAD":
            assert response.status_code == 401
        else:
            assert_unauthorised(response)
    assert client.get("/health", headers=headers).status_code == 200
    assert client.head("/health", headers=headers).status_code == 200


def test_the_key_opens_every_endpoint(client):
    headers = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/v1/models", headers=headers).json()["data"][0]["id"] == "tiny"
    assert client.post(CHAT, json=BODY, headers=headers).json()["usage"]["completion_tokens"] >= 1
    assert client.get("/metrics", headers=headers).status_code == 200
    assert client.get("/v1/nowhere", headers=headers).status_code == 404


def test_empty_keys_are_refused(served):
    with pytest.raises(SpecKVError, match="API key is empty"):
        create_app(served, api_key="")


def serve_args(tiny_model_dirs, *extra: str):
    return build_parser().parse_args(
        ["serve", "--target", str(tiny_model_dirs["target"]), "--no-draft", *extra]
    )


def test_serve_takes_the_key_from_the_option_or_the_environment(tiny_model_dirs, monkeypatch):
    monkeypatch.delenv("SPECKV_API_KEY", raising=False)
    with TestClient(build_app(serve_args(tiny_model_dirs))) as open_client:
        assert open_client.get("/v1/models").status_code == 200
        assert open_client.get("/openapi.json").status_code == 404  # no --docs
    monkeypatch.setenv("SPECKV_API_KEY", "from-env")
    for extra, key in (((), "from-env"), (("--api-key", "from-option", "--docs"), "from-option")):
        app = build_app(serve_args(tiny_model_dirs, *extra))
        assert app.state.api_key
        with TestClient(app) as client:
            assert_unauthorised(client.get("/v1/models"))
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [(["--api-key", " "], None, "--api-key is empty"), ([], "", "SPECKV_API_KEY is set but empty")],
)
def test_serve_refuses_an_empty_key(monkeypatch, tiny_model_dirs, argv, env, message):
    """Rather than serving without a key that someone meant to set."""
    if env is None:
        monkeypatch.delenv("SPECKV_API_KEY", raising=False)
    else:
        monkeypatch.setenv("SPECKV_API_KEY", env)
    with pytest.raises(SpecKVError, match=message):
        build_app(serve_args(tiny_model_dirs, *argv))
