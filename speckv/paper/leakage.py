"""Leakage and train/test hygiene in the paper's predictors.

The paper's features summarise the tokens drafted in the step being predicted, so they do not
exist when γ is chosen; its test rows are also refit on, and steps of one prompt sit on both
sides of its split. These tables measure what each flaw is worth.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from speckv.controllers.predictor import AcceptancePredictor
from speckv.paper.data import GAMMAS, STEP_SIGNALS
from speckv.paper.prompts import FoldModels, out_of_fold
from speckv.paper.protocol import PAPER_FEATURES, PAPER_PREDICTORS, ProtocolRun, candidate_scores
from speckv.paper.results import CI_RESAMPLES, CONFIDENCE, PVALUE_RESAMPLES
from speckv.util import stats

# The audit's feature sets: the paper's (signals of the step being predicted), signals known
# before drafting (the previous step's), and a floor without any signal.
PREVIOUS_SIGNALS = [f"prev_{name}" for name in [*STEP_SIGNALS, "acceptance_rate"]]
PRE_DRAFT_FEATURES = [*PREVIOUS_SIGNALS, "first_step", "comp_enc", "gamma"]
SAME_STEP = "same-step signals (paper)"
PREVIOUS_STEP = "previous-step signals"
FEATURE_SETS = {
    SAME_STEP: PAPER_FEATURES,
    PREVIOUS_STEP: PRE_DRAFT_FEATURES,
    "γ and compression only": ["comp_enc", "gamma"],
}
# Train/test regimes compared by the audit.
PAPER_REGIME = "row split, refit on all rows (paper)"
ROW_SPLIT = "row split, training rows only"
PROMPT_SPLIT = "prompt split (5 folds), no refit"


def add_previous_step_signals(steps: pd.DataFrame) -> pd.DataFrame:
    """Signals known before a step drafts: the previous step's, zero with `first_step`=1 at step 0."""
    previous = steps.groupby("run")[[*STEP_SIGNALS, "acceptance_rate"]].shift(1)
    first_step = previous.isna().any(axis=1).astype(float)
    columns = {f"prev_{name}": previous[name].fillna(0.0) for name in previous.columns}
    return steps.assign(**columns, first_step=first_step)


def signals_by_gamma(steps: pd.DataFrame) -> pd.DataFrame:
    """Mean of each same-step signal per γ: they summarise the γ drafted tokens, so they move with γ."""
    columns = [*STEP_SIGNALS, "acceptance_rate", "tokens_produced"]
    return steps.groupby("gamma")[columns].mean().reset_index()


def signal_correlations(steps: pd.DataFrame) -> pd.DataFrame:
    """Correlation with the step's acceptance rate: its own signals vs the previous step's."""
    later = steps[steps["first_step"] == 0]
    records = []
    for name in [*STEP_SIGNALS, "acceptance_rate"]:
        same = steps[name].corr(steps["acceptance_rate"]) if name in STEP_SIGNALS else np.nan
        records.append(
            {
                "signal": name,
                "corr_same_step": same,
                "corr_previous_step": later[f"prev_{name}"].corr(later["acceptance_rate"]),
            }
        )
    return pd.DataFrame(records)


def leakage_accuracy(steps: pd.DataFrame, folds: dict[tuple[str, str], FoldModels]) -> pd.DataFrame:
    """Out-of-fold accuracy (split by prompt) of each predictor on each feature set."""
    records = []
    for (feature_set, predictor), models in folds.items():
        predicted = out_of_fold(models, steps, lambda model, rows: model.predict(rows))
        actual = steps["acceptance_rate"].to_numpy()
        records.append(
            {
                "features": feature_set,
                "predictor": predictor,
                "r2": r2_score(actual, predicted),
                "mae": mean_absolute_error(actual, predicted),
                "rmse": float(np.sqrt(mean_squared_error(actual, predicted))),
            }
        )
    return pd.DataFrame(records)


def _speckv_gain(model: AcceptancePredictor, rows: pd.DataFrame) -> np.ndarray:
    """Per row, the paper's score of SpecKV's γ minus that of γ = 4 (same predictor)."""
    scores = candidate_scores(model, rows)
    return scores.max(axis=1) - scores[:, GAMMAS.index(4)]


def hygiene_table(protocol: ProtocolRun, steps: pd.DataFrame, folds: dict, seed: int) -> pd.DataFrame:
    """Accuracy and SpecKV − Fixed-4 (paper's score) under three train/test regimes."""
    test_rows = protocol.test_rows
    records = []
    for name in PAPER_PREDICTORS:
        for setup, model in ((PAPER_REGIME, protocol.refit[name]), (ROW_SPLIT, protocol.held_out[name])):
            gain = _speckv_gain(model, test_rows)
            records.append(
                _hygiene_record(setup, name, "steps", test_rows, model.predict(test_rows), gain, None, seed)
            )
        models = folds[(SAME_STEP, name)]
        predicted = out_of_fold(models, steps, lambda model, rows: model.predict(rows))
        gain = out_of_fold(models, steps, _speckv_gain)
        for unit, clusters in (("steps", None), ("prompts", steps["prompt"].to_numpy())):
            records.append(_hygiene_record(PROMPT_SPLIT, name, unit, steps, predicted, gain, clusters, seed))
    return pd.DataFrame(records)


def _hygiene_record(
    setup: str,
    predictor: str,
    unit: str,
    rows: pd.DataFrame,
    predicted: np.ndarray,
    gain: np.ndarray,
    clusters: np.ndarray | None,
    seed: int,
) -> dict:
    """One regime: test accuracy, and SpecKV's paired gain over Fixed-4 with CI and p."""
    actual = rows["acceptance_rate"].to_numpy()
    ci = stats.bootstrap_mean_ci(gain, CI_RESAMPLES, seed, CONFIDENCE, clusters)
    return {
        "setup": setup,
        "predictor": predictor,
        "bootstrap_unit": unit,
        "test_r2": r2_score(actual, predicted),
        "test_mae": mean_absolute_error(actual, predicted),
        "speckv_minus_fixed4": ci.estimate,
        "ci_low": ci.low,
        "ci_high": ci.high,
        "p_one_sided": stats.paired_bootstrap_pvalue(
            gain, np.zeros_like(gain), PVALUE_RESAMPLES, seed, clusters
        ),
        "test_steps": len(gain),
    }
