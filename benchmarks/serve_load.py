"""Load test of `speckv serve`: N concurrent streaming clients on loopback.

    python benchmarks/serve_load.py --demo [--clients 4] [--requests 32] [--duration 300] [--max-tokens 64]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [--model NAME] ...

Each client sends streaming chat requests (greedy, prompts from a fixed list) one after another
until `--requests` have been sent in all or `--duration` seconds have passed, whichever comes
first, so a run always ends by itself. With `--demo` the script starts `speckv serve --demo` on a
free port (with `--max-running` = clients unless given, extra options after `--`), waits for
/health, and stops it at the end; with `--url` it loads a server already running.

Reports requests and errors, completion tokens per second over the run (all clients together),
time to first token (TTFT) and time per output token after the first (TPOT), p50 and p95, and
the server's speculative counters over the run from /metrics. Writes its table into
benchmarks/RESULTS.md (section `serve_load-c<clients>`) unless `--no-results`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in three sentences why the sky is blue.",
    "What is 17 times 23? Show your steps.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Give three tips for writing clear commit messages.",
    "Write a haiku about autumn rain.",
    "How does binary search work? Answer briefly.",
    "List the planets of the solar system in order from the sun.",
]
COUNTERS = {
    "drafts": "speckv:spec_decode_num_drafts",
    "draft_tokens": "speckv:spec_decode_num_draft_tokens",
    "accepted": "speckv:spec_decode_num_accepted_tokens",
}


@dataclass
class Outcome:
    ok: bool
    tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    error: str = ""


async def one_request(client: httpx.AsyncClient, model: str | None, prompt: str, args) -> Outcome:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": args.ignore_eos,
    } | ({"model": model} if model else {})
    started = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return Outcome(False, error=f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    return Outcome(False, error=chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any(c["delta"].get("content") for c in chunk["choices"]):
                    last = time.perf_counter()
                    first = first or last
    except httpx.HTTPError as error:
        return Outcome(False, error=type(error).__name__)
    if first is None:
        return Outcome(True, tokens)
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Outcome(True, tokens, first - started, tpot)


async def run_load(url: str, model: str | None, args) -> tuple[list[Outcome], float]:
    outcomes: list[Outcome] = []
    sent = 0
    deadline = time.monotonic() + args.duration

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < args.requests and time.monotonic() < deadline:
            prompt = PROMPTS[(sent + index) % len(PROMPTS)]
            sent += 1
            outcomes.append(await one_request(client, model, prompt, args))

    limits = httpx.Limits(max_connections=args.clients + 2)
    timeout = httpx.Timeout(args.request_timeout)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(args.clients)))
        return outcomes, time.perf_counter() - started


def counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    values = {name: 0.0 for name in COUNTERS}
    for family in text_string_to_metric_families(text):
        for key, name in COUNTERS.items():
            if family.name == name:
                values[key] = sum(s.value for s in family.samples if s.name == name + "_total")
    return values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "speckv",
        "serve",
        "--demo",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    if "--max-running" not in extra:
        command += ["--max-running", str(args.clients)]
    process = subprocess.Popen(command + extra)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise SystemExit(f"the server did not answer /health within {args.startup_timeout} s")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def server_option(extra: list[str], name: str) -> str | None:
    """The value of `name` among the options passed to `speckv serve` (`--name V` or `--name=V`)."""
    for i, part in enumerate(extra):
        if part == name and i + 1 < len(extra):
            return extra[i + 1]
        if part.startswith(name + "="):
            return part.partition("=")[2]
    return None


def percentiles(values: list[float]) -> tuple[str, str]:
    if not values:
        return "–", "–"
    p50, p95 = np.percentile(values, [50, 95])
    return f"{1e3 * p50:.0f}", f"{1e3 * p95:.0f}"


def report(outcomes: list[Outcome], wall_s: float, spec: dict[str, float], args, extra: list[str]) -> str:
    done = [o for o in outcomes if o.ok]
    errors = [o.error for o in outcomes if not o.ok]
    tokens = sum(o.tokens for o in done)
    ttft = percentiles([o.ttft_s for o in done if o.ttft_s is not None])
    tpot = percentiles([o.tpot_s for o in done if o.tpot_s is not None])
    acceptance = spec["accepted"] / spec["draft_tokens"] if spec["draft_tokens"] else 0.0
    per_draft = spec["accepted"] / spec["drafts"] if spec["drafts"] else 0.0
    server = "`speckv serve --demo " + " ".join(extra) + "`" if args.demo else f"server at {args.url}"
    lines = [
        "| clients | requests | errors | tokens/s | TTFT p50 (ms) | TTFT p95 | TPOT p50 (ms) | TPOT p95 "
        "| accepted / drafted | accepted per draft step |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.clients} | {len(done)} | {len(errors)} | {tokens / wall_s:.1f} | {ttft[0]} | {ttft[1]} "
        f"| {tpot[0]} | {tpot[1]} | {acceptance:.1%} | {per_draft:.2f} |",
    ]
    body = (
        f"### Serving load, {args.clients} concurrent streaming client{'s' if args.clients > 1 else ''}\n\n"
        f"{server}, "
        f"greedy chat requests of at most {args.max_tokens} tokens, {tokens} tokens in {wall_s:.1f} s "
        f"on {os.cpu_count()} CPUs.\n\n" + "\n".join(lines) + "\n"
    )
    if errors:
        body += f"\nErrors: {', '.join(sorted(set(errors)))}\n"
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--demo", action="store_true", help="start `speckv serve --demo` for the run")
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", help="model name to send (default: none, the server's own)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent streaming clients (default 4)")
    parser.add_argument("--requests", type=int, default=32, help="requests in all (default 32)")
    parser.add_argument("--duration", type=float, default=300.0, help="stop sending after this many seconds")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--ignore-eos", action="store_true", help="every request decodes exactly --max-tokens"
    )
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for --demo")
    parser.add_argument("--no-results", action="store_true", help="do not write benchmarks/RESULTS.md")
    args, extra = parser.parse_known_args()
    extra = [part for part in extra if part != "--"]  # options after `--` go to `speckv serve`
    if extra and not args.demo:
        parser.error(f"unknown options {extra} (server options only go with --demo)")
    if args.clients < 1 or args.requests < 1 or args.duration <= 0 or args.max_tokens < 1:
        parser.error("--clients, --requests, --duration and --max-tokens must be positive")
    process = None
    url = args.url.rstrip("/") if args.url else None
    if args.demo:
        process, url = start_server(args, extra)
    try:
        before = counters(url)
        outcomes, wall_s = asyncio.run(run_load(url, args.model, args))
        after = counters(url)
    finally:
        if process is not None:
            stop_server(process)
    spec = {key: after[key] - before[key] for key in COUNTERS}
    body = report(outcomes, wall_s, spec, args, extra)
    from speckv.util.benchmark_header import write_section  # imports torch: after the run

    # The server's settings, not this client's: what `--demo` passed it, else unknown here.
    known = "server default" if args.demo else "the server's (not known here)"
    level = server_option(extra, "--compression") or known
    threads = server_option(extra, "--threads") or known
    text = write_section(
        f"serve_load-c{args.clients}", body, level=level, threads=threads, write=not args.no_results
    )
    print(text)


if __name__ == "__main__":
    main()
