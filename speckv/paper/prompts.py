"""Prompts, the audit's unit: recovering each logged step's run and prompt, and cross-fitting by prompt.

The step file has no prompt column, so the prompt is recovered by aligning its blocks of steps
with the run file, and the alignment is checked. Steps of one prompt are strongly correlated,
so models are fitted and evaluated with whole prompts held out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from speckv.controllers.predictor import AcceptancePredictor
from speckv.errors import SpecKVError
from speckv.paper.data import RUN_FILE, STEP_FILE
from speckv.paper.protocol import fit_predictor

# The run summaries round means to 4 decimals, so step means agree to about 5e-5.
ROUNDING_TOLERANCE = 5e-4


def recover_prompts(steps: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give each step row its run and prompt, and a table of how well the alignment checks out.

    Runs are contiguous blocks of step rows whose `step` restarts at 0, in the order of the run
    file. Prompts are numbered per task in order of first appearance (`code-1` … `code-5`).
    """
    run_ids = (steps["step"] == 0).cumsum().to_numpy() - 1
    if steps["step"].iloc[0] != 0 or run_ids[-1] + 1 != len(runs):
        raise SpecKVError(
            f"{STEP_FILE} has {run_ids[-1] + 1} runs (step restarting at 0) but {RUN_FILE} has "
            f"{len(runs)}; cannot recover prompts"
        )
    segments = run_segments(steps.assign(run=run_ids))
    checks = alignment_checks(segments, runs.reset_index(drop=True))
    prompt_index = runs.groupby("task", sort=False)["prompt"].transform(lambda texts: pd.factorize(texts)[0])
    prompt = runs["task"] + "-" + (prompt_index + 1).astype(str)
    recovered = steps.assign(
        run=run_ids, prompt_index=prompt_index.to_numpy()[run_ids], prompt=prompt.to_numpy()[run_ids]
    )
    return recovered, checks


def run_segments(steps: pd.DataFrame) -> pd.DataFrame:
    """Per-run aggregates of the step rows, named like the run file's columns."""
    runs = steps.groupby("run")
    return runs.agg(
        compression=("compression", "first"),
        gamma=("gamma", "first"),
        task=("task", "first"),
        num_steps=("step", "size"),
        num_tokens=("tokens_produced", "sum"),
        mean_acceptance_rate=("acceptance_rate", "mean"),
        mean_draft_entropy=("mean_draft_entropy", "mean"),
        mean_draft_confidence=("mean_draft_confidence", "mean"),
    ).assign(label_sets=runs[["compression", "gamma", "task"]].nunique().max(axis=1))


_EXACT = ["num_steps", "num_tokens"]
_ROUNDED = ["mean_acceptance_rate", "mean_draft_entropy", "mean_draft_confidence"]


def alignment_checks(segments: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """How many runs agree with their step segment on each recorded quantity."""
    labels = ["compression", "gamma", "task"]
    same_labels = (segments[labels].to_numpy() == runs[labels].to_numpy()).all(axis=1)
    records = [
        _check(
            "one compression, γ and task per block, equal to the run's",
            same_labels & (segments["label_sets"] == 1),
        ),
        _check(
            "num_steps = number of step rows",
            segments["num_steps"].to_numpy() == runs["num_steps"].to_numpy(),
        ),
        _check(
            "num_tokens = Σ tokens_produced",
            segments["num_tokens"].to_numpy() == runs["num_tokens"].to_numpy(),
        ),
    ]
    for column in _ROUNDED:
        difference = np.abs(segments[column].to_numpy() - runs[column].to_numpy())
        records.append(
            _check(
                f"{column} = mean over steps (±{ROUNDING_TOLERANCE:g})",
                difference <= ROUNDING_TOLERANCE,
                difference,
            )
        )
    records.append(
        _check(
            "run matches only its own row in its block, num_steps alone",
            _unique_matches(segments, runs, ["num_steps"], []),
        )
    )
    records.append(
        _check(
            "run matches only its own row in its block, all quantities",
            _unique_matches(segments, runs, _EXACT, _ROUNDED),
        )
    )
    return pd.DataFrame(records)


def _check(name: str, passed: np.ndarray, difference: np.ndarray | None = None) -> dict:
    return {
        "check": name,
        "runs_passing": int(np.sum(passed)),
        "runs": len(passed),
        "max_abs_difference": float(np.max(difference)) if difference is not None else np.nan,
    }


def _unique_matches(
    segments: pd.DataFrame, runs: pd.DataFrame, exact: list[str], rounded: list[str]
) -> np.ndarray:
    """Per run: does its segment agree with its own run and no other run of the same block?

    A block is the runs sharing (compression, γ, task); only the prompt order inside it is in
    question, so uniqueness there means the recorded order is the only consistent one.
    """
    unique = np.zeros(len(runs), dtype=bool)
    for positions in runs.groupby(["compression", "gamma", "task"], sort=False).indices.values():
        block_segments, block_runs = segments.iloc[positions], runs.iloc[positions]
        agrees = np.ones((len(positions), len(positions)), dtype=bool)
        for column in exact:
            agrees &= block_segments[column].to_numpy()[:, None] == block_runs[column].to_numpy()[None, :]
        for column in rounded:
            gap = np.abs(block_segments[column].to_numpy()[:, None] - block_runs[column].to_numpy()[None, :])
            agrees &= gap <= ROUNDING_TOLERANCE
        unique[positions] = np.diag(agrees) & (agrees.sum(axis=1) == 1)
    return unique


FoldModels = list[tuple[np.ndarray, AcceptancePredictor]]


def fit_prompt_folds(steps: pd.DataFrame, kind: str, features: list[str]) -> FoldModels:
    """One model per fold; fold k holds out the k-th prompt of every task (all its runs)."""
    folds = []
    for fold in np.unique(steps["prompt_index"]):
        held_out = (steps["prompt_index"] == fold).to_numpy()
        folds.append((held_out, fit_predictor(kind, features, steps[~held_out])))
    return folds


def out_of_fold(folds: FoldModels, steps: pd.DataFrame, apply) -> np.ndarray:
    """apply(model, rows) on each fold's held-out rows, assembled in row order."""
    result = None
    for held_out, model in folds:
        values = np.asarray(apply(model, steps[held_out]))
        if result is None:
            result = np.empty((len(steps), *values.shape[1:]))
        result[held_out] = values
    return result
