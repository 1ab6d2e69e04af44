"""Chains, token trees and n-gram candidates, live on held-out prompts, per task.

    python benchmarks/tree_speed.py                                  # auto precision, 2 prompts per task
    python benchmarks/tree_speed.py --compression nf4 --trees 4,8,16 --per-task 3

For each task of the four benchmark sets: the target alone, chains (fixed γ), trees of 4/8/16/32
nodes grown best-first by the same draft, the second tree size with an n-gram branch, the n-gram
drafter alone, side by side in one run (median of --repeats passes). Writes `tree_speed-<precision>` into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from speckv import datasets
from speckv.cli.options import configure_threads
from speckv.decoding.draft_files import load_draft
from speckv.decoding.models import encode_prompt, load_model
from speckv.pipeline.compare import Method, compare, speedup_table, write_results_section

RESULTS = Path(__file__).parent / "RESULTS.md"


def methods(gammas: list[int], trees: list[int], ngram: list[int]) -> list[Method]:
    return [
        Method("target only (speckv)"),
        *(Method(f"chain fixed γ={g}", controller=f"fixed:{g}") for g in gammas),
        *(Method(f"tree:{n}", controller=f"tree:{n}") for n in trees),
        *(
            Method(f"tree:{n} + n-gram branch", controller=f"tree:{n}", drafter="demo+ngram")
            for n in trees[1:2]
        ),
        *(Method(f"n-gram fixed γ={g}", controller=f"fixed:{g}", drafter="ngram") for g in ngram),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", default="auto", help="target level (default auto)")
    parser.add_argument("--draft", default="demo")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-task", type=int, default=2, help="held-out prompts per task")
    parser.add_argument("--gammas", default="2,3,4", help="chain γ values")
    parser.add_argument("--trees", default="4,8,16,32", help="tree sizes (nodes)")
    parser.add_argument("--ngram", default="2,4", help="γ of the n-gram drafter rows")
    parser.add_argument("--tasks", default=",".join(datasets.TASKS))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: speckv's rule)")
    args = parser.parse_args()
    configure_threads(args.threads)

    def numbers(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    target = load_model("demo", args.compression, "cpu")
    draft = load_draft(args.draft, target)
    chosen = methods(numbers(args.gammas), numbers(args.trees), numbers(args.ngram))
    started = time.time()
    sections = []
    for task in args.tasks.split(","):
        datasets.fetch(task, progress=False)
        items = datasets.load_prompts(task, split="heldout", per_task=args.per_task)
        prompts = [encode_prompt(target.tokenizer, item.text) for item in items]
        results = compare(target, draft, prompts, chosen, args.max_new_tokens, args.repeats)
        per_step = "  ".join(f"{r.method.name}: {r.new_tokens / max(r.steps, 1):.2f}" for r in results[1:])
        sections.append(
            f"#### {task} ({len(prompts)} prompts)\n\n{speedup_table(results)}\n\n"
            f"Tokens per step: {per_step}\n"
        )
        print(sections[-1], flush=True)
    command = "python benchmarks/tree_speed.py " + " ".join(sys.argv[1:])
    body = (
        f"### Chains, trees and n-grams, target {target.precision}, draft {draft.name}\n\n"
        f"`{command.strip()}` — held-out prompts, {args.max_new_tokens} new tokens, greedy, "
        f"median of {args.repeats} passes. Machine: {platform.machine()}, {torch.get_num_threads()} "
        f"torch threads. Run took {time.time() - started:.0f} s.\n\n" + "\n".join(sections)
    )
    if not args.no_write:
        write_results_section(RESULTS, f"tree_speed-{target.precision}", body)


if __name__ == "__main__":
    main()
