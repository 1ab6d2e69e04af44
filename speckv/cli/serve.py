"""`speckv serve`: an OpenAI-compatible server with adaptive speculative decoding (FastAPI + uvicorn)."""

from __future__ import annotations

import sys

from speckv.cli.options import add_precision_options, add_threads_option, configure_threads
from speckv.errors import SpecKVError


def register(sub) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the models over an OpenAI-compatible HTTP API (chat/completions, streaming, metrics)",
        description="OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, "
        "/metrics (Prometheus), /health. Models load once; requests are decoded with speculative "
        "decoding, interleaved step by step.",
    )
    models = parser.add_argument_group("models")
    models.add_argument(
        "--demo", action="store_true", help="the demo pair: SmolLM2-135M-Instruct and the shipped draft"
    )
    models.add_argument("--target", help="Hugging Face id, local model directory or .gguf file")
    drafts = models.add_mutually_exclusive_group()
    drafts.add_argument(
        "--draft",
        help="drafter: a draft model (directory, .gguf or HF id; `demo` = the shipped one) or "
        "ngram[:MIN-MAX] (model-free, copies from the prompt and output)",
    )
    drafts.add_argument("--no-draft", action="store_true", help="decode with the target alone")
    add_precision_options(models)
    models.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    add_threads_option(models)
    models.add_argument("--model-name", help="the model id clients send (default: the target's name)")
    policy = parser.add_argument_group("speculation length")
    choice = policy.add_mutually_exclusive_group()
    choice.add_argument("--gamma", type=int, help="draft exactly this many tokens per step (1-64)")
    choice.add_argument(
        "--controller",
        help="fixed:N | tree:N | heuristic[:N] | confidence[:TAU] | confidence-fixed[:TAU] | speckv[:PATH] "
        "(default: with --demo the shipped speckv controller where it knows the compression level, else fixed:4)",
    )
    policy.add_argument(
        "--gamma-max", type=int, default=20, help="budget cap for adaptive controllers (default 20)"
    )
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
        "--default-max-tokens",
        type=int,
        default=256,
        help="completion length when a request sets no max_tokens (default 256, capped by the context)",
    )
    server.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    parser.set_defaults(func=run)


def build_app(args):
    """Check the options, load the models once and build the app (no server started)."""
    from speckv.controllers import check_gamma, default_controller, make_controller
    from speckv.decoding.drafters import make_drafter
    from speckv.decoding.models import load_model, resolve_compression, resolve_device
    from speckv.server import ServedModel, create_app

    if args.demo and args.target:
        raise SpecKVError("--demo already chooses the target; drop --target or --demo")
    if not args.demo and not args.target:
        raise SpecKVError("choose a target with --target PATH (or use --demo)")
    draft_source = args.draft or ("demo" if args.demo and not args.no_draft else None)
    if draft_source is None and not args.no_draft:
        raise SpecKVError("choose a draft with --draft PATH, or --no-draft to decode with the target alone")
    if args.gamma is not None:
        check_gamma(args.gamma)
    check_gamma(args.gamma_max, "--gamma-max")
    if args.max_running < 1 or args.max_queue < 0:
        raise SpecKVError("--max-running must be at least 1 and --max-queue at least 0")
    if args.default_max_tokens < 1:
        raise SpecKVError("--default-max-tokens must be at least 1")
    if not 0 <= args.port <= 65535:
        raise SpecKVError(f"--port must be in 0..65535, got {args.port}")
    compression = resolve_compression(args.compression, resolve_device(args.device))  # auto → a level
    configure_threads(args.threads)
    controller = None
    if draft_source:
        # Built once here so a bad spec fails at startup; each request gets a copy.
        controller = make_controller(
            args.controller
            or (f"fixed:{args.gamma}" if args.gamma else default_controller(args.demo, compression)),
            gamma_max=args.gamma_max,
            compression=compression,
        )
    target = load_model("demo" if args.demo else args.target, compression, args.device, args.fp32_head)
    draft = None
    if draft_source:
        first = make_drafter(draft_source, target, tree=controller.tree)  # loads a draft model once
        # A draft model is shared by every request's drafter; a model-free drafter is remade per request.
        draft = first.loaded or (lambda: make_drafter(draft_source, target, tree=controller.tree))
    served = ServedModel(target, draft, controller, args.model_name or target.name)
    return create_app(served, args.max_running, args.max_queue, args.default_max_tokens)


def run(args) -> int:
    import uvicorn

    app = build_app(args)
    served = app.state.served
    how = f"{served.drafter_name}, {served.controller.describe()}" if served.drafter_name else "target only"
    print(
        f"speckv: serving '{served.name}' ({served.target.precision}, {how}) on "
        f"http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    except SystemExit as error:  # uvicorn exits this way when it cannot bind the port
        raise SpecKVError(f"the server could not start on {args.host}:{args.port}") from error
    return 0
