"""SpecKV's decisions on this machine's cost curve, without the timing noise: exact replay.

    python benchmarks/speckv_replay.py                              # fp32 and bf16 where native
    python benchmarks/speckv_replay.py --levels fp32,int8 --per-task 8 --max-new-tokens 96
    python benchmarks/speckv_replay.py --threads 1,2                # the same traces on two curves

Live runs on a shared 2-core VM vary by ±20 % from one pass to the next, more than the gap between
two good schedules. Replay removes that noise: greedy output is the same under every policy, so
one recorded trace per prompt (the target's continuation, the draft's tokens and signals at every
position, the prompt for n-gram copies) scores each policy exactly through the engine's own
step, charging each step the cost curve measured on this machine (`--costs auto`, cached; a copy
costs no draft pass). Per level and task, on test-split prompts neither the draft nor the
controller was fitted on, with each drafter SpecKV runs: the draft model's chains, per step the
model's chain or the n-gram continuation (`demo+ngram`, the shipped default) and the copies
alone; for each, fixed γ, SpecKV (planning on that curve, as live) and the oracle (the best step
in hindsight among those the drafter offers); for the model's chains also SpecKV planning on the
curve shipped in its file (measured elsewhere) but charged this machine's. Modelled tokens/s, as
speed-ups over the target alone; a row that runs the draft model pays its reading of the prompt
(at its first pass) and of the tokens it sat out since its last (`StepRecord.draft_read`).

With several `--threads`, each level's traces are recorded once and replayed on the curve measured
at each thread count: what changes is the machine's costs alone, so the tokens SpecKV verified
per step (0 = a plain target step) show how its decisions follow the curve. Writes
`speckv_replay-<threads>t` (e.g. `speckv_replay-1t-2t`) into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

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
SHIPPED = "SpecKV, shipped curve"


def level_section(level: str, args, thread_counts: list[int]) -> str:
    """Per thread count: the curve, speed-ups over the target alone per drafter and policy (rows)
    and task (columns), the verdicts, and the default SpecKV's verified widths per task. Traces
    are recorded with the most threads (greedy output does not depend on the count)."""
    torch.set_num_threads(max(thread_counts))
    target = load_model("demo", level, "cpu")
    draft = load_draft("demo", target)
    traces = {}
    for task in args.tasks.split(","):
        datasets.fetch(task, progress=False)
        items = datasets.load_prompts(task, split="test", per_task=args.per_task)
        traces[task] = [
            record_trace(target, draft, encode_prompt(target.tokenizer, item.text), args.max_new_tokens, 12)
            for item in progress_bar(items, desc=f"{level} {task}: recording", leave=False)
        ]
    parts = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        choice = local_costs("auto", target, draft)
        table, widths = replay_table(traces, choice, level, args)
        tasks = list(traces)
        curve = ", ".join(f"{1e3 * t:.1f}" for t in choice.cost.t_verify_s)
        parts.append(
            f"#### {level}, {threads} thread(s)\n\nCost curve {choice.source}: t_verify(1..{len(choice.cost.t_verify_s)}) "
            f"[{curve}] ms, t_draft {1e3 * choice.cost.t_draft_s:.1f} ms.\n\n"
            f"{markdown_table(table, digits=2)}\n\n{verdicts(table, tasks)}\n"
            + f"\nSpecKV's ({DEFAULT}) tokens verified per step (0: a plain target step; c: copies):\n{widths}\n"
        )
    return "\n".join(parts)


# Each drafter a replay runs, as the live drafter spec names it.
DRAFTERS = {"model": "demo", "model+ngram": "demo+ngram", "ngram": "ngram"}
DEFAULT = "demo+ngram"


def replay_table(traces: dict, choice, level: str, args) -> tuple[pd.DataFrame, str]:
    """Each policy with each drafter replayed on every task's traces at `choice`'s curve: speed-ups
    (rows: drafter and policy; columns: tasks), and the default's verified widths per task."""
    cost = choice.cost
    gammas = [int(g) for g in args.gammas.split(",")]
    rows, widths = {}, []
    for task, recorded in traces.items():
        alone = sum(target_only(trace, cost).time_s for trace in recorded)
        rows.setdefault(("–", "target only"), {})[task] = 1.0
        for source, name in DRAFTERS.items():
            policies = {**{f"fixed γ={g}": f"fixed:{g}" for g in gammas}, SPECKV: "speckv"}
            if source == "model":
                policies[SHIPPED] = "speckv"
            for policy, spec in policies.items():
                controller = make_controller(spec, 20, level)
                if policy == SPECKV:
                    controller.use_costs(cost, choice.source)
                if policy in (SPECKV, SHIPPED):
                    # The modelled times are this machine's curve itself: nothing to follow. The
                    # shipped row plans on the controller file's curve, measured elsewhere, and
                    # pays this one's.
                    controller.follow_costs = False
                shown = policy == SPECKV and name == DEFAULT  # its widths are reported
                runs = [
                    replay(trace, controller, cost, keep_records=shown, drafter=source) for trace in recorded
                ]
                rows.setdefault((name, policy), {})[task] = alone / sum(run.time_s for run in runs)
                if shown:
                    widths.append(f"- {task}: {width_shares([r for run in runs for r in run.records])}")
            oracle_s = sum(cost_oracle(trace, cost, source).time_s for trace in recorded)
            rows.setdefault((name, "oracle"), {})[task] = alone / oracle_s
    table = pd.DataFrame([{"drafter": d, "policy": p, **speedups} for (d, p), speedups in rows.items()])
    return table, "\n".join(widths)


def width_shares(records) -> str:
    """Shares of the steps by tokens verified, copies marked: "0: 40%  3: 35%  3c: 25%"."""
    counts = Counter(f"{r.gamma}c" if r.copied else str(r.gamma) for r in records)
    order = sorted(counts, key=lambda k: (int(k.rstrip("c")), k))
    return "  ".join(f"{k}: {counts[k] / len(records):.0%}" for k in order)


def verdicts(table: pd.DataFrame, tasks: list[str]) -> str:
    """Per task, the default SpecKV against the target alone, the fastest row that is not SpecKV's
    (the best fixed γ of any drafter, or the target alone where no drafting pays) and its
    drafter's oracle."""
    lines = []
    cells = table.set_index(["drafter", "policy"])
    for task in tasks:
        rows = cells[task].to_dict()
        ours = rows[(DEFAULT, SPECKV)]
        other = max((k for k in rows if k[1] not in (SPECKV, SHIPPED, "oracle")), key=rows.get)
        lines.append(
            f"- {task}: SpecKV ({DEFAULT}) {ours:.2f}× the target alone, {ours / rows[other]:.2f}× the "
            f"fastest other row ({' '.join(other).lstrip('– ')}, {rows[other]:.2f}×), "
            f"{ours / rows[(DEFAULT, 'oracle')]:.0%} of its oracle's speed"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", help="target levels (default: fp32, and bf16 where native)")
    parser.add_argument("--per-task", type=int, default=8, help="test-split prompts per task")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--gammas", default="1,2,3,4,6", help="fixed γ values")
    parser.add_argument("--tasks", default=",".join(datasets.TASKS))
    parser.add_argument(
        "--threads",
        help="torch CPU threads (default: speckv's rule), or several (1,2): the same traces on each count's curve",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    thread_counts = [configure_threads(int(n)) for n in args.threads.split(",")] if args.threads else []
    thread_counts = thread_counts or [configure_threads(None)]
    levels = args.levels.split(",") if args.levels else sorted({"fp32", default_precision("cpu")})
    started, sections = time.time(), []
    for level in levels:
        sections.append(level_section(level, args, thread_counts))
        print(sections[-1], flush=True)
    threads = "-".join(f"{n}t" for n in thread_counts)
    body = (
        f"### SpecKV's decisions replayed on this machine's cost curves, {' and '.join(map(str, thread_counts))} threads\n\n"
        f"{args.per_task} test-split prompts per task, {args.max_new_tokens} new tokens, greedy; modelled tokens/s as speed-ups over "
        f"the target alone (same curve, same traces). Run took {time.time() - started:.0f} s.\n\n"
        + "\n".join(sections)
    )
    if not args.no_write:
        write_section(f"speckv_replay-{threads}", body, level=",".join(levels))


if __name__ == "__main__":
    main()
