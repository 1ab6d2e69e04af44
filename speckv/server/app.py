"""The FastAPI app: OpenAI-compatible endpoints over the scheduler, metrics and health.

Handlers check and tokenize a request, submit a `Generation` to the scheduler and relay its
events, as one JSON body or as server-sent events (OpenAI's chunks, then `data: [DONE]`). They
never run a model: the scheduler's worker thread does. A client that goes away cancels its
generation, which frees its slot at the next step.

With an API key every path but `/health` needs it (`speckv.server.auth`). The interactive docs
(`/docs`, `/redoc`, `/openapi.json`) are off unless asked for (`docs=True`, `serve --docs`): they
would publish the server's whole surface to anyone who can reach the port.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from speckv.decoding import models
from speckv.decoding.batch import BatchPace
from speckv.decoding.models import encode_prompt
from speckv.errors import SpecKVError
from speckv.server.auth import BearerAuth
from speckv.server.generation import Delta, Failed, Finished, Generation, ServedModel, step_generations
from speckv.server.metrics import ServerMetrics
from speckv.server.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    ResponseWriter,
    chat_messages,
    check_common,
    check_model,
    clip,
    completion_prompt,
    error_body,
)
from speckv.server.scheduler import QueueFull, Scheduler

DISCONNECT_POLL_S = 0.5  # how often a plain (non-streamed) request checks that its client is still there


def create_app(
    served: ServedModel,
    max_running: int = 4,
    max_queue: int = 64,
    default_max_tokens: int = 256,
    on_step: Callable | None = None,
    api_key: str | None = None,
    docs: bool = False,
    prompt_budget: int | None = None,
) -> FastAPI:
    """An app serving `served`; its scheduler's worker runs while the app's lifespan does: each
    tick, one target pass for every running request, reading at most `prompt_budget` prompt
    tokens (None: whole prompts). `api_key`: required of every request but /health; `docs`:
    serve /docs, /redoc, /openapi.json."""
    if api_key is not None and not api_key:  # the middleware is built lazily: say it now
        raise SpecKVError("the API key is empty: give a non-empty key, or none to serve without one")
    metrics = ServerMetrics(served.name)
    if prompt_budget is not None and prompt_budget < 1:
        raise SpecKVError(f"the prompt budget must be at least 1 token per pass, got {prompt_budget}")
    pace = BatchPace()  # the running requests' output together, which their controllers weigh
    scheduler = Scheduler(
        max_running,
        max_queue,
        on_queue=metrics.set_queue,
        on_step=on_step,
        step_jobs=lambda jobs: step_generations(jobs, metrics, prompt_budget, pace),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)  # waits for the step in progress

    app = FastAPI(
        title="speckv",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    if api_key is not None:
        app.add_middleware(BearerAuth, key=api_key)
    app.state.served, app.state.metrics, app.state.scheduler = served, metrics, scheduler
    app.state.api_key = api_key is not None  # whether one is required (never the key itself)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(SpecKVError)
    async def speckv_error(_request: Request, error: SpecKVError) -> JSONResponse:
        return JSONResponse(error_body(str(error), "invalid_request_error"), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's default is a 422 with its own shape; OpenAI clients expect 400 and `error`.
        errors = error.errors()
        # An unknown field beats the other errors: in a union (a message's content) pydantic also
        # reports every other member's mismatch, which would hide the field's name.
        first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0] if errors else {})
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, location = "the request body is not valid JSON", []
        elif first.get("type") == "extra_forbidden":  # see speckv.server.protocol's policy
            location[-1] = clip(location[-1])
            message = f"unrecognized request argument '{'.'.join(location)}': this server does not support it"
        elif location:
            message = f"{'.'.join(location)}: {message}"
        return JSONResponse(
            error_body(message, "invalid_request_error", ".".join(location) or None), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not scheduler.alive:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "running": scheduler.running, "waiting": scheduler.waiting})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # HEAD as well (load balancers and uptime checks probe with it); out of the schema, where it
    # would repeat the GET's operation.
    for path, endpoint in (("/health", health), ("/metrics", metrics_endpoint)):
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    def model_card() -> dict:
        return {
            "id": served.name,
            "object": "model",
            "created": started,
            "owned_by": "speckv",
            "max_model_len": served.context_limit,
        }

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        check_model(model_id, served.name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        check_model(body.model, served.name)
        messages = chat_messages(body)
        prompt_ids = encode_messages(served.tokenizer, messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await respond("chat", body, max_tokens, prompt_ids, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model, served.name)
        prompt = completion_prompt(body)
        if isinstance(prompt, str):
            prompt_ids = encode_prompt(served.tokenizer, prompt, raw=True)
        else:
            vocab = served.target.model.config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
                raise APIError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
            prompt_ids = list(prompt)
        return await respond("text", body, body.max_tokens, prompt_ids, request)

    async def respond(
        kind, body, max_tokens: int | None, prompt_ids: list[int], request: Request
    ) -> Response:
        decoding = check_common(body, max_tokens, served.target.model.config.vocab_size)
        limit = served.context_limit
        if limit is not None and len(prompt_ids) >= limit:
            raise APIError(
                f"the prompt is {len(prompt_ids)} tokens; the model's context is {limit} tokens",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        room = limit - len(prompt_ids) if limit is not None else None
        if decoding.max_tokens is None:
            decoding.max_tokens = min(default_max_tokens, room) if room is not None else default_max_tokens
        elif room is not None and decoding.max_tokens > room:
            raise APIError(
                f"max_tokens {decoding.max_tokens} + the prompt's {len(prompt_ids)} tokens exceed the "
                f"model's context of {limit} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if decoding.min_tokens > decoding.max_tokens:
            raise APIError(
                f"min_tokens {decoding.min_tokens} exceeds max_tokens {decoding.max_tokens}",
                param="min_tokens",
            )
        job = Generation(
            served,
            prompt_ids,
            decoding.max_tokens,
            decoding.sampling,
            decoding.stops,
            metrics,
            decoding.ignore_eos,
            decoding.stop_token_ids,
            decoding.min_tokens,
        )
        try:
            scheduler.submit(job)
        except QueueFull as error:
            metrics.failure.labels(reason="queue_full").inc()
            raise APIError(str(error), status=429, code="queue_full", kind="rate_limit_error") from None
        writer = ResponseWriter(kind, served.name, job.id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_events(job, writer, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await collect(job, writer, request)

    async def collect(job: Generation, writer: ResponseWriter, request: Request) -> Response:
        """Wait for the whole completion, cancelling it if the client goes away meanwhile."""
        parts = []
        checked = time.monotonic()
        try:
            while True:
                # Every DISCONNECT_POLL_S, whether or not events came meanwhile: a fast decoder
                # sends them more often than that, and would never be asked otherwise.
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; `finally` frees the slot
                try:
                    event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    continue
                if isinstance(event, Delta):
                    parts.append(event.text)
                elif isinstance(event, Failed):
                    raise APIError(event.message, status=500, kind="server_error")
                elif isinstance(event, Finished):
                    if event.reason not in ("stop", "length"):
                        raise APIError(f"the request ended early ({event.reason})", 503, kind="server_error")
                    parts.append(event.text)
                    text = "".join(parts)
                    return JSONResponse(
                        writer.response(
                            text, event.reason, event.prompt_tokens, event.completion_tokens, event.speckv
                        )
                    )
        finally:
            release(job)

    async def stream_events(
        job: Generation, writer: ResponseWriter, include_usage: bool
    ) -> AsyncIterator[str]:
        try:
            if writer.kind == "chat":
                yield sse(writer.chunk("", role=True))
            while True:
                event = await job.events.get()
                if isinstance(event, Delta):
                    yield sse(writer.chunk(event.text))
                elif isinstance(event, Failed):
                    yield sse(error_body(event.message, "server_error"))
                    break
                elif isinstance(event, Finished):
                    if event.reason not in ("stop", "length"):  # the server is shutting down
                        yield sse(error_body(f"the request ended early ({event.reason})", "server_error"))
                        break
                    if event.text:
                        yield sse(writer.chunk(event.text))
                    last = writer.chunk(None, reason=event.reason)
                    last["speckv"] = event.speckv
                    yield sse(last)
                    if include_usage:
                        yield sse(
                            writer.usage_chunk(event.prompt_tokens, event.completion_tokens, event.speckv)
                        )
                    break
            yield "data: [DONE]\n\n"
        finally:
            # Reached by the end of the stream, or by cancellation when the client disconnects.
            release(job)

    def release(job: Generation) -> None:
        if not job.done:
            job.cancel()
            scheduler.cancel(job)

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids of a conversation (`speckv.decoding.models.encode_messages`); its errors as 400s."""
    try:
        return models.encode_messages(tokenizer, messages)
    except SpecKVError as error:
        raise APIError(str(error), param="messages") from None
