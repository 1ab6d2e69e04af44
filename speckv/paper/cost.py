"""The audit's wall-clock cost model, fitted to the paper's runs, and what it says about γ.

Tokens per step ignores what drafted tokens cost; the run file's elapsed times are the release's
only wall-clock data, so a per-compression linear model of a step's time is fitted to them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import r2_score


def fit_paper_cost_model(runs: pd.DataFrame) -> pd.DataFrame:
    """Per compression, least squares of elapsed = steps·t_verify + steps·γ·t_draft.

    Without a KV cache every pass re-reads the whole sequence, so these are mean costs per pass
    over sequences of prompt + up to 80 tokens, not per-token costs of a cached engine.
    """
    records = []
    for compression, part in runs.groupby("compression", sort=False):
        design = np.column_stack([part["num_steps"], part["num_steps"] * part["gamma"]]).astype(float)
        elapsed = part["elapsed_sec"].to_numpy(dtype=float)
        (t_verify, t_draft), *_ = np.linalg.lstsq(design, elapsed, rcond=None)
        fitted = design @ np.array([t_verify, t_draft])
        modelled_rate = part["num_tokens"].to_numpy() / fitted
        records.append(
            {
                "compression": compression,
                "t_verify_ms": 1e3 * t_verify,
                "t_draft_ms": 1e3 * t_draft,
                "r2_elapsed": r2_score(elapsed, fitted),
                "tokens_per_s_mean_abs_pct_error": 100
                * np.mean(np.abs(modelled_rate / part["tokens_per_sec"] - 1)),
                "runs": len(part),
            }
        )
    return pd.DataFrame(records)


def step_seconds(rows: pd.DataFrame, gammas, cost: pd.DataFrame) -> np.ndarray:
    """Modelled wall time of each row's step at γ: t_verify + γ·t_draft of its compression."""
    by_compression = cost.set_index("compression")
    t_verify = rows["compression"].map(by_compression["t_verify_ms"]).to_numpy() / 1e3
    t_draft = rows["compression"].map(by_compression["t_draft_ms"]).to_numpy() / 1e3
    return t_verify + np.asarray(gammas, dtype=float) * t_draft


def gamma_speed_table(steps: pd.DataFrame, runs: pd.DataFrame, cost: pd.DataFrame) -> pd.DataFrame:
    """Per compression and γ: observed tokens/step, modelled and measured tokens/s."""
    records = []
    for (compression, gamma), part in steps.groupby(["compression", "gamma"], sort=False):
        tokens_per_step = part["tokens_produced"].mean()
        seconds = step_seconds(part.iloc[:1], [gamma], cost)[0]
        measured = runs[(runs["compression"] == compression) & (runs["gamma"] == gamma)]
        records.append(
            {
                "compression": compression,
                "gamma": gamma,
                "tokens_per_step": tokens_per_step,
                "acceptance_rate": part["acceptance_rate"].mean(),
                "modelled_step_ms": 1e3 * seconds,
                "modelled_tokens_per_s": tokens_per_step / seconds,
                "measured_tokens_per_s": measured["num_tokens"].sum() / measured["elapsed_sec"].sum(),
            }
        )
    return pd.DataFrame(records)


def best_gamma_table(speed: pd.DataFrame, optimal_gamma: pd.DataFrame) -> pd.DataFrame:
    """Per compression, the γ that maximises each criterion."""
    records = []
    for compression, part in speed.groupby("compression", sort=False):
        indexed = part.set_index("gamma")
        oracle = optimal_gamma[optimal_gamma["compression"] == compression]
        records.append(
            {
                "compression": compression,
                "best γ by tokens/step": int(indexed["tokens_per_step"].idxmax()),
                "best γ by modelled tokens/s": int(indexed["modelled_tokens_per_s"].idxmax()),
                "best γ by measured tokens/s": int(indexed["measured_tokens_per_s"].idxmax()),
                "paper's task-oracle γ": ", ".join(
                    f"{t} {g}" for t, g in zip(oracle["task"], oracle["optimal_gamma"], strict=True)
                ),
            }
        )
    return pd.DataFrame(records)


def fastest_fixed_gamma_out_of_fold(steps: pd.DataFrame, cost: pd.DataFrame) -> np.ndarray:
    """Per row, the fixed γ with the highest modelled tokens/s for its compression, chosen from
    the other prompts' runs (observed tokens/step at each γ over modelled step time).
    """
    chosen = np.empty(len(steps), dtype=int)
    for fold in np.unique(steps["prompt_index"]):
        held_out = (steps["prompt_index"] == fold).to_numpy()
        tokens = steps[~held_out].groupby(["compression", "gamma"])["tokens_produced"].mean().reset_index()
        rate = tokens["tokens_produced"] / step_seconds(tokens, tokens["gamma"], cost)
        best = tokens.loc[rate.groupby(tokens["compression"]).idxmax()].set_index("compression")["gamma"]
        chosen[held_out] = steps.loc[held_out, "compression"].map(best).to_numpy()
    return chosen
