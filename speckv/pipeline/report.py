"""`speckv report`: report.md with tables and figures from a complete `speckv evaluate` output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from speckv.pipeline.evaluation import read_evaluation
from speckv.pipeline.scoring import BEST_FIXED, LABELS, ORACLE, paired_comparisons, summarise
from speckv.util.files import check_output_path
from speckv.util.reporting import MarkdownReport, grouped_bars, line_chart, scatter_predicted_actual


def write_report(eval_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """report.md with tables and figures from a complete `speckv evaluate` output in `eval_dir`."""
    evaluation = read_evaluation(eval_dir)
    out_dir = check_output_path(out_dir, "--out", directory=True)
    meta, results = evaluation.meta, evaluation.replay
    doc = MarkdownReport(out_dir, "SpecKV controller evaluation")
    doc.text(
        f"Target/draft: {meta.get('pair', '?')}; held-out prompts: {results['prompt_id'].nunique()}; "
        f"max new tokens: {meta.get('max_new_tokens', '?')}; γ_max: {meta.get('gamma_max', '?')}; "
        f"controller: {meta.get('controller') or 'none'}. Greedy decoding: every policy emits the same "
        "tokens, so replay is exact; modelled tokens/s use the calibrated cost model. "
        "Intervals: 95% bootstrap over prompts."
    )

    overall = summarise(results, ["compression"], seed)
    doc.text("## Replay: every policy per compression level")
    doc.table("replay_by_compression", overall, _shown(overall, ["compression"]))
    doc.figure(
        grouped_bars(
            overall[~overall["policy"].str.startswith("fixed:")],
            "compression",
            "policy",
            "tokens_per_s",
            doc.figure_path("policy_tokens_per_s"),
            "Modelled tokens/s by policy (replay, held-out prompts)",
            "tokens/s",
            "ci_low",
            "ci_high",
        ),
        "Modelled tokens/s per policy and compression level, with 95% bootstrap intervals.",
    )
    doc.text("## SpecKV against the best fixed γ in hindsight (paired over prompts)")
    doc.table("speckv_vs_best_fixed", paired_comparisons(results, ["compression"], seed))

    fixed = overall[overall["policy"].str.startswith("fixed:")].assign(
        gamma=lambda f: f["policy"].str.partition(":")[2].astype(int)
    )
    doc.figure(
        line_chart(
            fixed,
            "gamma",
            "tokens_per_s",
            "compression",
            doc.figure_path("tokens_per_s_vs_gamma"),
            "Modelled tokens/s vs fixed γ",
            "tokens/s",
        ),
        "Tokens per second against a fixed γ, per compression level.",
    )
    doc.figure(
        line_chart(
            fixed,
            "gamma",
            "acceptance",
            "compression",
            doc.figure_path("acceptance_vs_gamma"),
            "Acceptance rate vs fixed γ",
            "accepted / drafted",
        ),
        "Acceptance rate against a fixed γ, per compression level.",
    )
    doc.figure(
        grouped_bars(
            overall[overall["policy"].isin([*LABELS.values(), "heuristic", "confidence", BEST_FIXED])],
            "compression",
            "policy",
            "oracle_share",
            doc.figure_path("oracle_share"),
            "Share of the oracle's gain over target-only captured",
            "share",
        ),
        "(policy − target only) / (oracle − target only), modelled tokens/s.",
    )
    by_task = summarise(results, ["compression", "task"], seed)
    doc.text("## Replay per task × compression")
    doc.table("replay_by_task", by_task, _shown(by_task, ["compression", "task"]))
    if evaluation.consistency is not None and not evaluation.consistency.empty:
        doc.text(
            "## Replay against live runs\n\nThe profile's live step records replayed: runs whose every "
            "step (γ drafted, accepted, tokens emitted) the replay reproduces."
        )
        doc.table("replay_consistency", evaluation.consistency)
    _gamma_over_time(doc, results)
    _predictor_section(doc, meta)
    live = evaluation.live
    if live is not None and not live.empty:
        doc.text(
            "## Live runs (wall clock)\n\nMedian tokens/s over repeats; modelled = the replay of the "
            "same policy on the same prompts; `same_output`: identical to target-only (lossless)."
        )
        doc.table("live", live)
        doc.text(
            "Per level: SpecKV (ours) against the fastest fixed γ and the fastest HF assisted configuration, live."
        )
        doc.table("live_verdict", live_verdict(live))
    return doc.write()


def live_verdict(live: pd.DataFrame) -> pd.DataFrame:
    """Per compression: ours vs the best live fixed γ and the best HF assisted row; cost-model error."""
    records = []
    for compression, part in live.groupby("compression", sort=False):
        rate = part.set_index("method")["measured_tokens_per_s"]
        fixed = rate[rate.index.str.startswith("fixed:")]
        hf = rate[rate.index.str.startswith("HF assisted")]
        ours = rate.get(LABELS["speckv"], np.nan)
        records.append(
            {
                "compression": compression,
                "speckv_tokens_per_s": ours,
                "best_fixed": fixed.idxmax() if len(fixed) else "",
                "vs_best_fixed": ours / fixed.max() if len(fixed) else np.nan,
                "best_hf": hf.idxmax() if len(hf) else "",
                "vs_best_hf": ours / hf.max() if len(hf) else np.nan,
                "all_lossless": bool(part["same_output"].all()),
                "mean_abs_model_error_pct": part["model_error_pct"].abs().mean(),
                "max_abs_model_error_pct": part["model_error_pct"].abs().max(),
            }
        )
    return pd.DataFrame(records)


def _shown(summary: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    shown = summary.assign(
        tokens_per_s=[
            f"{r:.2f} [{lo:.2f}, {hi:.2f}]"
            for r, lo, hi in zip(summary["tokens_per_s"], summary["ci_low"], summary["ci_high"], strict=True)
        ]
    )
    columns = [
        *by,
        "policy",
        "chosen",
        "tokens_per_step",
        "mean_gamma",
        "tokens_per_s",
        "speedup",
        "oracle_share",
    ]
    return shown[columns]


def _gamma_over_time(doc: MarkdownReport, results: pd.DataFrame) -> None:
    chosen = results[results["policy"].isin([LABELS["speckv"], ORACLE])]
    if chosen["policy"].nunique() < 2:
        return
    first = chosen["prompt_id"].iloc[0]
    rows = []
    for _, row in chosen[chosen["prompt_id"] == first].iterrows():
        rows += [
            {"step": i, "gamma": g, "series": f"{row['compression']} {row['policy']}"}
            for i, g in enumerate(row["gammas"])
        ]
    doc.figure(
        line_chart(
            pd.DataFrame(rows),
            "step",
            "gamma",
            "series",
            doc.figure_path("gamma_over_time"),
            f"γ drafted per step, prompt {first}",
            "tokens drafted",
        ),
        "Tokens drafted per step by SpecKV and by the oracle on one held-out prompt.",
    )


def _predictor_section(doc: MarkdownReport, meta: dict) -> None:
    info = meta.get("controller_info") or {}
    if not info.get("validation"):
        return
    doc.text(
        "## Acceptance predictors (validation prompts)\n\nPer drafted token, P(accepted | earlier "
        "tokens accepted) from decision-time features; scored on training-split prompts held out of fitting."
    )
    doc.table("predictors", pd.DataFrame(info["validation"]))
    calibration = pd.DataFrame(info.get("calibration", []))
    if not calibration.empty:
        doc.figure(
            scatter_predicted_actual(
                calibration["predicted"].to_numpy(),
                calibration["observed"].to_numpy(),
                doc.figure_path("predicted_vs_actual"),
                "Predicted vs observed acceptance (binned)",
                label="acceptance",
            ),
            "Mean predicted vs observed token acceptance in ten bins of the prediction.",
        )
