"""How often a k-token pass and a 1-token pass pick different argmaxes, per precision and head.

    python benchmarks/near_ties.py [--levels bf16,bf16:no-head,fp16,fp32] [--k 4] [--tokens 64] [--threads 1]

Along fixed sequences (the fp32 target's own greedy continuations of the paper prompts) the target
scores every position twice: one token per forward (target-only decoding) and k tokens per forward
(a verify pass). A flip is a position where the two argmaxes differ: where speculative decoding
can leave target-only output. Counting flips on the same positions for every setting measures
what the fp32 head removes far more tightly than comparing free-running outputs, and the largest
margin of a flip (in ulp of the top logit) tests the near-tie tolerance (8 ulp). Also times the forward at k = 1 and k.
Writes its table into benchmarks/RESULTS.md (section `near_ties`) unless --no-write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from speckv.cli.options import split_list
from speckv.decoding.cache import CachedModel
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.models import LoadedModel, encode_prompt, load_model
from speckv.pipeline.lossless import ulp
from speckv.util.benchmark_header import write_section
from speckv.util.threads import configure_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verify_cost import forward_ms  # noqa: E402  (a sibling script)


def argmaxes(
    target: LoadedModel, prompt: list[int], tokens: list[int], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits rows predicting tokens[1:], scored one token per forward and k tokens per forward."""
    rows = {}
    for width in (1, k):
        model = CachedModel(target)
        model.feed(prompt, keep=1)
        scored = []
        for start in range(0, len(tokens) - 1, width):
            chunk = tokens[start : start + width][: len(tokens) - 1 - start]
            scored.append(model.feed(chunk, keep=len(chunk)).logits[0].float())
        rows[width] = torch.cat(scored)
    return rows[1], rows[k]


def flips(target: LoadedModel, prompts, sequences, k: int) -> tuple[int, int, float]:
    """(flips, positions, largest margin of a flip in the 1-token pass, in ulp of its top logit)."""
    count = total = 0
    worst = 0.0
    for prompt, tokens in zip(prompts, sequences, strict=True):
        single, wide = argmaxes(target, prompt, tokens, k)
        a, b = single.argmax(-1), wide.argmax(-1)
        total += len(a)
        for i in torch.nonzero(a != b).flatten().tolist():
            count += 1
            best = float(single[i, a[i]])
            margin = best - float(single[i, b[i]])
            worst = max(worst, margin / ulp(target.compute_dtype, best))
    return count, total, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--levels", default="bf16,bf16:fp32-head,fp32", help="LEVEL[:fp32-head|:no-head], comma-separated"
    )
    parser.add_argument("--k", type=int, default=4, help="tokens per verify pass")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=20, help="paper prompts")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: speckv's rule)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    from speckv.datasets import load_prompts

    reference = load_model("demo", "fp32")
    prompts = [encode_prompt(reference.tokenizer, item.text) for item in load_prompts("paper")][
        : args.prompts
    ]
    decoder = SpeculativeDecoder(reference, eos_token_ids=())
    sequences = [decoder.generate(p, args.tokens).token_ids for p in prompts]
    del reference, decoder
    lines = [
        f"| precision | flips / positions | per 1000 | largest flip margin (ulp) | ms k=1 | ms k={args.k} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for spec in split_list(args.levels):
        level, _, head = spec.partition(":")
        target = load_model("demo", level, fp32_head={"fp32-head": True, "no-head": False}.get(head))
        count, total, worst = flips(target, prompts, sequences, args.k)
        times = [forward_ms(target.model, k, 9) for k in (1, args.k)]
        lines.append(
            f"| {target.precision} | {count} / {total} | {1000 * count / total:.1f} | {worst:.2f} | "
            f"{times[0]:.1f} | {times[1]:.1f} |"
        )
        print(lines[-1], file=sys.stderr)
    body = (
        f"### Argmax flips between a {args.k}-token and a 1-token pass, demo target\n\n"
        f"{len(prompts)} paper prompts, the fp32 target's {args.tokens}-token greedy continuations; "
        "times: median of 9 forwards on a 200-token cache.\n\n" + "\n".join(lines) + "\n"
    )
    print(write_section("near_ties", body, level=args.levels, threads=threads, write=not args.no_write))


if __name__ == "__main__":
    main()
