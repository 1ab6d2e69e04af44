"""The OpenAI API's shapes: request bodies, their checks, errors, and response / chunk bodies.

Every request field is honoured or refused with a 400 that names it; none is silently ignored:

- honoured: `model`, `messages` / `prompt`, `max_tokens` (`max_completion_tokens`),
  `temperature`, `top_p`, `seed`, `stop`, `stream`, `stream_options.include_usage`, and vLLM's
  `top_k`, `min_p`, `min_tokens`, `stop_token_ids` and `ignore_eos`;
- accepted although they do nothing here, because they cannot change a completion: `user`,
  `metadata`, `store`, `service_tier`, `prompt_cache_key`, `safety_identifier`,
  `parallel_tool_calls`, and the neutral value of an option this server cannot honour (`n` 1,
  penalties 0, `repetition_penalty` 1, `logit_bias` {}, `logprobs` false, `response_format`
  {"type": "text"}, `tool_choice` "none" or "auto" with no tools, …), which clients send by
  default. In messages, `name` and `tool_call_id` go to the chat template; empty `tool_calls`,
  `function_call`, `audio`, `refusal` and `annotations` (what a replayed reply carries) pass;
- refused: any other value of those options, and every field not declared here (OpenAI refuses
  unrecognised arguments as well; new ones may change the output in ways nobody would notice).

Types are strict, as OpenAI's are: "10" is not an integer, `true` not a number, "yes" not a
boolean; only an integer passes for a number (temperature 1). Every error is OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, raised as `APIError`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from speckv.decoding.verify import SEED_LIMIT, SamplingConfig

MAX_STOPS = 16
ROLES = ("system", "developer", "user", "assistant", "tool")
ECHO_LIMIT = 64  # characters of a client's value quoted back in an error message


class APIError(Exception):
    """An error response: HTTP status and OpenAI's error body."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` cut to `limit` characters and "…", to quote a client's value without echoing it whole."""
    return text if len(text) <= limit else text[:limit] + "…"


class Strict(BaseModel):
    """Unknown fields and loosely typed values are errors (see the module doc)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool | None = None


class CommonRequest(Strict):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's: -1 or 0 keeps every token
    min_p: float | None = None  # vLLM's
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's: more stop tokens besides the model's EOS
    min_tokens: int | None = None  # vLLM's: no EOS or stop token before this many new tokens
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # vLLM's: no stop at the model's EOS (load tests)
    # Options with only a neutral value accepted (`refused`).
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # Accepted, without effect on a completion.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def refused(self) -> dict[str, str]:
        """The options this request uses that the server cannot honour: name -> what it accepts."""
        checks = {
            "n": (self.n not in (None, 1), "only 1"),
            "presence_penalty": (bool(self.presence_penalty), "only 0"),
            "frequency_penalty": (bool(self.frequency_penalty), "only 0"),
            "repetition_penalty": (self.repetition_penalty not in (None, 1), "only 1"),
            "logit_bias": (bool(self.logit_bias), "only an empty one"),
            "response_format": (
                self.response_format not in (None, {"type": "text"}),
                'only {"type": "text"}',
            ),
        }
        return {name: accepted for name, (used, accepted) in checks.items() if used}


class ContentPart(Strict):
    type: str
    text: str | None = None


class ChatMessage(Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # passed to the chat template
    tool_call_id: str | None = None  # passed to the chat template
    # What a replayed assistant reply carries; only empty values pass (`chat_messages`).
    tool_calls: list[Any] | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None  # citations of the content: nothing to render


class ChatRequest(CommonRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # about tools, which are refused: no effect
    functions: list[Any] | None = None  # the older tools
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None

    def refused(self) -> dict[str, str]:
        checks = {
            "logprobs": (bool(self.logprobs), "only false"),
            "top_logprobs": (bool(self.top_logprobs), "only 0"),
            "tools": (bool(self.tools), "no tools"),
            "tool_choice": (self.tool_choice not in (None, "none", "auto"), '"none" or "auto"'),
            "functions": (bool(self.functions), "no functions"),
            "function_call": (self.function_call not in (None, "none", "auto"), '"none" or "auto"'),
            "modalities": (self.modalities not in (None, ["text"]), '["text"]'),
            "audio": (self.audio is not None, "no audio"),
            "prediction": (self.prediction is not None, "no predicted output"),
        }
        return super().refused() | {name: why for name, (used, why) in checks.items() if used}


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None  # a count: 0 still asks for the sampled tokens' log-probabilities

    def refused(self) -> dict[str, str]:
        checks = {
            "logprobs": (self.logprobs is not None, "none"),
            "echo": (bool(self.echo), "only false"),
            "best_of": (self.best_of not in (None, 1), "only 1"),
            "suffix": (bool(self.suffix), "only an empty one"),
        }
        return super().refused() | {name: why for name, (used, why) in checks.items() if used}


@dataclass
class Decoding:
    """A request's checked decoding options."""

    max_tokens: int | None
    sampling: SamplingConfig
    stops: list[str]
    ignore_eos: bool
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(
            f"The model '{clip(requested)}' does not exist; this server serves '{served}'",
            status=404,
            param="model",
            code="model_not_found",
        )


def check_common(request: CommonRequest, max_tokens: int | None, vocab_size: int) -> Decoding:
    """Range checks with OpenAI's defaults (temperature 1, top_p 1); `max_tokens` may be unset."""
    refused = request.refused()
    if refused:
        name, accepted = next(iter(refused.items()))
        raise APIError(
            f"'{name}' is not supported by this server (it accepts {accepted})",
            param=name,
            code="unsupported",
        )
    if max_tokens is not None and max_tokens < 1:
        raise APIError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = 1.0 if request.temperature is None else request.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise APIError(f"temperature must be a finite number ≥ 0, got {temperature}", param="temperature")
    top_p = 1.0 if request.top_p is None else request.top_p
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise APIError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = 0 if request.top_k in (None, -1) else request.top_k  # vLLM's -1: every token
    if top_k < 0:
        raise APIError(f"top_k must be -1 or 0 (every token) or at least 1, got {top_k}", param="top_k")
    min_p = 0.0 if request.min_p is None else request.min_p
    if not math.isfinite(min_p) or not 0 <= min_p <= 1:
        raise APIError(f"min_p must be in [0, 1], got {min_p}", param="min_p")
    seed = request.seed
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise APIError(f"seed must be an integer in [0, 2^64 - 1], got {clip(str(seed))}", param="seed")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOPS or any(not stop for stop in stops):
        raise APIError(f"stop takes 1 to {MAX_STOPS} non-empty strings", param="stop")
    stop_ids = list(request.stop_token_ids or [])
    if any(not 0 <= token < vocab_size for token in stop_ids):
        raise APIError(f"stop_token_ids must be token ids in [0, {vocab_size})", param="stop_token_ids")
    min_tokens = request.min_tokens or 0
    if min_tokens < 0:
        raise APIError(f"min_tokens must be at least 0, got {min_tokens}", param="min_tokens")
    sampling = SamplingConfig(temperature, top_p, seed, top_k, min_p)
    return Decoding(max_tokens, sampling, stops, bool(request.ignore_eos), stop_ids, min_tokens)


def chat_messages(request: ChatRequest) -> list[dict]:
    """The messages as plain {"role", "content"} dicts with text content, for a chat template."""
    if not request.messages:
        raise APIError("messages must hold at least one message", param="messages")
    messages = []
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise APIError(
                f"messages[{index}].role '{clip(message.role)}' is not one of {', '.join(ROLES)}",
                param=f"messages.[{index}].role",
            )
        for name in ("tool_calls", "function_call", "audio", "refusal"):
            if getattr(message, name):  # a reply's tool calls, audio or refusal: not renderable
                raise APIError(
                    f"messages[{index}].{name} is not supported by this server (only empty)",
                    param=f"messages.[{index}].{name}",
                    code="unsupported",
                )
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError("only text content parts are supported", param=f"messages.[{index}].content")
            content = "".join(part.text for part in content)
        # A developer message is the newer name of a system message; templates know "system".
        role = "system" if message.role == "developer" else message.role
        rendered = {"role": role, "content": content or ""}
        for key in ("name", "tool_call_id"):  # templates that know them render them
            if getattr(message, key) is not None:
                rendered[key] = getattr(message, key)
        messages.append(rendered)
    if not any(m["content"].strip() for m in messages):
        raise APIError("the messages are empty", param="messages")
    return messages


def completion_prompt(request: CompletionRequest) -> str | list[int]:
    """One prompt, as text or token ids (a list of several prompts needs `n`-way batching: refused)."""
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError("one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise APIError("the prompt is empty", param="prompt")
    return prompt


# -- responses ---------------------------------------------------------------------------------
Kind = Literal["chat", "text"]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseWriter:
    """Builds one request's response or stream chunks (same id and timestamp for all of them)."""

    def __init__(self, kind: Kind, model: str, request_id: str):
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())

    def _envelope(self, chunk: bool) -> dict:
        suffix = ".chunk" if chunk and self.kind == "chat" else ""
        kind = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": kind + suffix, "created": self.created, "model": self.model}

    def response(self, text: str, reason: str, prompt: int, completion: int, summary: dict) -> dict:
        if self.kind == "chat":
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {
            **self._envelope(False),
            "choices": [choice],
            "usage": usage(prompt, completion),
            "speckv": summary,
        }

    def chunk(self, text: str | None, reason: str | None = None, role: bool = False) -> dict:
        """A stream chunk: new text, or (with `reason`) the last choice chunk."""
        if self.kind == "chat":
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return {**self._envelope(True), "choices": [choice]}

    def usage_chunk(self, prompt: int, completion: int, summary: dict) -> dict:
        """OpenAI's `stream_options.include_usage` chunk: no choices, the usage."""
        return {**self._envelope(True), "choices": [], "usage": usage(prompt, completion), "speckv": summary}
