"""The OpenAI API's shapes: request bodies, their checks, errors, and response / chunk bodies.

Requests are pydantic models that let unknown fields through (clients send options this server
ignores, e.g. `user`), and reject options that would change the output in ways the server cannot
honour (`n` > 1, log-probabilities, penalties) rather than silently ignoring them. Every error is
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, raised as `APIError`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from speckv.decoding.verify import SamplingConfig

MAX_STOPS = 16
ROLES = ("system", "developer", "user", "assistant", "tool")


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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class CommonRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM's extension: decode exactly max_tokens (load tests)

    def unsupported(self) -> dict[str, bool]:
        """Options the request uses that this server cannot honour, by name."""
        return {
            "n": self.n not in (None, 1),
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
            "logit_bias": bool(self.logit_bias),
        }


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(CommonRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None

    def unsupported(self) -> dict[str, bool]:
        return super().unsupported() | {
            "logprobs": bool(self.logprobs),
            "top_logprobs": bool(self.top_logprobs),
            "tools": bool(self.tools),
        }


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None  # a count: 0 still asks for the sampled tokens' log-probabilities

    def unsupported(self) -> dict[str, bool]:
        return super().unsupported() | {
            "logprobs": self.logprobs is not None,
            "echo": bool(self.echo),
            "best_of": self.best_of not in (None, 1),
            "suffix": bool(self.suffix),
        }


@dataclass
class Decoding:
    """A request's checked decoding options."""

    max_tokens: int | None
    sampling: SamplingConfig
    stops: list[str]
    ignore_eos: bool


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(
            f"The model '{requested}' does not exist; this server serves '{served}'",
            status=404,
            param="model",
            code="model_not_found",
        )


def check_common(request: CommonRequest, max_tokens: int | None) -> Decoding:
    """Range checks with OpenAI's defaults (temperature 1, top_p 1); `max_tokens` may be unset."""
    unsupported = request.unsupported()
    for name, used in unsupported.items():
        if used:
            raise APIError(f"'{name}' is not supported by this server", param=name, code="unsupported")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = 1.0 if request.temperature is None else request.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise APIError(f"temperature must be a finite number ≥ 0, got {temperature}", param="temperature")
    top_p = 1.0 if request.top_p is None else request.top_p
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise APIError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOPS or any(not stop for stop in stops):
        raise APIError(f"stop takes 1 to {MAX_STOPS} non-empty strings", param="stop")
    return Decoding(max_tokens, SamplingConfig(temperature, top_p, request.seed), stops, request.ignore_eos)


def chat_messages(request: ChatRequest) -> list[dict]:
    """The messages as plain {"role", "content"} dicts with text content, for a chat template."""
    if not request.messages:
        raise APIError("messages must hold at least one message", param="messages")
    messages = []
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise APIError(
                f"messages[{index}].role '{message.role}' is not one of {', '.join(ROLES)}",
                param=f"messages.[{index}].role",
            )
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError("only text content parts are supported", param=f"messages.[{index}].content")
            content = "".join(part.text for part in content)
        # A developer message is the newer name of a system message; templates know "system".
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content or ""})
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
