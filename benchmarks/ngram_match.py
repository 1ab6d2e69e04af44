"""The n-gram drafter's match lengths, chosen by measurement: exact greedy replay along a profile.

    python benchmarks/ngram_match.py --profile runs/demo

The n-gram drafter reads only the text, so a greedy step from position t is exact offline: its
context is the prompt plus the target's own continuation up to t, and it accepts the common
prefix of its proposals and the target's next tokens. For each match range MIN-MAX and γ, every
step of every test-split trace of the profile is replayed; the table gives accepted tokens per
step, the share of steps that proposed anything, and the tokens/s the profile's cost model
predicts (no draft cost: t_verify(γ' + 1) + t_step per step, γ' = tokens proposed). Writes
`ngram_match` into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from speckv.costs import load_costs
from speckv.datasets import in_split
from speckv.decoding.drafters import NGramDrafter
from speckv.decoding.verify import SamplingConfig
from speckv.pipeline.profiling import load_traces, read_settings
from speckv.util.benchmark_header import write_section
from speckv.util.reporting import markdown_table

RANGES = ((1, 2), (1, 4), (2, 4), (3, 4), (2, 6), (3, 8), (4, 8))


def replay_ngram(
    prompt: list[int], tokens: list[int], low: int, high: int, gamma: int
) -> list[tuple[int, int]]:
    """(proposed, accepted) per step of greedy decoding with the n-gram drafter along `tokens`."""
    drafter = NGramDrafter(vocab_size=1, min_match=low, max_match=high)
    drafter.begin()
    steps, t = [], 0
    while t < len(tokens):
        context = prompt + tokens[:t]
        proposed = [
            p.token for p in drafter.draft(context, min(gamma, len(tokens) - t - 1), SamplingConfig(), None)
        ]
        accepted = 0
        while accepted < len(proposed) and proposed[accepted] == tokens[t + accepted]:
            accepted += 1
        steps.append((len(proposed), accepted))
        t += accepted + 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, help="a profile directory (speckv profile)")
    parser.add_argument("--compression", default="bf16", help="the level whose traces and costs to use")
    parser.add_argument("--costs", help="cost model JSON (default PROFILE/cost.json)")
    parser.add_argument("--gammas", default="2,4,8")
    parser.add_argument("--split", default="test")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    _, prompts = read_settings(args.profile)
    token_ids = {p["id"]: list(p["token_ids"]) for p in prompts}
    traces = [t for t in load_traces(args.profile, [args.compression]) if in_split(t.prompt_id, args.split)]
    cost = load_costs(args.costs or Path(args.profile) / "cost.json")[args.compression]
    gammas = [int(g) for g in args.gammas.split(",")]
    rows = []
    for low, high in RANGES:
        for gamma in gammas:
            if gamma > cost.gamma_max:
                continue
            for trace in traces:
                steps = replay_ngram(token_ids[trace.prompt_id], trace.tokens, low, high, gamma)
                seconds = sum(cost.t_verify_s[p] + cost.t_step_s for p, _ in steps)
                rows.append(
                    {
                        "task": trace.task,
                        "range": f"{low}-{high}",
                        "gamma": gamma,
                        "steps": len(steps),
                        "tokens": len(trace.tokens),
                        "accepted": sum(a for _, a in steps),
                        "proposing": sum(p > 0 for p, _ in steps),
                        "seconds": seconds,
                        "target_seconds": len(trace.tokens) * (cost.t_verify_s[0] + cost.t_step_s),
                    }
                )
    frame = pd.DataFrame(rows)
    grouped = frame.groupby(["task", "range", "gamma"], sort=False).sum(numeric_only=True)
    table = pd.DataFrame(
        {
            "accepted / step": grouped["accepted"] / grouped["steps"],
            "steps proposing": grouped["proposing"] / grouped["steps"],
            "modelled speed-up": grouped["target_seconds"] / grouped["seconds"],
        }
    ).reset_index()
    best = table.loc[table.groupby("task", sort=False)["modelled speed-up"].idxmax()]
    overall = frame.groupby(["range", "gamma"], sort=False).sum(numeric_only=True)
    overall = (overall["target_seconds"] / overall["seconds"]).rename("modelled speed-up").reset_index()
    body = (
        f"### N-gram match lengths, target {args.compression}\n\nExact greedy replay of the "
        f"n-gram drafter along {len(traces)} {args.split}-split traces of `{args.profile}`, modelled with "
        f"its cost model.\n\nAll tasks together:\n\n{markdown_table(overall, digits=3)}\n\n"
        f"Best per task:\n\n{markdown_table(best, digits=3)}\n\nEvery setting:\n\n{markdown_table(table, digits=3)}\n"
    )
    # A replay: no model runs, so torch's thread count does not enter the numbers.
    text = write_section(
        "ngram_match", body, level=args.compression, threads="n/a (replay)", write=not args.no_write
    )
    print(text)


if __name__ == "__main__":
    main()
