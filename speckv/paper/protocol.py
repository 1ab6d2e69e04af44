"""The paper's evaluation protocol as its released notebooks run it, flaws included.

A step-level random split, predictors refit on every row before the policy evaluation, and
every policy scored by the predictor's own prediction ("expected tokens per step").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from sklearn.model_selection import train_test_split

from speckv.controllers.predictor import AcceptancePredictor
from speckv.errors import SpecKVError
from speckv.paper.data import GAMMAS, ORACLE_FILE, STEP_SIGNALS, PaperData

PAPER_FEATURES = [*STEP_SIGNALS, "comp_enc", "gamma"]
# The paper's split and models use random_state=42; --seed only drives the bootstraps.
PROTOCOL_RANDOM_STATE = 42
PAPER_PREDICTORS = {"MLP-16": "mlp16", "RF-100": "rf100"}


def paper_split(steps: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The released 80/20 row split, stratified by compression and task (indices sorted)."""
    strata = steps["compression"] + "_" + steps["task"]
    train, test = train_test_split(
        np.arange(len(steps)), test_size=0.2, random_state=PROTOCOL_RANDOM_STATE, stratify=strata
    )
    return np.sort(train), np.sort(test)


def fit_predictor(kind: str, features: list[str], rows: pd.DataFrame) -> AcceptancePredictor:
    """A predictor of `kind` fitted to the rows' acceptance rates."""
    return AcceptancePredictor(kind, features).fit(rows, rows["acceptance_rate"])


def paper_expected_tokens(predictor: AcceptancePredictor, rows: pd.DataFrame, gammas) -> np.ndarray:
    """The paper's step score: clip(predicted acceptance with γ substituted, 0, 1)·γ + 1.

    The row's draft signals are kept as they are, whatever γ is substituted.
    """
    gammas = np.broadcast_to(np.asarray(gammas, dtype=float), (len(rows),))
    return predictor.predict(rows.assign(gamma=gammas), clip=True) * gammas + 1.0


def candidate_scores(predictor: AcceptancePredictor, rows: pd.DataFrame) -> np.ndarray:
    """The paper's score of every candidate γ, rows × len(GAMMAS)."""
    return np.column_stack([paper_expected_tokens(predictor, rows, gamma) for gamma in GAMMAS])


def best_gamma(scores: np.ndarray) -> np.ndarray:
    """The γ with the highest score per row (ties go to the smaller γ)."""
    return np.asarray(GAMMAS)[np.argmax(scores, axis=1)]


def fixed_best_gamma(steps: pd.DataFrame) -> dict[str, int]:
    """Per compression, the γ with the highest mean tokens_produced over all rows."""
    means = steps.groupby(["compression", "gamma"])["tokens_produced"].mean()
    return {compression: int(part.idxmax()[1]) for compression, part in means.groupby(level=0)}


def task_oracle_gamma(rows: pd.DataFrame, optimal_gamma: pd.DataFrame) -> np.ndarray:
    """The released per-(compression, task) γ with the highest measured tokens per second."""
    lookup = optimal_gamma.set_index(["compression", "task"])["optimal_gamma"]
    keys = pd.MultiIndex.from_frame(rows[["compression", "task"]])
    gammas = lookup.reindex(keys)
    if gammas.isna().any():
        missing = sorted(set(keys[gammas.isna().to_numpy()]))
        raise SpecKVError(f"{ORACLE_FILE} has no optimal γ for {missing[:3]}")
    return gammas.to_numpy(dtype=int)


def paper_policy_gammas(
    predictor: AcceptancePredictor, steps: pd.DataFrame, rows: pd.DataFrame, optimal_gamma: pd.DataFrame
) -> dict[str, np.ndarray]:
    """γ chosen on each row by the paper's four policies."""
    return {
        "Fixed-4": np.full(len(rows), 4),
        "Fixed-best": rows["compression"].map(fixed_best_gamma(steps)).to_numpy(dtype=int),
        "Task-oracle": task_oracle_gamma(rows, optimal_gamma),
        "SpecKV": best_gamma(candidate_scores(predictor, rows)),
    }


def prediction_metrics(predictor: AcceptancePredictor, rows: pd.DataFrame) -> dict[str, float]:
    """R², MAE and RMSE of predicted vs actual acceptance rate on `rows`."""
    predicted = predictor.predict(rows)
    actual = rows["acceptance_rate"].to_numpy()
    return {
        "r2": r2_score(actual, predicted),
        "mae": mean_absolute_error(actual, predicted),
        "rmse": float(np.sqrt(mean_squared_error(actual, predicted))),
    }


@dataclass
class ProtocolRun:
    """Everything the paper's protocol computes before summarising."""

    train: np.ndarray
    test: np.ndarray
    held_out: dict[str, AcceptancePredictor]  # fitted on the training rows only
    refit: dict[str, AcceptancePredictor]  # refit on all rows, as the paper does
    test_rows: pd.DataFrame
    policy_gammas: dict[str, dict[str, np.ndarray]]  # predictor → policy → γ per test row
    scores: dict[str, pd.DataFrame]  # predictor → test rows with one score column per policy


def run_protocol(data: PaperData) -> ProtocolRun:
    """Split, fit, refit on all rows, choose γ per policy and score every test row."""
    steps = data.steps
    train, test = paper_split(steps)
    held_out = {
        name: fit_predictor(kind, PAPER_FEATURES, steps.iloc[train])
        for name, kind in PAPER_PREDICTORS.items()
    }
    refit = {name: fit_predictor(kind, PAPER_FEATURES, steps) for name, kind in PAPER_PREDICTORS.items()}
    test_rows = steps.iloc[test].reset_index(drop=True)
    policy_gammas, scores = {}, {}
    for name, predictor in refit.items():
        policy_gammas[name] = paper_policy_gammas(predictor, steps, test_rows, data.optimal_gamma)
        scored = test_rows[["compression", "task", "gamma"]].copy()
        for policy, gammas in policy_gammas[name].items():
            scored[policy] = paper_expected_tokens(predictor, test_rows, gammas)
        scores[name] = scored
    return ProtocolRun(train, test, held_out, refit, test_rows, policy_gammas, scores)
