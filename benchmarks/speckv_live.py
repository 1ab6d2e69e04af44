"""SpecKV where it runs: this machine's cost curve and live following, against every alternative.

    python benchmarks/speckv_live.py                       # auto level, 4 test-split prompts per task
    python benchmarks/speckv_live.py --compression fp32 --threads 1 --max-new-tokens 64

Per task, side by side in one run (median of --repeats passes), on prompts neither the draft nor
the controller was fitted on: the target alone; chains of fixed γ from the default drafter (the
model's chain, or the n-gram continuation wherever the text's suffix has a long earlier match:
`--draft demo+ngram`); the shipped SpecKV controller on the model's chains, planning with the
cost curve shipped in its file and not following live times (how it ran before), and with this
machine's measured curve followed live; the same controller with the default drafter, choosing
per step; the same over the n-gram drafter alone; the n-gram drafter alone at fixed γ; and a
fixed tree with the n-gram branch. (Fixed γ on the model's chains alone is in the replay,
`benchmarks/speckv_replay.py`, which scores every drafter without timing noise.) Then, per task,
each SpecKV row against the target alone, the best fixed γ in hindsight and the fastest row that
is not SpecKV, and how many tokens it verified per step. About 20 minutes at bf16 on 2 cores.
Each SpecKV row's verdict is a pooled ratio with a 90 % paired bootstrap interval over prompts
and repeats (`speckv.pipeline.compare.paired_speedup`). `--core` keeps only the rows the verdict
of the default needs, for more prompts in the same time. Writes `speckv_live-<precision>-<threads>t`
(`speckv_live-core-…` with `--core`) into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from speckv import datasets
from speckv.decoding.draft_files import load_draft
from speckv.decoding.models import encode_prompt, load_model
from speckv.pipeline.compare import (
    Method,
    MethodResult,
    compare,
    paired_speedup,
    speedup_summary,
    speedup_table,
)
from speckv.util.benchmark_header import write_section
from speckv.util.threads import configure_threads

OURS = "SpecKV (this machine's curve, live)"
BEFORE = "SpecKV (shipped curve, static)"
SWITCHING = "SpecKV, model or n-gram per step"
COPYING = "SpecKV, n-gram alone"


def methods(gammas: list[int], core: bool = False) -> list[Method]:
    """Every row; `core`: only the target alone, the fixed γ chains and SpecKV with the default
    drafter (the rows the verdict needs, for more prompts in the same time)."""
    if core:
        return [
            Method("target only (speckv)"),
            *(
                Method(f"chain fixed γ={g}, model or n-gram", controller=f"fixed:{g}", drafter="demo+ngram")
                for g in gammas
            ),
            Method(SWITCHING, controller="speckv", drafter="demo+ngram"),
        ]
    return [
        Method("target only (speckv)"),
        *(
            Method(f"chain fixed γ={g}, model or n-gram", controller=f"fixed:{g}", drafter="demo+ngram")
            for g in gammas
        ),
        Method(BEFORE, controller="speckv", costs="shipped", follow_costs=False),
        Method(OURS, controller="speckv"),
        Method(SWITCHING, controller="speckv", drafter="demo+ngram"),
        Method(COPYING, controller="speckv", drafter="ngram"),
        Method("n-gram fixed γ=4", controller="fixed:4", drafter="ngram"),
        Method("tree:8 + n-gram branch", controller="tree:8", drafter="demo+ngram"),
    ]


def verdict(results: list[MethodResult], name: str) -> str:
    """SpecKV row `name` against the target alone, the fastest row not SpecKV's and the best fixed
    γ in hindsight of this task (pooled tokens/s, paired bootstrap interval over prompts and
    repeats, the best row chosen again in each round: `paired_speedup`), and its widths."""
    ours = next(r for r in results if r.method.name == name)
    fixed = [r for r in results if r.method.name.startswith("chain fixed")]
    best = max(fixed, key=lambda r: r.pooled_tokens_per_s)
    return (
        f"{speedup_summary(results, name)}, {paired_speedup(ours, fixed)} the best fixed γ (pooled: "
        f"{best.method.name}); tokens verified per drafting step: {ours.width_shares()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", default="auto", help="target level (default auto)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-task", type=int, default=4, help="prompts per task")
    parser.add_argument("--split", default="test", help="prompt split (default test: never fitted on)")
    parser.add_argument("--gammas", default="1,2,3,4", help="chain γ values")
    parser.add_argument("--tasks", default=",".join(datasets.TASKS))
    parser.add_argument("--core", action="store_true", help="only the rows the verdict needs")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: speckv's rule)")
    args = parser.parse_args()
    threads = configure_threads(args.threads)

    target = load_model("demo", args.compression, "cpu")
    draft = load_draft("demo", target)
    chosen = methods([int(g) for g in args.gammas.split(",")], args.core)
    started = time.time()
    sections = []
    for task in args.tasks.split(","):
        datasets.fetch(task, progress=False)
        items = datasets.load_prompts(task, split=args.split, per_task=args.per_task)
        prompts = [encode_prompt(target.tokenizer, item.text) for item in items]
        results = compare(target, draft, prompts, chosen, args.max_new_tokens, args.repeats)
        sections.append(
            f"#### {task} ({len(prompts)} prompts)\n\n{speedup_table(results)}\n\n"
            + "\n\n".join(verdict(results, m.name) for m in chosen if m.name in (OURS, SWITCHING, COPYING))
            + "\n"
        )
        print(sections[-1], flush=True)
    sources = sorted({r.cost_source for r in results if r.cost_source and r.method.name in (OURS, SWITCHING)})
    body = (
        f"### SpecKV on this machine, target {target.precision}, draft {draft.name}, {threads} threads\n\n"
        f"{args.split}-split prompts, {args.max_new_tokens} new tokens, greedy, median of {args.repeats} "
        f"passes, each from a fresh controller; cost curve {', '.join(sources)}. Run took {time.time() - started:.0f} s.\n\n"
        + "\n".join(sections)
    )
    if not args.no_write:
        core = "core-" if args.core else ""
        write_section(
            f"speckv_live-{core}{target.precision}-{torch.get_num_threads()}t", body, level=target.precision
        )


if __name__ == "__main__":
    main()
