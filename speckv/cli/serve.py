"""`speckv serve`: an OpenAI-compatible server with adaptive speculative decoding (FastAPI + uvicorn)."""

from __future__ import annotations

import dataclasses
import logging
import os

from speckv.cli.options import (
    add_costs_option,
    add_model_options,
    add_policy_options,
    build_decoders,
    decoder_spec,
)
from speckv.errors import SpecKVError

log = logging.getLogger(__name__)
# Prompt tokens the target reads per pass beside the running requests' steps (chunked prefill):
# a long prompt is read over several passes instead of stalling every other request for all of it.
DEFAULT_PROMPT_BUDGET = 256


def register(sub) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the models over an OpenAI-compatible HTTP API (chat/completions, streaming, metrics)",
        description="OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, "
        "/metrics (Prometheus), /health. Models load once; requests are decoded with speculative "
        "decoding, interleaved step by step.",
    )
    models = add_model_options(parser)
    models.add_argument("--model-name", help="the model id clients send (default: the target's name)")
    add_policy_options(parser)
    add_costs_option(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    server.add_argument(
        "--max-running", type=int, default=4, help="sequences decoded at once, step by step (default 4)"
    )
    server.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for a slot; beyond: HTTP 429 (default 64)"
    )
    server.add_argument(
        "--prompt-budget",
        type=int,
        default=DEFAULT_PROMPT_BUDGET,
        help="prompt tokens read per target pass beside the running requests' steps (chunked "
        f"prefill; default {DEFAULT_PROMPT_BUDGET}): a long prompt cannot stall the other requests",
    )
    server.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="completion length when a request sets no max_tokens (default 256, capped by the context)",
    )
    server.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: the "
        "environment variable SPECKV_API_KEY; unset: no key)",
    )
    server.add_argument(
        "--docs", action="store_true", help="serve /docs, /redoc and /openapi.json (off by default)"
    )
    server.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    parser.set_defaults(func=run)


def build_app(args):
    """Check the options, load the models once and build the app (no server started)."""
    from speckv.server import ServedModel, create_app

    spec = decoder_spec(args)  # a bad spec fails at startup, not at the first request
    if args.max_running < 1 or args.max_queue < 0:
        raise SpecKVError("--max-running must be at least 1 and --max-queue at least 0")
    if args.prompt_budget < 1:
        raise SpecKVError(f"--prompt-budget must be at least 1, got {args.prompt_budget}")
    if args.default_max_tokens < 1:
        raise SpecKVError("--default-max-tokens must be at least 1")
    if not 0 <= args.port <= 65535:
        raise SpecKVError(f"--port must be in 0..65535, got {args.port}")
    api_key = api_key_of(args)
    # SpecKV shares each batch's pass out by its time over 2, 4, 8 … running requests, measured here
    sizes = tuple(rows for rows in (2, 4, 8, 16, 32) if rows <= args.max_running)
    factory = build_decoders(dataclasses.replace(spec, batch_rows=sizes))
    served = ServedModel(factory, args.model_name or factory.target.name)
    return create_app(
        served,
        args.max_running,
        args.max_queue,
        args.default_max_tokens,
        api_key=api_key,
        docs=args.docs,
        prompt_budget=args.prompt_budget,
    )


def api_key_of(args) -> str | None:
    """--api-key, else SPECKV_API_KEY; an empty one is refused rather than taken as "no key"."""
    if args.api_key is not None:
        if not args.api_key.strip():
            raise SpecKVError("--api-key is empty")
        return args.api_key
    key = os.environ.get("SPECKV_API_KEY")
    if key is not None and not key.strip():
        raise SpecKVError("SPECKV_API_KEY is set but empty: unset it to serve without a key")
    return key


def run(args) -> int:
    import uvicorn

    app = build_app(args)
    served = app.state.served
    how = f"{served.drafter_name}, {served.controller.describe()}" if served.drafter_name else "target only"
    key = ", API key required" if app.state.api_key else ""
    log.info(
        "serving '%s' (%s, %s) on http://%s:%s/v1%s",
        served.name,
        served.target.precision,
        how,
        args.host,
        args.port,
        key,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    except SystemExit as error:  # uvicorn exits this way when it cannot bind the port
        raise SpecKVError(f"the server could not start on {args.host}:{args.port}") from error
    return 0
