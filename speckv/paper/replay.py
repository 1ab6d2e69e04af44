"""Scoring policies by replaying the logged steps, and how far that replay can be trusted.

Decoding is greedy, so the draft proposes the same tokens whatever γ is and the target accepts
the same prefix: a logged step's outcome at a smaller γ, or after an earlier rejection, is
known exactly. Policies are therefore scored on the steps logged at the largest γ, where every
choice is identified.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from speckv.paper.cost import step_seconds
from speckv.paper.data import GAMMAS
from speckv.paper.results import CI_RESAMPLES, CONFIDENCE, PVALUE_RESAMPLES, labelled_groups
from speckv.util import stats


def replayed_tokens(accepted, logged_gamma, chosen_gamma) -> np.ndarray:
    """Tokens a logged step would have produced had it drafted `chosen_gamma` tokens.

    Decoding is greedy, so the draft proposes the same tokens whatever γ is, and the target
    accepts the same prefix: with γ' ≤ γ, or a rejection before γ', the outcome is exactly
    min(accepted, γ') + 1. When all γ logged tokens were accepted and γ' > γ it is unknown: NaN.
    """
    accepted, logged_gamma, chosen_gamma = (np.asarray(a) for a in (accepted, logged_gamma, chosen_gamma))
    tokens = np.minimum(accepted, chosen_gamma) + 1.0
    unknown = (accepted == logged_gamma) & (chosen_gamma > logged_gamma)
    return np.where(unknown, np.nan, tokens)


def replay_rows(steps: pd.DataFrame) -> pd.DataFrame:
    """The steps logged at the largest γ: every policy's outcome is identified on them."""
    return steps[steps["gamma"] == max(GAMMAS)]


def replayed_policy_outcomes(
    rows: pd.DataFrame,
    policy_gammas: dict[str, np.ndarray],
    cost: pd.DataFrame | None,
    by: list[str],
    seed: int,
) -> pd.DataFrame:
    """Each policy scored by replaying its γ on logged steps: tokens/step and, with a cost model,
    tokens/s = Σ tokens / Σ modelled step time. CIs resample prompts.
    """
    frame = _with_policy_columns(rows, policy_gammas)
    records = []
    for labels, part in labelled_groups(frame, by):
        clusters = part["prompt"].to_numpy()
        for policy in policy_gammas:
            chosen, tokens = _replay(part, policy)
            per_step = stats.bootstrap_mean_ci(tokens, CI_RESAMPLES, seed, CONFIDENCE, clusters)
            record = {
                **labels,
                "policy": policy,
                "mean_gamma": chosen.mean(),
                "tokens_per_step": per_step.estimate,
                "ci_low": per_step.low,
                "ci_high": per_step.high,
            }
            if cost is not None:
                seconds = step_seconds(part, chosen, cost)
                rate = stats.bootstrap_ratio_ci(tokens, seconds, CI_RESAMPLES, seed, CONFIDENCE, clusters)
                record |= {"tokens_per_s": rate.estimate, "tps_ci_low": rate.low, "tps_ci_high": rate.high}
            records.append(record)
    return pd.DataFrame(records)


def _with_policy_columns(rows: pd.DataFrame, policy_gammas: dict[str, np.ndarray]) -> pd.DataFrame:
    """The columns a replay needs, plus one `γ|policy` column per policy."""
    frame = rows[["compression", "task", "prompt", "gamma", "accepted"]].copy()
    for policy, gammas in policy_gammas.items():
        frame[f"γ|{policy}"] = gammas
    return frame


def _replay(part: pd.DataFrame, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """A policy's γ per row of a `_with_policy_columns` frame and the tokens each step yields."""
    chosen = part[f"γ|{policy}"].to_numpy()
    return chosen, require_identified(replayed_tokens(part["accepted"], part["gamma"], chosen))


def require_identified(tokens: np.ndarray) -> np.ndarray:
    """Replayed tokens that must all be known (callers replay on `replay_rows`)."""
    if np.isnan(tokens).any():
        raise ValueError("replayed a γ larger than the logged one on a fully accepted step")
    return tokens


def replayed_speed_vs_baseline(
    rows: pd.DataFrame, policy_gammas: dict[str, np.ndarray], baseline: str, cost: pd.DataFrame, seed: int
) -> pd.DataFrame:
    """Per compression, paired modelled tokens/s difference of each policy vs `baseline`, with a
    CI and a one-sided p-value for "faster", resampling prompts.
    """
    frame = _with_policy_columns(rows, policy_gammas)
    records = []
    for labels, part in labelled_groups(frame, ["compression"]):
        baseline_gammas, baseline_tokens = _replay(part, baseline)
        baseline_seconds = step_seconds(part, baseline_gammas, cost)
        for policy in policy_gammas:
            if policy == baseline:
                continue
            chosen, tokens = _replay(part, policy)
            interval, p_value = stats.paired_ratio_difference(
                tokens,
                step_seconds(part, chosen, cost),
                baseline_tokens,
                baseline_seconds,
                PVALUE_RESAMPLES,
                seed,
                CONFIDENCE,
                part["prompt"].to_numpy(),
            )
            records.append(
                {
                    **labels,
                    "policy": policy,
                    "baseline": baseline,
                    "tokens_per_s_difference": interval.estimate,
                    "ci_low": interval.low,
                    "ci_high": interval.high,
                    "p_one_sided": p_value,
                }
            )
    return pd.DataFrame(records)


def logged_replay_consistency(steps: pd.DataFrame) -> pd.DataFrame:
    """Do the runs of one prompt at different γ agree on which draft tokens the target accepts?

    Each step reveals, per text position, whether the draft's greedy token matched the target's
    (accepted positions match; the first rejected one does not). Greedy decoding should give the
    same text at every γ, so runs must agree wherever two of them reveal the same position; a
    conflict means the target's choice depended on γ (different verification width, different
    numerics), which limits how exact a replay at another γ can be.
    """
    observed = _position_observations(steps)
    per_position = observed.groupby(["compression", "prompt", "position"], sort=False)["match"].agg(
        ["nunique", "size"]
    )
    per_position = per_position[per_position["size"] > 1].reset_index()
    per_prompt = per_position.groupby(["compression", "prompt"], sort=False)["nunique"].max().reset_index()
    records = []
    for compression, positions in per_position.groupby("compression", sort=False):
        prompts = per_prompt[per_prompt["compression"] == compression]
        conflicts = int((positions["nunique"] > 1).sum())
        records.append(
            {
                "compression": compression,
                "prompts": len(prompts),
                "prompts_where_all_runs_agree": int((prompts["nunique"] == 1).sum()),
                "positions_seen_by_2+_runs": len(positions),
                "positions_in_conflict": conflicts,
                "conflict_share": conflicts / len(positions),
            }
        )
    return pd.DataFrame(records)


def _position_observations(steps: pd.DataFrame) -> pd.DataFrame:
    """One row per (step, revealed position): compression, prompt, position in the text, match."""
    accepted = steps["accepted"].to_numpy()
    start = (steps.groupby("run")["tokens_produced"].cumsum() - steps["tokens_produced"]).to_numpy()
    revealed = accepted + (accepted < steps["gamma"].to_numpy())
    step = np.repeat(np.arange(len(steps)), revealed)
    offset = np.arange(len(step)) - np.repeat(np.cumsum(revealed) - revealed, revealed)
    return pd.DataFrame(
        {
            "compression": steps["compression"].to_numpy()[step],
            "prompt": steps["prompt"].to_numpy()[step],
            "position": start[step] + offset,
            "match": offset < accepted[step],
        }
    )


def replay_bias_table(speed: pd.DataFrame, best: pd.DataFrame, replayed: pd.DataFrame) -> pd.DataFrame:
    """Per compression, how much the replay undervalues the fastest fixed γ.

    The replay starts every step where the γ = 8 runs did, which are harder positions than a
    smaller γ meets on its own, so small-γ policies replay below their on-policy rate.
    """
    on_policy = speed.set_index(["compression", "gamma"])["modelled_tokens_per_s"]
    replay = replayed.set_index(["compression", "policy"])["tokens_per_s"]
    records = []
    for _, row in best.iterrows():
        compression, gamma = row["compression"], row["best γ by modelled tokens/s"]
        rate, replay_rate = on_policy[(compression, gamma)], replay[(compression, f"Fixed-{gamma}")]
        records.append(
            {
                "compression": compression,
                "fastest_fixed_gamma": gamma,
                "on_policy_tokens_per_s": rate,
                "replayed_tokens_per_s": replay_rate,
                "bias_tokens_per_s": rate - replay_rate,
                "bias_share": rate / replay_rate - 1,
            }
        )
    return pd.DataFrame(records)
