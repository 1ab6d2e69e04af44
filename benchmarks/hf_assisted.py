"""transformers' `generate` with SpecKV's controller against transformers' own assisted schedules.

    python benchmarks/hf_assisted.py                                  # auto level, 2 test-split prompts per task
    python benchmarks/hf_assisted.py --compression fp32 --threads 1 --write

On the demo pair (the draft model, shown to transformers on the full vocabulary), per task, in one
run, interleaved prompt by prompt, median of --repeats passes, on prompts neither the draft nor the
controller was fitted on: the target alone (`generate`), transformers' assisted generation with its
defaults (in transformers 5: 20 tokens a step, constant, with its adaptive confidence threshold),
its heuristic schedule from 20 (+2 after a fully accepted step, -1 otherwise), constant γ, and the
same loop with SpecKV's controller deciding each step's draft (`custom_generate=SpecKVAssisted(draft)`,
`speckv.integrations.hf`); then SpecKV's own engine with the same controller, for what the loop
costs. Every row must give the target's own tokens (column "same output").
Prints the tables; writes `hf_assisted-<precision>-<threads>t` into benchmarks/RESULTS.md with --write.
"""

from __future__ import annotations

import argparse
import time

import torch

from speckv import datasets
from speckv.decoding.draft_files import load_draft
from speckv.decoding.models import encode_prompt, load_model
from speckv.pipeline.compare import Method, MethodResult, compare, speedup_table
from speckv.util.benchmark_header import write_section
from speckv.util.threads import configure_threads

BASELINE = "target only (HF generate)"
OURS = "HF + SpecKV controller (custom_generate)"
ENGINE = "SpecKV engine, same controller"


def methods(gammas: list[int], controller: str) -> list[Method]:
    def constant(g: int) -> dict:
        return {
            "num_assistant_tokens": g,
            "num_assistant_tokens_schedule": "constant",
            "assistant_confidence_threshold": 0.0,
        }

    return [
        Method(BASELINE, hf=True),
        Method("HF assisted (defaults)", hf=True, hf_assistant={}),
        Method(
            "HF assisted (heuristic from 20)",
            hf=True,
            hf_assistant={**constant(20), "num_assistant_tokens_schedule": "heuristic"},
        ),
        *(Method(f"HF assisted (constant γ={g})", hf=True, hf_assistant=constant(g)) for g in gammas),
        Method(OURS, hf=True, hf_controller=controller),
        Method(ENGINE, controller=controller),
    ]


def verdict(results: list[MethodResult]) -> str:
    """Ours against the target alone and the fastest HF schedule, and the tokens it verified."""
    by_name = {r.method.name: r for r in results}
    ours = by_name[OURS]
    rate, alone = ours.median_tokens_per_s, by_name[BASELINE].median_tokens_per_s
    schedules = [r for r in results if r.method.name.startswith("HF assisted")]
    best = max(schedules, key=lambda r: r.median_tokens_per_s)
    engine = by_name[ENGINE].median_tokens_per_s
    return (
        f"{OURS}: {rate / alone:.2f}× the target alone, {rate / best.median_tokens_per_s:.2f}× the fastest "
        f"HF schedule ({best.method.name}), {rate / engine:.2f}× SpecKV's own engine; tokens verified per "
        f"drafting step: {ours.width_shares()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", default="auto", help="target level (default auto)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-task", type=int, default=2, help="prompts per task")
    parser.add_argument("--split", default="test", help="prompt split (default test: never fitted on)")
    parser.add_argument("--tasks", default=",".join(datasets.TASKS))
    parser.add_argument("--gammas", default="2,4", help="γ of the constant HF rows")
    parser.add_argument("--controller", default="speckv", help="SpecKV controller spec (default speckv)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: speckv's rule)")
    parser.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = parser.parse_args()
    threads = configure_threads(args.threads)

    target = load_model("demo", args.compression, "cpu")
    draft = load_draft("demo", target)
    chosen = methods([int(g) for g in args.gammas.split(",")], args.controller)
    started = time.time()
    sections, sources = [], set()
    for task in args.tasks.split(","):
        datasets.fetch(task, progress=False)
        items = datasets.load_prompts(task, split=args.split, per_task=args.per_task)
        prompts = [encode_prompt(target.tokenizer, item.text) for item in items]
        results = compare(target, draft, prompts, chosen, args.max_new_tokens, args.repeats)
        sources.update(r.cost_source for r in results if r.cost_source and r.method.name == OURS)
        sections.append(
            f"#### {task} ({len(prompts)} prompts)\n\n{speedup_table(results, baseline=BASELINE)}\n\n"
            f"{verdict(results)}\n"
        )
        print(sections[-1], flush=True)
    body = (
        f"### transformers assisted generation with SpecKV's controller, target {target.precision}, "
        f"draft {draft.name}, {threads} threads\n\n"
        f"{args.split}-split prompts, {args.max_new_tokens} new tokens, greedy, median of {args.repeats} "
        f"passes; controller {args.controller}, cost curve {', '.join(sorted(sources)) or 'none'}. "
        f"Run took {time.time() - started:.0f} s.\n\n" + "\n".join(sections)
    )
    write_section(
        f"hf_assisted-{target.precision}-{torch.get_num_threads()}t",
        body,
        level=target.precision,
        write=args.write,
    )


if __name__ == "__main__":
    main()
