"""Replay scoring of γ policies: every policy on the held-out prompts' traces, summaries with
bootstrap intervals, the oracle's share, paired comparisons, and replay against live step records.

Replay (design §4) scores each policy on the traces: tokens per step, modelled tokens per second
under the calibrated cost model, and the share of the oracle's gain over target-only decoding it
captures, with bootstrap intervals over prompts and paired comparisons against the best fixed γ
in hindsight (the fixed γ fastest on the very prompts scored).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from speckv.controllers import Drafts, make_controller
from speckv.costs import CostModel
from speckv.errors import SpecKVError
from speckv.pipeline.replay import Trace, cost_oracle, oracle, replay, target_only
from speckv.util import stats
from speckv.util.progress import progress_bar

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
    for trace in progress_bar(traces, desc="replay", show=progress):
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
    controller, so each replay gets one too. Tree controllers (tree:N) are left out: a trace
    records one draft continuation per position, so their steps cannot be replayed."""
    if steps.empty:
        return pd.DataFrame()
    replayable = [
        spec
        for spec in steps["controller"].unique()
        if make_controller(spec, gamma_max=gamma_max).drafts is not Drafts.TREES
    ]
    by_unit = {
        key: part for key, part in steps.groupby(["compression", "prompt_id", "controller"], sort=False)
    }
    counts: dict[tuple[str, str], list[int]] = {}
    for trace in traces:
        for spec in replayable:
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
