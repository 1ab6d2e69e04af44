"""Live tokens/s of the demo target's drafters side by side: each drafter under fixed γ and the
shipped SpecKV controller, the target alone, and Hugging Face assisted generation with the draft
model (HF cannot run a feature head).

    python benchmarks/drafter_speed.py --drafts demo-model,HEAD_DIR --gammas 3,4 --threads 2

Held-out prompts of every task, greedy, median of the passes; writes section
`drafter_speed-<level>` of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

from speckv import datasets
from speckv.decoding.draft_files import load_draft
from speckv.decoding.models import encode_prompt, load_model
from speckv.pipeline.compare import Method, compare, hf_assisted_methods, speedup_table
from speckv.util.benchmark_header import write_section
from speckv.util.threads import configure_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--drafts", default="demo-model", help="comma-separated drafter specs (names or directories)"
    )
    parser.add_argument("--compression", default="bf16")
    parser.add_argument("--gammas", default="3,4", help="fixed γ values per drafter")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-task", type=int, default=1, help="held-out prompts per task (4 tasks)")
    parser.add_argument("--assistant", default="demo-model", help="draft model of the HF assisted rows")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    configure_threads(args.threads)

    for task in datasets.TASKS:
        datasets.fetch(task, progress=False)
    items = datasets.load_prompts("mixed", split="heldout", per_task=args.per_task)
    target = load_model("demo", args.compression)
    prompts = [encode_prompt(target.tokenizer, item.text) for item in items]
    gammas = [int(g) for g in args.gammas.split(",")]
    methods = [Method("target only (speckv)")]
    for spec in args.drafts.split(","):
        methods += [Method(f"{spec} fixed γ={g}", controller=f"fixed:{g}", drafter=spec) for g in gammas]
        methods.append(Method(f"{spec} SpecKV (shipped)", controller="speckv", drafter=spec))
    methods += [m for m in hf_assisted_methods(tuple(gammas)) if "heuristic" not in m.name]
    assistant = load_draft(args.assistant, target)
    started = time.time()
    results = compare(target, None, prompts, methods, args.max_new_tokens, args.repeats, assistant=assistant)
    body = (
        f"### Drafters of the demo target, live, target {target.precision}\n\n"
        f"{len(prompts)} held-out prompts ({args.per_task} per task), {args.max_new_tokens} new tokens, "
        f"greedy, median of {args.repeats} passes; HF assisted rows run {assistant.name}; run took "
        f"{time.time() - started:.0f} s. At bf16 an output may differ from target-only's at a near-tie "
        "of the target's logits (docs/engine.md; `speckv check-lossless` checks that every divergence "
        f"is one).\n\n{speedup_table(results)}\n"
    )
    name = f"drafter_speed-{target.precision}"
    print(write_section(name, body, level=target.precision, write=not args.no_write))


if __name__ == "__main__":
    main()
