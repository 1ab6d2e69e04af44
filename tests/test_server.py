"""`speckv serve`'s endpoints on tiny models, in-process: outputs, streaming, stop strings, errors."""

from __future__ import annotations

import json

import pytest
from conftest import loaded, tiny_tokenizer
from fastapi.testclient import TestClient

from speckv.cli import main
from speckv.cli.main import build_parser
from speckv.cli.serve import build_app
from speckv.controllers import make_controller
from speckv.decoding.builder import DecoderSpec
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.models import encode_prompt
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError
from speckv.server import ServedModel, create_app

PROMPT = "w5 w6 w7"


@pytest.fixture(scope="module")
def served(tiny_target, tiny_drafts) -> ServedModel:
    return ServedModel(DecoderSpec(tiny_target, tiny_drafts["close"], "fixed:3").build(), "tiny")


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served, max_running=2, max_queue=4)) as client:
        yield client


def sse_events(response) -> list[dict]:
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    blocks = [block for block in response.text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in blocks)
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(block[len("data: ") :]) for block in blocks[:-1]]


def chat(client, content=PROMPT, **options):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0} | options
    return client.post("/v1/chat/completions", json=body)


def streamed_text(events: list[dict], kind: str) -> str:
    if kind == "chat":
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    return "".join(e["choices"][0]["text"] for e in events if e["choices"])


def test_models_health_and_metrics(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == 512
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/health").json()["status"] == "ok"
    assert chat(client, max_tokens=6).status_code == 200
    text = client.get("/metrics").text
    for name in (
        "speckv:spec_decode_num_drafts_total",
        "speckv:spec_decode_num_draft_tokens_total",
        "speckv:spec_decode_num_accepted_tokens_total",
        "speckv:spec_decode_gamma_bucket",
        "speckv:time_to_first_token_seconds_bucket",
        "speckv:time_per_output_token_seconds_bucket",
        "speckv:num_requests_running",
        "speckv:num_requests_waiting",
        'speckv:request_success_total{finished_reason="',
    ):
        assert name in text, name
    assert 'speckv:generation_tokens_total{model_name="tiny"}' in text  # vLLM's label
    # fixed:3 drafts 3 tokens at every step but the last ones (capped by the length left).
    drafts = next(
        line for line in text.splitlines() if line.startswith("speckv:spec_decode_num_drafts_total")
    )
    assert float(drafts.split()[-1]) >= 1


@pytest.mark.parametrize("draft", ["close", None])
def test_greedy_output_is_the_decoders(client, served, tiny_target, draft):
    response = chat(client, max_tokens=12)
    assert response.status_code == 200
    body = response.json()
    prompt_ids = encode_prompt(tiny_target.tokenizer, PROMPT)
    # The decoder alone, with the draft or without one (losslessness: both give the target's tokens).
    decoder = SpeculativeDecoder(
        tiny_target, served.draft if draft else None, make_controller("fixed:3") if draft else None
    )
    result = decoder.generate(prompt_ids, 12)
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": tiny_target.tokenizer.decode(result.token_ids, skip_special_tokens=True),
    }
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(result.token_ids),
        "total_tokens": len(prompt_ids) + len(result.token_ids),
    }
    assert choice["finish_reason"] == ("stop" if result.stop_reason == "eos" else "length")
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    summary = body["speckv"]
    assert summary["controller"] == "fixed:3" and summary["compression"] == "fp32"
    assert summary["steps"] >= 1 and 0 <= summary["accepted_tokens"] <= summary["drafted_tokens"]


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_stream_equals_plain(client, kind):
    if kind == "chat":
        url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}
    else:
        url, body = "/v1/completions", {"prompt": PROMPT}
    body |= {"max_tokens": 20, "temperature": 0, "ignore_eos": True}
    plain = client.post(url, json=body).json()
    events = sse_events(
        client.post(url, json=body | {"stream": True, "stream_options": {"include_usage": True}})
    )
    expected = plain["choices"][0]["message"]["content"] if kind == "chat" else plain["choices"][0]["text"]
    assert streamed_text(events, kind) == expected and plain["choices"][0]["finish_reason"] == "length"
    assert plain["usage"]["completion_tokens"] == 20
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert finals[0]["speckv"]["drafted_tokens"] == plain["speckv"]["drafted_tokens"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
    assert len({e["id"] for e in events}) == 1
    assert events[0]["object"] == ("chat.completion.chunk" if kind == "chat" else "text_completion")


def test_seeded_sampling_repeats(client):
    options = {"max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    first = chat(client, **options).json()["choices"][0]["message"]["content"]
    streamed = streamed_text(sse_events(chat(client, stream=True, **options)), "chat")
    assert chat(client, **options).json()["choices"][0]["message"]["content"] == first == streamed


def test_stop_string_across_tokens(client):
    full = client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    ).json()["choices"][0]["text"]
    words = full.split(" ")
    assert len(words) == 8
    # From the end of the 3rd token over the space into the 4th: completed by the 4th token.
    stop = words[2][-1] + " " + words[3][:2]
    cut = full.index(stop)
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stop": ["zzz", stop]}
    plain = client.post("/v1/completions", json=body).json()
    assert plain["choices"][0]["text"] == full[:cut]
    assert plain["choices"][0]["finish_reason"] == "stop"
    assert plain["usage"]["completion_tokens"] == 4
    events = sse_events(client.post("/v1/completions", json=body | {"stream": True}))
    assert streamed_text(events, "text") == full[:cut]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_multi_turn_chat_uses_the_template(tiny_target):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
        "{% if add_generation_prompt %}w9{% endif %}"
    )
    served = ServedModel(DecoderSpec(loaded(tiny_target.model, "target", tokenizer)).build(), "chat")
    messages = [
        {"role": "system", "content": "w10"},
        {"role": "user", "content": "w11 w12"},
        {"role": "assistant", "content": [{"type": "text", "text": "w13"}]},
        {"role": "user", "content": "w14"},
    ]
    with TestClient(create_app(served)) as client:
        body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3}).json()
    # w3 w10 w4 w3 w11 w12 w4 w3 w13 w4 w3 w14 w4 w9
    assert body["usage"]["prompt_tokens"] == 14
    assert body["speckv"]["controller"] is None and body["speckv"]["drafted_tokens"] == 0


CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.mark.parametrize(
    ("url", "body", "status", "param"),
    [
        (CHAT, {"model": "tiny"}, 400, "messages"),
        (CHAT, {"messages": "hello"}, 400, "messages"),
        (CHAT, {"messages": []}, 400, "messages"),
        (CHAT, {"messages": [{"content": "w5"}]}, 400, "messages.0.role"),
        (CHAT, {"messages": [{"role": "wizard", "content": "w5"}]}, 400, "messages.[0].role"),
        (CHAT, {"messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
        (CHAT, {"messages": MESSAGES, "model": "gpt-4"}, 404, "model"),
        (CHAT, {"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
        (CHAT, {"messages": MESSAGES, "max_completion_tokens": -3}, 400, "max_tokens"),
        (CHAT, {"messages": MESSAGES, "max_tokens": 510}, 400, "max_tokens"),
        (CHAT, {"messages": MESSAGES, "max_tokens": 2.5}, 400, "max_tokens"),
        (CHAT, {"messages": MESSAGES, "temperature": -0.1}, 400, "temperature"),
        (CHAT, {"messages": MESSAGES, "top_p": 0}, 400, "top_p"),
        (CHAT, {"messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
        (CHAT, {"messages": MESSAGES, "stop": ["ok", ""]}, 400, "stop"),
        (CHAT, {"messages": MESSAGES, "n": 2}, 400, "n"),
        (CHAT, {"messages": [{"role": "user", "content": "w5 " * 600}]}, 400, "messages"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["w5", "w6"]}, 400, "prompt"),
        ("/v1/completions", {"prompt": [5, 999]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "w5", "echo": True}, 400, "echo"),
    ],
)
def test_bad_requests_get_openai_errors(client, url, body, status, param):
    response = client.post(url, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"messages": [{"role": "user", "content": "w5"}], "temperature": NaN}', b"[1, 2]"],
)
def test_malformed_bodies_and_the_server_keeps_serving(client, raw):
    response = client.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/nowhere").json()["error"]["message"] == "Not Found"
    assert chat(client, max_tokens=3).status_code == 200


def test_a_failing_step_is_a_server_error_not_a_dead_server(served):
    def explode(job):
        if job.generated >= 2:
            raise RuntimeError("boom")

    with TestClient(create_app(served, on_step=explode)) as client:
        response = chat(client, max_tokens=30, ignore_eos=True)
        assert response.status_code == 500 and "boom" in response.json()["error"]["message"]
        events = sse_events(chat(client, max_tokens=30, ignore_eos=True, stream=True))
        assert events[-1]["error"]["type"] == "server_error"
        assert chat(client, max_tokens=1).status_code == 200
        assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    ("drafter", "controller"),
    [
        ("draft", "heuristic"),
        ("draft", "tree:4"),
        ("ngram", "fixed:3"),
        ("draft+ngram", "tree:4"),
        ("draft+ngram", "fixed:3"),
        (None, None),
    ],
)
def test_serve_command_builds_the_app(tiny_model_dirs, drafter, controller):
    argv = ["serve", "--target", str(tiny_model_dirs["target"]), "--model-name", "mine", "--max-running", "3"]
    if drafter is None:
        argv.append("--no-draft")
    else:
        argv += ["--draft", drafter.replace("draft", str(tiny_model_dirs["draft"]))]
        argv += ["--controller", controller, "--compression", "fp32"]
    app = build_app(build_parser().parse_args(argv))
    assert app.state.scheduler.max_running == 3 and app.state.served.name == "mine"
    body = {"model": "mine", "prompt": "w5 w6 w5 w6", "max_tokens": 12, "temperature": 0}
    prototype = app.state.served.factory.controller
    with TestClient(app) as client:
        reply = client.post("/v1/completions", json=body).json()
    # The next request's controller starts from what the finished one learnt (a copy of it).
    assert (app.state.served.factory.controller is prototype) == (controller is None)
    summary = reply["speckv"]
    assert summary["controller"] == (controller and make_controller(controller).describe())
    assert (summary["draft"] is None) == (drafter is None)
    assert ("tree" in (summary["draft"] or "")) == (controller == "tree:4")  # tree controllers grow trees
    assert ("ngram" in (summary["draft"] or "")) == ("ngram" in (drafter or ""))  # n-grams are kept
    served = app.state.served
    if drafter is not None:  # every request gets a drafter and a controller of its own
        one, two = served.decoder(SamplingConfig()), served.decoder(SamplingConfig())
        assert one.drafter is not two.drafter and one.controller is not two.controller
        assert one.drafter.loaded is two.drafter.loaded  # the weights are shared
    # Whatever drafts, greedy output is the target's own.
    target_only = SpeculativeDecoder(served.target).generate(
        encode_prompt(served.tokenizer, "w5 w6 w5 w6", raw=True), 12
    )
    assert reply["choices"][0]["text"] == served.tokenizer.decode(
        target_only.token_ids, skip_special_tokens=True
    )


def test_served_requests_draft_from_earlier_requests(tiny_model_dirs):
    argv = [
        "serve",
        "--target",
        str(tiny_model_dirs["target"]),
        "--draft",
        "suffix",
        "--controller",
        "fixed:4",
    ]
    app = build_app(build_parser().parse_args([*argv, "--compression", "fp32"]))
    body = {"model": app.state.served.name, "prompt": "w5 w9 w14", "max_tokens": 16, "temperature": 0}
    earlier = app.state.served.factory.drafter.earlier  # the prototype's, shared by every request
    with TestClient(app) as client:
        first = client.post("/v1/completions", json=body).json()
        assert earlier.sequences == 1
        again = client.post("/v1/completions", json=body).json()
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert earlier.sequences == 2
    # The second request copied the first one's output (a fresh prompt has nothing of its own to copy).
    assert again["speckv"]["mean_accepted_length"] > first["speckv"]["mean_accepted_length"]


def test_serve_refuses_a_tree_budget_for_a_chain_drafter(tiny_model_dirs):
    argv = ["serve", "--target", str(tiny_model_dirs["target"]), "--draft", "ngram", "--controller", "tree:4"]
    with pytest.raises(SpecKVError, match="tree:4 budgets tree nodes, and ngram:1-4 drafts chains"):
        build_app(build_parser().parse_args(argv))


@pytest.mark.parametrize(
    "extra",
    [["--max-running", "0"], ["--no-draft", "--gamma", "0"], ["--demo"], []],
)
def test_serve_command_errors(capsys, tiny_model_dirs, extra):
    argv = ["serve", *extra]
    if extra != []:
        argv += ["--target", str(tiny_model_dirs["target"])]
    if "--no-draft" not in extra:
        argv += ["--no-draft"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("speckv: error: ")


def test_serve_says_what_it_serves_then_runs_uvicorn(tiny_model_dirs, monkeypatch, caplog):
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append((app, options)))
    argv = ["serve", "--target", str(tiny_model_dirs["target"]), "--draft", str(tiny_model_dirs["draft"])]
    with caplog.at_level("INFO", logger="speckv"):
        assert main([*argv, "--controller", "fixed:3", "--compression", "fp32", "--port", "8123"]) == 0
    assert started and started[0][1]["port"] == 8123
    assert "fixed:3" in caplog.text and "fp32" in caplog.text
