"""Wall-clock comparison on the demo pair: our engine vs transformers, target-only and speculative.

    python benchmarks/engine_speed.py                       # fp32, 128 tokens, 8 prompts, median of 3
    python benchmarks/engine_speed.py --compression int8 --gammas 2,3,4

Writes its table into benchmarks/RESULTS.md (section `engine_speed-<compression>`) under the
suite's run header (speckv.util.benchmark_header), and prints it.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from speckv import datasets
from speckv.decoding.draft_files import load_draft
from speckv.decoding.models import encode_prompt, load_model
from speckv.pipeline.compare import Method, compare, hf_assisted_methods, speedup_table
from speckv.util.benchmark_header import write_section
from speckv.util.threads import configure_threads


def default_methods(gammas: tuple[int, ...] = (2, 3, 4, 5), with_hf: bool = True) -> list[Method]:
    methods = [Method("target only (speckv)")]
    if with_hf:
        methods.append(Method("target only (HF generate)", hf=True))
    methods += [Method(f"speckv fixed γ={g}", controller=f"fixed:{g}") for g in gammas]
    methods += [
        Method("speckv heuristic", controller="heuristic"),
        Method("speckv confidence", controller="confidence"),
    ]
    if with_hf:
        methods += hf_assisted_methods(gammas)
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", default="fp32", help="target level (auto allowed; default fp32)")
    parser.add_argument("--fp32-head", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--draft", default="demo", help="draft directory, `demo`, or `none` (target-only rows)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-task", type=int, default=2, help="held-out prompts per task (4 tasks)")
    parser.add_argument("--gammas", default="2,3,4,5", help="fixed γ values to compare")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: speckv's rule, docs/engine.md)"
    )
    args = parser.parse_args()
    configure_threads(args.threads)

    for task in datasets.TASKS:
        datasets.fetch(task, progress=False)
    items = datasets.load_prompts("mixed", split="heldout", per_task=args.per_task)
    target = load_model("demo", args.compression, "cpu", args.fp32_head)
    draft = None if args.draft == "none" else load_draft(args.draft, target)
    prompts = [encode_prompt(target.tokenizer, item.text) for item in items]
    gammas = tuple(int(g) for g in args.gammas.split(","))
    if draft is None:
        methods = [Method("target only (speckv)")] + (
            [] if args.no_hf else [Method("target only (HF generate)", hf=True)]
        )
    else:
        methods = default_methods(gammas, with_hf=not args.no_hf)

    started = time.time()
    results = compare(target, draft, prompts, methods, args.max_new_tokens, args.repeats)
    table = speedup_table(results)
    body = (
        f"### Demo pair, target {target.precision}, draft {draft.name if draft else 'none'}\n\n"
        f"{len(prompts)} held-out prompts ({args.per_task} per task), "
        f"{args.max_new_tokens} new tokens, greedy, tokens/s = total tokens / total time per pass, "
        f"median of {args.repeats} passes (each pass listed); transformers {transformers.__version__}. "
        f"Run took {time.time() - started:.0f} s.\n\n{table}\n"
    )
    # One section per setting; runs with more than one thread get their own (a 2-core CPU
    # verifies several tokens relatively cheaper with 2 threads, so the ratios differ).
    threads = "" if torch.get_num_threads() == 1 else f"-{torch.get_num_threads()}threads"
    name = f"engine_speed-{target.precision}-{'draft' if draft else 'no-draft'}{threads}"
    print(write_section(name, body, level=target.precision, write=not args.no_write))


if __name__ == "__main__":
    main()
