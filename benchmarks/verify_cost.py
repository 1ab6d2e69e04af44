"""Target forward time by number of tokens scored at once (the verification cost curve), per level.

    python benchmarks/verify_cost.py [--compression fp32,bf16,int8,nf4] [--threads 1,2] [--ks 1,2,3,4,8,16,32]

On CPUs the kernel chosen for k = 2 or 3 rows can be slower than for 4 or 8, which decides which γ
pays; bf16 on a CPU with AMX is nearly flat in k. Median over repeats of one forward of k tokens on
top of a 200-token KV cache. Writes one table per level into benchmarks/RESULTS.md (section
`verify_cost-<precision>`) unless --no-write.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from speckv.cli.options import split_list
from speckv.decoding.models import load_model
from speckv.util.benchmark_header import write_section
from speckv.util.threads import configure_threads


def forward_ms(model, k: int, repeats: int, context: int = 200, vocab: int | None = None) -> float:
    """Median ms of one k-token forward (logits for all k) on a `context`-token cache."""
    device = next(model.parameters()).device
    high = min(5000, vocab or model.config.vocab_size)
    cache = DynamicCache(config=model.config)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        model(
            torch.randint(0, high, (1, context), device=device), cache=cache, use_cache=True, logits_to_keep=1
        )
        times = []
        for _ in range(repeats):
            ids = torch.randint(0, high, (1, k), device=device)
            sync()
            started = time.perf_counter()
            model(ids, cache=cache, use_cache=True, logits_to_keep=k)
            sync()
            times.append(time.perf_counter() - started)
            cache.crop(-k)
    return statistics.median(times) * 1000


def cost_table(
    model, ks: list[int], thread_counts: list[int | None], repeats: int, label: str = "torch threads"
) -> list[str]:
    """Markdown rows: one per thread count (None: leave torch's setting), one column per k."""
    lines = [f"| {label} | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for threads in thread_counts:
        if threads:
            torch.set_num_threads(threads)
        forward_ms(model, 1, 3)  # warm-up: first calls allocate and pick kernels
        times = [forward_ms(model, k, repeats) for k in ks]
        lines.append(
            f"| {threads or torch.get_num_threads()} | " + " | ".join(f"{t:.1f}" for t in times) + " |"
        )
        print(lines[-1], file=sys.stderr)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="demo")
    parser.add_argument("--compression", default="fp32", help="comma-separated levels (auto allowed)")
    parser.add_argument("--fp32-head", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", default=None, help="comma-separated thread counts (default: speckv's rule)"
    )
    parser.add_argument("--ks", default="1,2,3,4,5,6,7,8,9", help="tokens per pass to time")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    thread_counts = [int(t) for t in split_list(args.threads)] or [configure_threads(None)]
    ks = [int(k) for k in split_list(args.ks)]
    for level in split_list(args.compression):
        target = load_model(args.target, level, args.device, args.fp32_head)
        print(f"{target.precision}:", file=sys.stderr)
        lines = cost_table(target.model, ks, thread_counts, args.repeats)
        body = (
            f"### Target forward time (ms) by tokens per pass, {target.name} {target.precision}\n\n"
            f"Median of {args.repeats}, on a 200-token KV cache, {args.device}.\n\n" + "\n".join(lines) + "\n"
        )
        threads = ",".join(str(t) for t in thread_counts)  # the table has one row per count
        name = f"verify_cost-{target.precision}"
        print(write_section(name, body, level=target.precision, threads=threads, write=not args.no_write))
        del target


if __name__ == "__main__":
    main()
