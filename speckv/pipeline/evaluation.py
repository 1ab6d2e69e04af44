"""`speckv evaluate` and `speckv report`: every γ policy scored by exact replay and live runs.

Replay (design §4) scores each policy on the held-out prompts' traces: tokens per step, modelled
tokens per second under the calibrated cost model, and the share of the oracle's gain over
target-only decoding it captures, with bootstrap intervals over prompts and paired comparisons
against the best fixed γ in hindsight (the fixed γ fastest on the very prompts scored).
Live runs decode the same prompts with the same policies, target-only and Hugging Face assisted
generation with the same draft, on the wall clock (speckv.pipeline.compare.compare), and set the
measured tokens/s beside the replay's modelled ones: the error of the cost model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from speckv.controllers import make_controller
from speckv.costs import CostModel
from speckv.decoding.models import LoadedModel
from speckv.errors import SpecKVError
from speckv.pipeline.compare import Method, compare, hf_assisted_methods
from speckv.pipeline.replay import Trace, cost_oracle, oracle, replay, target_only
from speckv.util import stats
from speckv.util.reporting import MarkdownReport, grouped_bars, line_chart, scatter_predicted_actual

TARGET_ONLY = "target only"
ORACLE = "oracle (tokens/s)"
STEP_ORACLE = "oracle (tokens/step)"
BEST_FIXED = "best fixed γ (hindsight)"
OURS = ("speckv", "speckv-step", "speckv-paper")
LABELS = {
    "speckv": "SpecKV (ours)",
    "speckv-step": "SpecKV (ours, per-step γ)",
    "speckv-paper": "SpecKV (paper objective)",
}
RESAMPLES = 5000


def policy_specs(gamma_max: int, controller: str | None) -> list[str]:
    """Controller specs replayed: fixed γ = 1..gamma_max, the baselines, and SpecKV if trained."""
    specs = [f"fixed:{g}" for g in range(1, gamma_max + 1)] + ["heuristic", "confidence"]
    if controller:
        specs += [f"{variant}:{controller}" for variant in OURS]
    return specs


def policy_name(spec: str) -> str:
    variant = spec.partition(":")[0]
    return LABELS.get(variant, spec)


def replay_policies(
    traces: list[Trace], costs: dict[str, CostModel], specs: list[str], progress: bool = True
) -> pd.DataFrame:
    """One row per (compression, prompt, policy): tokens, steps, drafted, accepted, modelled time, γs.

    A policy keeps one controller per compression level across prompts (in profile order), as
    a live run would: adaptive policies carry their state from prompt to prompt.
    """
    levels = list(dict.fromkeys(t.compression for t in traces))
    missing = [c for c in levels if c not in costs]
    if missing:
        raise SpecKVError(f"the cost model has no level {', '.join(missing)}; run `speckv calibrate`")
    gamma_max = min(t.gamma_max for t in traces)
    controllers = {
        (level, spec): make_controller(spec, gamma_max=gamma_max, compression=level)
        for level in levels
        for spec in specs
    }
    rows = []
    for trace in tqdm(traces, desc="replay", disable=not progress):
        cost = costs[trace.compression]
        runs = {TARGET_ONLY: target_only(trace, cost), ORACLE: cost_oracle(trace, cost)}
        step_oracle = oracle(trace, np.ones(gamma_max + 1))
        step_oracle.time_s = float(
            cost.step_times()[step_oracle.gammas].sum() + cost.prefill_time(trace.prompt_len, True)
        )
        runs[STEP_ORACLE] = step_oracle
        for spec in specs:
            runs[policy_name(spec)] = replay(trace, controllers[(trace.compression, spec)], cost)
        for name, run in runs.items():
            rows.append(
                {
                    "compression": trace.compression,
                    "task": trace.task,
                    "prompt_id": trace.prompt_id,
                    "policy": name,
                    "tokens": run.tokens,
                    "steps": run.steps,
                    "drafted": run.drafted,
                    "accepted": run.accepted,
                    "time_s": run.time_s,
                    "gammas": run.gammas,
                }
            )
    return pd.DataFrame(rows)


def replay_consistency(traces: list[Trace], steps: pd.DataFrame, gamma_max: int) -> pd.DataFrame:
    """Per compression × controller of the profile's live sweep: how many live runs the replay
    reproduces step for step (γ drafted, accepted, tokens emitted). Each live run had a fresh
    controller, so each replay gets one too."""
    if steps.empty:
        return pd.DataFrame()
    by_unit = {
        key: part for key, part in steps.groupby(["compression", "prompt_id", "controller"], sort=False)
    }
    counts: dict[tuple[str, str], list[int]] = {}
    for trace in traces:
        for spec in steps["controller"].unique():
            live = by_unit.get((trace.compression, trace.prompt_id, spec))
            if live is None:
                continue
            live = live.sort_values("step")
            controller = make_controller(spec, gamma_max=gamma_max, compression=trace.compression)
            replayed = replay(trace, controller, keep_records=True).records
            same = list(zip(live["gamma"], live["accepted"], live["tokens_produced"], strict=True)) == [
                (r.gamma, r.accepted, r.tokens_produced) for r in replayed
            ]
            tally = counts.setdefault((trace.compression, spec), [0, 0, 0])
            tally[0] += 1
            tally[1] += same
            tally[2] += len(live)
    return pd.DataFrame(
        [
            {
                "compression": level,
                "controller": spec,
                "live_runs": runs,
                "replayed_exactly": same,
                "steps": n,
            }
            for (level, spec), (runs, same, n) in counts.items()
        ]
    )


def with_best_fixed(results: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Add, per group, the rows of the fixed γ with the highest modelled tokens/s in that group."""
    fixed = results[results["policy"].str.startswith("fixed:")]
    parts = [results]
    for _, group in fixed.groupby(by, sort=False):
        totals = group.groupby("policy")[["tokens", "time_s"]].sum()
        best = (totals["tokens"] / totals["time_s"]).idxmax()
        parts.append(group[group["policy"] == best].assign(policy=BEST_FIXED, best_fixed=best))
    return pd.concat(parts, ignore_index=True)


def summarise(results: pd.DataFrame, by: list[str], seed: int = 0) -> pd.DataFrame:
    """Per group × policy: tokens/step, modelled tokens/s with CI, speed-up, share of the oracle's gain."""
    results = with_best_fixed(results, by)
    records = []
    for keys, group in results.groupby(by, sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        base = _rate(group[group["policy"] == TARGET_ONLY])
        best = _rate(group[group["policy"] == ORACLE])
        best_fixed = group.loc[group["policy"] == BEST_FIXED, "best_fixed"]
        for policy, part in group.groupby("policy", sort=False):
            interval = stats.bootstrap_ratio_ci(
                part["tokens"], part["time_s"], n_resamples=RESAMPLES, seed=seed
            )
            rate = interval.estimate
            records.append(
                {
                    **dict(zip(by, keys, strict=True)),
                    "policy": policy,
                    "chosen": best_fixed.iloc[0] if policy == BEST_FIXED else "",
                    "prompts": len(part),
                    "tokens_per_step": part["tokens"].sum() / part["steps"].sum(),
                    "mean_gamma": part["drafted"].sum() / part["steps"].sum(),
                    "acceptance": part["accepted"].sum() / max(part["drafted"].sum(), 1),
                    "tokens_per_s": rate,
                    "ci_low": interval.low,
                    "ci_high": interval.high,
                    "speedup": rate / base,
                    "oracle_share": (rate - base) / (best - base) if best > base else np.nan,
                }
            )
    return pd.DataFrame(records)


def paired_comparisons(results: pd.DataFrame, by: list[str], seed: int = 0) -> pd.DataFrame:
    """Each SpecKV variant against the best fixed γ in hindsight, paired over prompts."""
    results = with_best_fixed(results, by)
    records = []
    for keys, group in results.groupby(by, sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        baseline = group[group["policy"] == BEST_FIXED].set_index("prompt_id")
        for label in LABELS.values():
            ours = group[group["policy"] == label].set_index("prompt_id")
            if ours.empty:
                continue
            ours = ours.loc[baseline.index]
            interval, p_value = stats.paired_ratio_difference(
                ours["tokens"], ours["time_s"], baseline["tokens"], baseline["time_s"], seed=seed
            )
            records.append(
                {
                    **dict(zip(by, keys, strict=True)),
                    "policy": label,
                    "baseline": baseline["best_fixed"].iloc[0],
                    "difference_tokens_per_s": interval.estimate,
                    "ci_low": interval.low,
                    "ci_high": interval.high,
                    "p_value": p_value,
                }
            )
    return pd.DataFrame(records)


def _rate(part: pd.DataFrame) -> float:
    return float(part["tokens"].sum() / part["time_s"].sum())


# --- live -------------------------------------------------------------------------------------


def live_methods(specs: list[str], hf_gammas: tuple[int, ...]) -> list[Method]:
    """Our engine with each policy, target-only, and HF assisted generation with the same draft."""
    methods = [Method(TARGET_ONLY)] + [Method(policy_name(spec), controller=spec) for spec in specs]
    return methods + hf_assisted_methods(hf_gammas)


def live_evaluation(
    target: LoadedModel,
    draft: LoadedModel,
    traces: list[Trace],
    prompts: list[list[int]],
    specs: list[str],
    cost: CostModel,
    repeats: int = 3,
    hf_gammas: tuple[int, ...] = (2, 3, 4, 5, 6),
    progress: bool = True,
) -> pd.DataFrame:
    """Measured tokens/s (median over repeats) beside the replay's modelled ones, per method."""
    max_new = {t.max_new_tokens for t in traces}
    if len(max_new) != 1:
        raise SpecKVError("the traces were recorded with different max_new_tokens")
    methods = live_methods(specs, hf_gammas)
    # Adaptive policies are capped at the profile's γ_max, so replay can follow every live run.
    gamma_max = min(t.gamma_max for t in traces)
    results = compare(target, draft, prompts, methods, max_new.pop(), repeats, progress, gamma_max)
    reference = results[0].outputs
    rows = []
    for method, result in zip(methods, results, strict=True):
        modelled = np.nan
        if not method.hf:
            if method.controller is None:
                runs = [target_only(trace, cost) for trace in traces]
            else:
                controller = make_controller(
                    method.controller, gamma_max=gamma_max, compression=cost.compression
                )
                runs = [replay(trace, controller, cost) for trace in traces]
            modelled = sum(r.tokens for r in runs) / sum(r.time_s for r in runs)
        measured = result.median_tokens_per_s
        rows.append(
            {
                "compression": target.compression,
                "method": method.name,
                "engine": "transformers" if method.hf else "speckv",
                "measured_tokens_per_s": measured,
                "runs": ", ".join(f"{x:.2f}" for x in result.tokens_per_s),
                "modelled_tokens_per_s": modelled,
                "model_error_pct": 100 * (modelled / measured - 1),
                "acceptance": result.accepted / result.drafted if result.drafted else np.nan,
                "mean_accepted": result.mean_accepted if result.drafted else np.nan,
                "same_output": result.outputs == reference,
                "prompts": len(prompts),
                "repeats": repeats,
            }
        )
    return pd.DataFrame(rows)


# --- report -----------------------------------------------------------------------------------


def write_report(eval_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """report.md with tables and figures from what `speckv evaluate` wrote to `eval_dir`."""
    eval_dir, out_dir = Path(eval_dir), Path(out_dir)
    replay_path = eval_dir / "replay.parquet"
    if not replay_path.exists():
        raise SpecKVError(f"{eval_dir} has no replay.parquet; run `speckv evaluate --out {eval_dir}` first")
    meta = json.loads((eval_dir / "evaluate.json").read_text())
    results = pd.read_parquet(replay_path)
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
    consistency_path = eval_dir / "consistency.csv"
    if consistency_path.exists():
        doc.text(
            "## Replay against live runs\n\nThe profile's live step records replayed: runs whose every "
            "step (γ drafted, accepted, tokens emitted) the replay reproduces."
        )
        doc.table("replay_consistency", pd.read_csv(consistency_path))
    _gamma_over_time(doc, results)
    _predictor_section(doc, meta)
    live_path = eval_dir / "live.csv"
    if live_path.exists():
        live = pd.read_csv(live_path)
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
