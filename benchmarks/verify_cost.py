"""Target forward time by number of tokens scored at once (the verification cost curve).

    python benchmarks/verify_cost.py [--compression fp32] [--threads 1,2] [--max-k 9]

On CPUs the BLAS kernel chosen for k = 2 or 3 rows can be slower than for 4 or 8, which decides
which γ pays. Median over repeats of one forward of k tokens on top of a 200-token KV cache.
Writes its table into benchmarks/RESULTS.md (section `verify_cost-<compression>`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from speckv.decoding.models import load_model
from speckv.pipeline.compare import write_results_section

RESULTS = Path(__file__).parent / "RESULTS.md"


def forward_ms(model, k: int, repeats: int, context: int = 200) -> float:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.randint(100, 5000, (1, context)), cache=cache, use_cache=True, logits_to_keep=1)
        times = []
        for _ in range(repeats):
            ids = torch.randint(100, 5000, (1, k))
            started = time.perf_counter()
            model(ids, cache=cache, use_cache=True, logits_to_keep=k)
            times.append(time.perf_counter() - started)
            cache.crop(-k)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", default="fp32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--max-k", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    model = load_model("demo", args.compression).model
    ks = range(1, args.max_k + 1)
    header = "| torch threads | " + " | ".join(f"k={k}" for k in ks) + " |"
    lines = [header, "|---|" + "---:|" * len(ks)]
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        forward_ms(model, 1, 3)  # warm-up
        times = [forward_ms(model, k, args.repeats) for k in ks]
        lines.append(f"| {threads} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
        print(lines[-1], file=sys.stderr)
    command = " ".join(["python benchmarks/verify_cost.py", *sys.argv[1:]])
    body = (
        f"### Target forward time (ms) by tokens per pass, demo target {args.compression}\n\n`{command}` — "
        f"median of {args.repeats}, on a 200-token KV cache.\n\n" + "\n".join(lines) + "\n"
    )
    print(body)
    write_results_section(RESULTS, f"verify_cost-{args.compression}", body)


if __name__ == "__main__":
    main()
