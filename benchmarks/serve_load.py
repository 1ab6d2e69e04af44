"""Load test of `speckv serve`: concurrent streaming clients on loopback, one server or a sweep.

One server:

    python benchmarks/serve_load.py --demo [--clients 4] [--requests 32] [--duration 300] [--max-tokens 64]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [--model NAME] ...

Each client sends streaming chat requests (greedy, prompts from a fixed list) one after another
until `--requests` have been sent in all or `--duration` seconds have passed, whichever comes
first, so a run always ends by itself. With `--demo` the script starts `speckv serve --demo` on a
free port (with `--max-running` = clients unless given, extra options after `--`), waits for
/health, and stops it at the end; with `--url` it loads a server already running. Reports
requests and errors, completion tokens per second over the run (all clients together), time to
first token (TTFT) and time per output token after the first (TPOT), p50 and p95, and the
server's speculative counters over the run from /metrics, into benchmarks/RESULTS.md (section
`serve_load-c<clients>`) unless `--no-results`.

A sweep of server configurations against concurrency:

    python benchmarks/serve_load.py --configs target,fixed2,fixed3,speckv,table --clients 1,2,4,8 \\
        [--requests 32] [--duration 300] [--max-tokens 64] [--long-prompt-probe] [-- --threads 1]

Each configuration is its own `speckv serve --demo` process (its options, then those after `--`,
`--max-running` = the most clients unless given): `target` (--no-draft), `fixedN` (--controller
fixed:N), `speckv` (--controller speckv), `table` (--controller batch-table), or `NAME=OPTIONS`.
A server that does not start is recorded with its own error line and the sweep goes on. Per
configuration and concurrency ("cell"): requests from the test split of the mixed prompt set
(tasks interleaved, the same requests in every cell, at most `--requests` or `--duration` s), the
figures above, and the server's resident memory (VmRSS) before, at its sampled peak during, and
after the cell. Then: the best fixed γ per concurrency, the `speckv` config's margin over the best
other config with a bootstrap CI over requests, TTFT p95 at 4 clients against 1, and with
`--long-prompt-probe` the TTFT of a short request sent while a ~4,000-token prompt is being
read. Writes section `serve_sweep` of RESULTS.md and a plot of tokens/s and TPOT against
concurrency (benchmarks/figures/serve_sweep.png) unless `--no-results`.

This file generates the load and drives the servers; the records, statistics and tables are in
benchmarks/serve_report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_report import (  # noqa: E402  (a sibling script: the records, statistics and tables)
    LONG_PROMPT_TOKENS,
    Cell,
    ConfigRun,
    Outcome,
    Probe,
    max_running,
    plot_sweep,
    report,
    server_option,
    sweep_report,
)

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
SECTION = "serve_sweep"
BENCHMARKS = Path(__file__).resolve().parent  # RESULTS.md's folder: its links start here
FIGURE = BENCHMARKS / "figures" / f"{SECTION}.png"
# Named configurations; `fixedN` is `--controller fixed:N`, anything else is `NAME=OPTIONS`.
CONFIGS = {
    "target": ["--no-draft"],
    "speckv": ["--controller", "speckv"],
    "table": ["--controller", "batch-table"],
}
# The long-prompt probe: the words its prompt of LONG_PROMPT_TOKENS takes. The rate was measured
# with the demo target's tokenizer over the test split's articles (40,890 tokens, 29,469 words).
TOKENS_PER_WORD = 1.39
LONG_PROMPT_INSTRUCTION = "Summarize the following articles in 2-3 sentences.\n\n"


async def one_request(client: httpx.AsyncClient, model: str | None, prompt: str, index: int, args) -> Outcome:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": args.ignore_eos,
    } | ({"model": model} if model else {})
    sent_at = time.perf_counter()
    first = last = None
    tokens = prompt_tokens = 0

    def failed(error: str) -> Outcome:
        return Outcome(False, index, sent_at, time.perf_counter(), error=error)

    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return failed(f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    return failed(chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
                if any(c["delta"].get("content") for c in chunk["choices"]):
                    last = time.perf_counter()
                    first = first or last
    except httpx.HTTPError as error:
        return failed(type(error).__name__)
    return Outcome(True, index, sent_at, time.perf_counter(), tokens, prompt_tokens, first, last)


async def run_load(
    url: str, model: str | None, prompts: Sequence[str], clients: int, requests: int, args
) -> tuple[list[Outcome], float]:
    """`clients` streaming clients, each sending its next request when its last one ends, until
    `requests` are sent or `--duration` s have passed; the outcomes and the wall time."""
    outcomes: list[Outcome] = []
    sent = 0
    deadline = time.monotonic() + args.duration

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.monotonic() < deadline:
            index = sent
            sent += 1
            prompt = prompts[index % len(prompts)]
            outcomes.append(await one_request(client, model, prompt, index, args))

    limits = httpx.Limits(max_connections=clients + 2)
    timeout = httpx.Timeout(args.request_timeout)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
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


class ServerFailed(Exception):
    """The server exited or did not answer /health in time; the message says how."""


def relay(stream, last: deque) -> None:
    """Copy the server's stderr to ours, keeping its last line: the error a failed start printed."""
    for line in stream:
        sys.stderr.write(line)
        if line.strip():
            last.append(line.strip())


def start_server(args, extra: list[str], max_running: int) -> tuple[subprocess.Popen, str]:
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
    if server_option(extra, "--max-running") is None:
        command += ["--max-running", str(max_running)]
    process = subprocess.Popen(command + extra, stderr=subprocess.PIPE, text=True)
    last: deque[str] = deque(maxlen=1)
    relaying = threading.Thread(target=relay, args=(process.stderr, last), daemon=True)
    relaying.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            relaying.join(5)  # the pipe closes with the process: its last line is in by then
            said = f": {last[0]}" if last else ""
            raise ServerFailed(f"the server exited with code {process.returncode}{said}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise ServerFailed(f"the server did not answer /health within {args.startup_timeout} s")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the sweep ---------------------------------------------------------------------------------


def parse_configs(text: str) -> dict[str, list[str]]:
    """`--configs`: comma-separated names (target, fixedN, speckv, table) or `NAME=SERVER OPTIONS`,
    to the options each server gets. Controllers are not checked here: the server says what it
    does not know, and the sweep records that and goes on."""
    configs: dict[str, list[str]] = {}
    for item in (part.strip() for part in text.split(",")):
        name, given, options = item.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"--configs has an empty name in {text!r}")
        if given:
            server_args = shlex.split(options)
        elif name in CONFIGS:
            server_args = CONFIGS[name]
        elif match := re.fullmatch(r"fixed(\d+)", name):
            server_args = ["--controller", f"fixed:{match[1]}"]
        else:
            raise ValueError(
                f"unknown config {name!r}: use {', '.join(CONFIGS)}, fixedN or NAME=SERVER OPTIONS"
            )
        if name in configs:
            raise ValueError(f"config {name!r} is named twice in --configs")
        configs[name] = server_args
    return configs


def interleave(items: Sequence) -> list:
    """Items taken round-robin across their tasks (in order of first appearance), so that the first
    requests of a run mix the tasks whatever the run's length."""
    by_task: dict[str, list] = {}
    for item in items:
        by_task.setdefault(item.task, []).append(item)
    rounds = itertools.zip_longest(*by_task.values())
    return [item for row in rounds for item in row if item is not None]


def status_kib(text: str, name: str) -> int:
    """Field `name` (VmRSS, VmHWM) of a /proc/<pid>/status text, in KiB."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            number, unit = value.split()
            if unit != "kB":
                raise ValueError(f"{name} is in {unit!r}, not kB")
            return int(number)
    raise ValueError(f"no {name} line in the process status")


def rss_mib(pid: int, name: str = "VmRSS") -> float:
    return status_kib(Path(f"/proc/{pid}/status").read_text(), name) / 1024


class RssSampler:
    """The peak VmRSS of a process while the block runs, sampled every `interval` s on a thread.
    VmHWM is the peak since the process started, so it cannot give one cell's peak."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except OSError:  # the process is gone; the run records its failure
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def long_prompt(articles: Sequence[str], words: int) -> str:
    """A summarization prompt of `words` words: the articles in order, each cut (at a sentence end
    where one is near) to the words still wanted."""
    from speckv.datasets import SUMMARY_INSTRUCTION, truncate_words

    parts, count = [], 0
    for article in articles:
        if count >= words:
            break
        part = truncate_words(article.removeprefix(SUMMARY_INSTRUCTION), words - count)
        parts.append(part)
        count += len(part.split())
    if count < words:
        raise ValueError(f"the articles give only {count} of the {words} words asked for")
    return LONG_PROMPT_INSTRUCTION + "\n\n".join(parts)


async def probe_long_prompt(url: str, long_text: str, short_text: str, args) -> Probe:
    """Send the long prompt; once the server has admitted it (its /health counts it running),
    send the short one. The short request's TTFT is what a client waits behind a long prompt."""
    timeout = httpx.Timeout(args.request_timeout)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        long = asyncio.create_task(one_request(client, None, long_text, 0, args))
        deadline = time.monotonic() + args.request_timeout
        while not long.done() and time.monotonic() < deadline:
            if (await client.get("/health")).json().get("running", 0) >= 1:
                break
            await asyncio.sleep(0.01)
        short = await one_request(client, None, short_text, 1, args)
        return Probe(await long, short)


def run_config(name: str, server_args: list[str], args, extra: list[str], prompts: list[str]) -> ConfigRun:
    run = ConfigRun(name, server_args)
    try:
        process, url = start_server(args, server_args + extra, max_running(args))
    except ServerFailed as error:
        run.failure = str(error)
        print(f"serve_load: {name}: {error}", file=sys.stderr)
        return run
    pid = process.pid
    try:
        run.rss_idle = rss_mib(pid)
        asyncio.run(run_load(url, None, prompts, 1, 1, args))  # warm-up, not counted
        for clients in args.clients:
            before, rss_before = counters(url), rss_mib(pid)
            with RssSampler(pid) as sampler:
                outcomes, wall_s = asyncio.run(run_load(url, None, prompts, clients, args.requests, args))
            after = counters(url)
            spec = {key: after[key] - before[key] for key in COUNTERS}
            cell = Cell(name, clients, outcomes, wall_s, spec, (rss_before, sampler.peak, rss_mib(pid)))
            run.cells.append(cell)
            print(
                f"serve_load: {name} × {clients} clients: {len(cell.done)} requests, "
                f"{len(cell.errors)} errors, {cell.tokens_per_s:.1f} tokens/s",
                file=sys.stderr,
            )
        if args.long_prompt_probe:
            run.probe = asyncio.run(probe_long_prompt(url, *probe_prompts(url, args), args))
        run.rss_end, run.rss_hwm = rss_mib(pid), rss_mib(pid, "VmHWM")
    except (httpx.HTTPError, OSError) as error:
        # The server died or stopped answering mid-sweep: keep what this config measured.
        run.failure = f"stopped after {len(run.cells)} cell(s): {type(error).__name__}: {error}"
        print(f"serve_load: {name}: {run.failure}", file=sys.stderr)
    finally:
        stop_server(process)
    return run


def probe_prompts(url: str, args) -> tuple[str, str]:
    """The long prompt, kept inside the served context with room for the reply (and a tenth
    spare, as its length in tokens is estimated from words), and the shortest test chat prompt."""
    from speckv.datasets import load_prompts

    test = load_prompts("mixed", split="test")
    context = httpx.get(url + "/v1/models", timeout=30).json()["data"][0].get("max_model_len")
    tokens = LONG_PROMPT_TOKENS
    if context is not None:
        tokens = min(tokens, int(0.9 * (context - args.max_tokens)))
    articles = [item.text for item in test if item.task == "summarization"]
    short = min((item.text for item in test if item.task == "chat"), key=len)
    return long_prompt(articles, int(tokens / TOKENS_PER_WORD)), short


def sweep(args, extra: list[str]) -> None:
    from speckv.datasets import load_prompts

    prompts = [item.text for item in interleave(load_prompts("mixed", split="test"))]
    runs = [run_config(name, options, args, extra, prompts) for name, options in args.configs.items()]
    figure = args.figure or (None if args.no_results else FIGURE)
    link = None
    if figure is not None and any(r.cells for r in runs):
        plot_sweep(runs, figure)
        shown = figure.resolve()
        link = shown.relative_to(BENCHMARKS).as_posix() if shown.is_relative_to(BENCHMARKS) else str(shown)
        print(f"serve_load: plot in {figure}", file=sys.stderr)
    body = sweep_report(runs, args, extra, link)
    from speckv.util.benchmark_header import write_section  # imports torch: after the run

    level = server_option(extra, "--compression") or "server default"
    threads = server_option(extra, "--threads") or "server default"
    print(write_section(SECTION, body, level=level, threads=threads, write=not args.no_results))


def client_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"client counts must be distinct and positive: {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--demo", action="store_true", help="start `speckv serve --demo` for the run")
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument(
        "--configs",
        help="sweep: start one `speckv serve --demo` per config, comma-separated: target, fixedN, speckv, "
        "table, or NAME=SERVER OPTIONS",
    )
    parser.add_argument("--model", help="model name to send (default: none, the server's own)")
    parser.add_argument(
        "--clients",
        type=client_counts,
        help="concurrent streaming clients (default 4); a sweep takes a list (default 1,2,4,8)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=32,
        help="requests in all (a sweep: per config and concurrency; default 32)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=300.0,
        help="stop sending after this many seconds (a sweep: per cell)",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--ignore-eos", action="store_true", help="every request decodes exactly --max-tokens"
    )
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for a server")
    parser.add_argument(
        "--long-prompt-probe",
        action="store_true",
        help=f"sweep: per server, the TTFT of a short request sent while a ~{LONG_PROMPT_TOKENS}-token prompt is read",
    )
    parser.add_argument(
        "--figure",
        type=Path,
        help=f"sweep: where the plot goes (default {FIGURE.relative_to(BENCHMARKS.parent)}; none with "
        "--no-results unless given)",
    )
    parser.add_argument(
        "--no-results", action="store_true", help="do not write benchmarks/RESULTS.md (nor the sweep's plot)"
    )
    args, extra = parser.parse_known_args()
    extra = [part for part in extra if part != "--"]  # options after `--` go to `speckv serve`
    if extra and args.url:
        parser.error(f"unknown options {extra} (server options only go with --demo or --configs)")
    if args.requests < 1 or args.duration <= 0 or args.max_tokens < 1:
        parser.error("--requests, --duration and --max-tokens must be positive")
    if args.configs is not None:
        if args.model:
            parser.error("--model goes with --demo or --url: a sweep's servers answer to their own name")
        try:
            args.configs = parse_configs(args.configs)
        except ValueError as error:
            parser.error(str(error))
        args.clients = args.clients or [1, 2, 4, 8]
        sweep(args, extra)
        return
    if args.long_prompt_probe or args.figure:
        parser.error("--long-prompt-probe and --figure go with --configs (a sweep)")
    args.clients = args.clients or [4]
    if len(args.clients) != 1:
        parser.error("one server runs one --clients count; a list goes with --configs")
    process = None
    url = args.url.rstrip("/") if args.url else None
    if args.demo:
        try:
            process, url = start_server(args, extra, args.clients[0])
        except ServerFailed as error:
            raise SystemExit(str(error)) from None
    try:
        before = counters(url)
        outcomes, wall_s = asyncio.run(
            run_load(url, args.model, PROMPTS, args.clients[0], args.requests, args)
        )
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
        f"serve_load-c{args.clients[0]}", body, level=level, threads=threads, write=not args.no_results
    )
    print(text)


if __name__ == "__main__":
    main()
