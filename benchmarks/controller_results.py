"""Copy the key tables of a `speckv evaluate` run into benchmarks/RESULTS.md.

    python benchmarks/controller_results.py --eval runs/demo/eval [--command "how it was made"]

Writes section `controller-<pair>`: replay per compression level (every policy, modelled
tokens/s with 95% bootstrap CIs, share of the oracle's gain), SpecKV vs the best fixed γ in
hindsight (paired over prompts), per task, and the live runs (measured vs modelled tokens/s).
The tables are read from `speckv report`'s CSVs, which it (re)writes first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from speckv.pipeline.evaluation import REPORT_DIR, read_evaluation
from speckv.pipeline.report import write_report
from speckv.util.benchmark_header import RESULTS, write_section
from speckv.util.reporting import markdown_table

REPLAY_COLUMNS = [
    "compression", "policy", "chosen", "tokens_per_step", "mean_gamma", "acceptance",
    "tokens_per_s", "ci_low", "ci_high", "speedup", "oracle_share",
]  # fmt: skip
TASK_POLICIES = ["target only", "best fixed γ (hindsight)", "SpecKV (ours)", "oracle (tokens/s)"]
LIVE_COLUMNS = [
    "compression", "method", "measured_tokens_per_s", "modelled_tokens_per_s", "model_error_pct",
    "acceptance", "same_output",
]  # fmt: skip


def per_task(by_task: pd.DataFrame) -> pd.DataFrame:
    """Target only, the best fixed γ of each task and level, SpecKV and the oracle, side by side."""
    rows = by_task[by_task["policy"].isin(TASK_POLICIES)]
    return rows[["compression", "task", "policy", "chosen", "tokens_per_s", "speedup"]]


def gamma_shares(results: pd.DataFrame, policy: str = "SpecKV (ours)") -> pd.DataFrame:
    """Share of steps at each γ the policy verified, per compression level (replayed steps)."""
    rows = results[results["policy"] == policy]
    counts = (
        rows.explode("gammas")
        .astype({"gammas": int})
        .groupby(["compression", "gammas"])
        .size()
        .unstack(fill_value=0)
    )
    shares = counts.div(counts.sum(axis=1), axis=0)
    shares.columns = [f"γ={g}" for g in shares.columns]
    mean = (counts * counts.columns.to_numpy()).sum(axis=1) / counts.sum(axis=1)
    return shares.assign(mean_gamma=mean).reset_index()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", required=True, help="a `speckv evaluate --out` directory")
    parser.add_argument("--command", action="append", default=[], help="command lines that made it")
    parser.add_argument("--note", default="", help="conditions of the run worth knowing (machine load, …)")
    args = parser.parse_args()
    eval_dir = Path(args.eval)
    evaluation = read_evaluation(eval_dir)  # a complete evaluation only (one-line error otherwise)
    meta = evaluation.meta
    report = write_report(eval_dir, eval_dir / REPORT_DIR)
    tables = report.parent / "tables"
    replay = pd.read_csv(tables / "replay_by_compression.csv")
    parts = [
        f"### SpecKV controller, {meta['pair']}: replay and live",
        "Made by:\n\n```\n" + "\n".join(args.command or ["(see docs/controller.md)"]) + "\n```",
        f"Split `{meta['split']}` of the profile (prompts the draft and the controller never saw), "
        f"{meta['max_new_tokens']} new tokens, γ ≤ {meta['gamma_max']}, greedy. Modelled tokens/s: "
        "exact replay charged with the calibrated cost model; CI: 95% bootstrap over prompts; "
        "oracle share: (policy − target only) / (oracle − target only). " + args.note,
        "#### Replay per compression level",
        markdown_table(replay[[c for c in REPLAY_COLUMNS if c in replay.columns]], digits=3),
        "#### SpecKV vs the best fixed γ in hindsight (paired over prompts, tokens/s)",
        markdown_table(pd.read_csv(tables / "speckv_vs_best_fixed.csv"), digits=3),
        "#### γ chosen by SpecKV per compression level (share of replayed steps)",
        "Each level's cost curve sets how far drafting pays, so the same signals lead to other γ.",
        markdown_table(gamma_shares(evaluation.replay), digits=3),
        "#### Per task (modelled tokens/s, speed-up over target only)",
        markdown_table(per_task(pd.read_csv(tables / "replay_by_task.csv")), digits=3),
    ]
    if evaluation.live is not None:  # not a stale table of an earlier report
        live = evaluation.live
        parts += [
            "#### Live runs (wall clock, median of repeats)",
            markdown_table(live[[c for c in LIVE_COLUMNS if c in live.columns]], digits=2),
            markdown_table(pd.read_csv(tables / "live_verdict.csv"), digits=3),
        ]
    levels = ",".join(dict.fromkeys(str(level) for level in replay["compression"]))
    threads = meta.get("threads", "not recorded (see the commands)")  # `speckv evaluate`'s, not this script's
    write_section(f"controller-{meta['pair']}", "\n\n".join(parts), level=levels, threads=threads)
    print(f"wrote section controller-{meta['pair']} of {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
