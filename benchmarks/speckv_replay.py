"""SpecKV's decisions on this machine's cost curve, without the timing noise: exact replay.

    python benchmarks/speckv_replay.py                              # fp32 and bf16 where native
    python benchmarks/speckv_replay.py --levels fp32,int8 --per-task 8 --max-new-tokens 96

Live runs on a shared 2-core VM vary by ±20 % from one pass to the next, more than the gap between
two good schedules. Replay removes that noise: greedy output is the same under every policy, so
one recorded trace per prompt (the target's continuation, the draft's tokens and signals at every
position) scores each policy exactly through the engine's own step, charging each step the cost
curve measured on this machine (`--costs auto`, cached). Per level and task, on test-split prompts
neither the draft nor the controller was fitted on: the target alone, fixed γ, SpecKV (planning
on that curve, as live) and the oracle (the best γ per step in hindsight). Modelled tokens/s, as
speed-ups over the target alone; the draft's prefill is charged to every speculative row.
Writes `speckv_replay-<threads>t` into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from speckv import datasets
from speckv.controllers import make_controller
from speckv.decoding.draft_files import load_draft
from speckv.decoding.local_costs import local_costs
from speckv.decoding.models import default_precision, encode_prompt, load_model
from speckv.pipeline.profiling import record_trace
from speckv.pipeline.replay import cost_oracle, replay, target_only
from speckv.util.benchmark_header import write_section
from speckv.util.progress import progress_bar
from speckv.util.reporting import markdown_table
from speckv.util.threads import configure_threads

SPECKV = "SpecKV"


def level_table(level: str, args) -> tuple[pd.DataFrame, str]:
    """Speed-ups over the target alone per task (rows) and policy (columns), and the curve's source."""
    target = load_model("demo", level, "cpu")
    draft = load_draft("demo", target)
    choice = local_costs("auto", target, draft)
    cost = choice.cost
    gammas = [int(g) for g in args.gammas.split(",")]
    rows = []
    for task in args.tasks.split(","):
        datasets.fetch(task, progress=False)
        items = datasets.load_prompts(task, split="test", per_task=args.per_task)
        traces = [
            record_trace(target, draft, encode_prompt(target.tokenizer, item.text), args.max_new_tokens, 12)
            for item in progress_bar(items, desc=f"{level} {task}: recording", leave=False)
        ]
        alone = sum(target_only(trace, cost).time_s for trace in traces)
        row = {"task": task, "prompts": len(traces), "target only": 1.0}
        policies = {**{f"fixed γ={g}": f"fixed:{g}" for g in gammas}, SPECKV: "speckv"}
        for name, spec in policies.items():
            controller = make_controller(spec, 20, level)
            if name == SPECKV:
                controller.use_costs(cost, choice.source)
                controller.follow_costs = False  # the modelled times are the curve itself
            row[name] = alone / sum(replay(trace, controller, cost).time_s for trace in traces)
        row["oracle"] = alone / sum(cost_oracle(trace, cost).time_s for trace in traces)
        rows.append(row)
    return pd.DataFrame(rows), choice.source


def verdicts(table: pd.DataFrame) -> str:
    fixed = [c for c in table.columns if c.startswith("fixed")]
    lines = []
    for _, row in table.iterrows():
        best = max(fixed, key=lambda c: row[c])
        lines.append(
            f"- {row['task']}: SpecKV {row[SPECKV]:.2f}× the target alone, {row[SPECKV] / row[best]:.2f}× the "
            f"best fixed γ ({best}, {row[best]:.2f}×), {row[SPECKV] / row['oracle']:.0%} of the oracle's speed"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", help="target levels (default: fp32, and bf16 where native)")
    parser.add_argument("--per-task", type=int, default=8, help="test-split prompts per task")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--gammas", default="1,2,3,4,6", help="fixed γ values")
    parser.add_argument("--tasks", default=",".join(datasets.TASKS))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: speckv's rule)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    levels = args.levels.split(",") if args.levels else sorted({"fp32", default_precision("cpu")})
    started, sections = time.time(), []
    for level in levels:
        table, source = level_table(level, args)
        sections.append(
            f"#### {level} (cost curve {source})\n\n{markdown_table(table, digits=2)}\n\n{verdicts(table)}\n"
        )
        print(sections[-1], flush=True)
    body = (
        f"### SpecKV's decisions replayed on this machine's cost curves, {threads} threads\n\n"
        f"test-split prompts, {args.max_new_tokens} new tokens, greedy; modelled tokens/s as speed-ups over "
        f"the target alone (same curve, same traces). Run took {time.time() - started:.0f} s.\n\n"
        + "\n".join(sections)
    )
    if not args.no_write:
        write_section(f"speckv_replay-{torch.get_num_threads()}t", body, level=",".join(levels))


if __name__ == "__main__":
    main()
