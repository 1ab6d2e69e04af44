"""`speckv train`: fit the SpecKV controller's acceptance predictors on a profile's replay data.

Training rows come from replaying fixed γ ∈ {2, 4, 6, 8} on the training prompts' traces, with
the features computed by the controller's own `SequenceContext`, so they are exactly what the
controller sees live:
- token rows, one per drafted token up to the step's first rejection: context + the token's
  signals → accepted (1/0), the conditional acceptance the controller multiplies up;
- step rows: the previous step's signal summary + γ → the step's acceptance rate (the paper's target).
Prompts are split, never steps: the predictors' scores are measured on a validation share of the
training prompts, and `speckv evaluate` uses held-out prompts no model has seen.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from speckv.controllers import Controller, FixedController
from speckv.controllers.predictor import FAST_KINDS, KINDS, AcceptancePredictor
from speckv.controllers.sequence_context import CONTEXT_FEATURES, SequenceContext
from speckv.controllers.speckv import (
    PAPER_CONTEXT,
    TOKEN_FEATURES,
    ControllerModels,
    SpecKVController,
    compression_features,
    context_features,
    paper_features,
    token_features,
)
from speckv.costs import CostModel
from speckv.errors import SpecKVError
from speckv.pipeline.replay import Trace, replay, target_only

TRAINING_GAMMAS = (2, 4, 6, 8)
VALIDATION_FRACTION = 0.2
# 1 = look at one drafted token every step (a cheap peek: verify_count can drop it)
PROBE_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)


class ContextRecorder(Controller):
    """A fixed-γ policy that logs the controller's decision-time features of every step."""

    def __init__(self, gamma: int, decay: float):
        self.inner = FixedController(gamma)
        self.context = SequenceContext(decay)
        self.steps: list[tuple[list[float], object]] = []

    def reset(self) -> None:
        self.context.reset()

    def begin_step(self) -> int:
        self._before = self.context.values
        return self.inner.begin_step()

    def end_step(self, record) -> None:
        self.steps.append((self._before, record))
        self.context.update(record)


def training_rows(
    traces: list[Trace], compressions: tuple[str, ...], decay: float = 0.3, gammas=TRAINING_GAMMAS
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(token rows, step rows) from replaying each γ of `gammas` on every trace."""
    comp_names = compression_features(compressions)
    token_rows, step_rows = [], []
    for trace in traces:
        gamma_list = [g for g in gammas if g <= trace.gamma_max]
        one_hot = [1.0 if c == trace.compression else 0.0 for c in compressions]
        ids = (trace.prompt_id, trace.task, trace.compression)
        for gamma in gamma_list:
            recorder = ContextRecorder(gamma, decay)
            replay(trace, recorder)
            for context, record in recorder.steps:
                if record.gamma == 0:
                    continue
                observed = min(record.accepted + 1, record.gamma)
                for i in range(observed):
                    signals = (
                        record.draft_entropy[i],
                        record.draft_confidence[i],
                        record.draft_token_prob[i],
                    )
                    token_rows.append((*ids, *context, *one_hot, *signals, float(i < record.accepted)))
                paper_context = [context[CONTEXT_FEATURES.index(name)] for name in PAPER_CONTEXT]
                step_rows.append(
                    (*ids, *paper_context, *one_hot, float(record.gamma), record.accepted / record.gamma)
                )
    id_columns = ["prompt_id", "task", "compression"]
    tokens = pd.DataFrame(
        token_rows, columns=[*id_columns, *CONTEXT_FEATURES, *comp_names, *TOKEN_FEATURES, "accepted"]
    )
    steps = pd.DataFrame(
        step_rows, columns=[*id_columns, *PAPER_CONTEXT, *comp_names, "gamma", "acceptance_rate"]
    )
    return tokens, steps


def is_validation(prompt_id: str) -> bool:
    """A fixed, order-free share of the training prompts kept out of fitting to score predictors."""
    digest = hashlib.sha256(("validation:" + prompt_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < VALIDATION_FRACTION


@dataclass
class TrainResult:
    models: ControllerModels
    metrics: pd.DataFrame  # per predictor kind: validation scores


def train_controller(
    traces: list[Trace],
    costs: dict[str, CostModel],
    kind: str = "mlp16",
    compare_kinds: tuple[str, ...] = KINDS,
    decay: float = 0.3,
    info: dict | None = None,
) -> TrainResult:
    """Fit the token, prior and paper predictors of `kind` on the traces (training prompts only)."""
    if kind not in FAST_KINDS:
        raise SpecKVError(
            f"the live controller needs a fast predictor: {' or '.join(FAST_KINDS)}, not {kind}"
        )
    if not traces:
        raise SpecKVError("no training traces: profile prompts of the train split first")
    compressions = tuple(dict.fromkeys(t.compression for t in traces))
    missing = [c for c in compressions if c not in costs]
    if missing:
        raise SpecKVError(f"the cost model has no level {', '.join(missing)}; run `speckv calibrate` for it")
    gamma_max = min(min(t.gamma_max for t in traces), *(costs[c].gamma_max for c in compressions))
    tokens, steps = training_rows(traces, compressions, decay)
    if tokens.empty or tokens["accepted"].nunique() < 2:
        raise SpecKVError("the training traces need both accepted and rejected draft tokens")
    held = tokens["prompt_id"].map(is_validation).to_numpy()
    if held.all() or not held.any():  # too few prompts to split: score on the training rows
        held = np.ones(len(tokens), bool)
        fit_rows = tokens
    else:
        fit_rows = tokens[~held]
    features = list(token_features(compressions))
    records, chosen_predictions = [], None
    for name in dict.fromkeys([kind, *compare_kinds]):
        started = time.perf_counter()
        model = AcceptancePredictor(name, features).fit(fit_rows, fit_rows["accepted"])
        seconds = time.perf_counter() - started
        predicted = model.predict(tokens[held], clip=True)
        records.append(
            prediction_scores(name, tokens[held]["accepted"].to_numpy(), predicted, seconds, len(fit_rows))
        )
        if name == kind:
            chosen_predictions = predicted
    calibration = calibration_table(tokens[held]["accepted"].to_numpy(), chosen_predictions)
    models = ControllerModels(
        compressions=compressions,
        gamma_max=gamma_max,
        token_model=AcceptancePredictor(kind, features).fit(tokens, tokens["accepted"]),
        prior_model=AcceptancePredictor(kind, list(context_features(compressions))).fit(
            tokens, tokens["accepted"]
        ),
        paper_model=AcceptancePredictor("mlp16", list(paper_features(compressions))).fit(
            steps, steps["acceptance_rate"]
        ),
        costs={c: costs[c] for c in compressions},
        context_decay=decay,
        info={
            **(info or {}),
            "kind": kind,
            "training_prompts": len({t.prompt_id for t in traces}),
            "token_rows": len(tokens),
            "step_rows": len(steps),
            "validation": records,
            "calibration": calibration.to_dict("records"),
        },
    )
    fit_probing(models, traces)
    return TrainResult(models, pd.DataFrame(records))


def fit_probing(models: ControllerModels, traces: list[Trace]) -> None:
    """Choose how often to probe while drafting does not pay: the candidate whose controller is
    fastest relative to the best baseline in replay, on average over levels. `info["rates"]` keeps,
    per level, the modelled tokens/s of the target alone, the best fixed γ and the controller on the
    training prompts (for the report; λ itself is derived where the controller runs)."""
    baselines = {}
    for level in models.compressions:
        group, cost = [t for t in traces if t.compression == level], models.costs[level]
        fixed = max(_throughput(group, FixedController(g), cost) for g in range(1, models.gamma_max + 1))
        alone = sum(t.n_tokens for t in group) / sum(target_only(t, cost).time_s for t in group)
        baselines[level] = {"target_only": alone, "best_fixed": fixed}
    best = None
    for probe_every in PROBE_CANDIDATES:
        models.probe_every = probe_every
        rates = {
            level: {
                **baselines[level],
                "achieved": _throughput(
                    [t for t in traces if t.compression == level],
                    SpecKVController(models, level, models.gamma_max, follow_costs=False),
                    models.costs[level],
                ),
            }
            for level in models.compressions
        }
        score = np.mean([r["achieved"] / max(r["best_fixed"], r["target_only"]) for r in rates.values()])
        if best is None or score > best[0]:
            best = (score, probe_every, rates)
    _, models.probe_every, models.info["rates"] = best


def _throughput(traces: list[Trace], controller: Controller, cost: CostModel) -> float:
    """Modelled tokens/s of a policy over traces (one controller across them, as live)."""
    runs = [replay(trace, controller, cost) for trace in traces]
    return sum(r.tokens for r in runs) / sum(r.time_s for r in runs)


def prediction_scores(
    kind: str, actual: np.ndarray, predicted: np.ndarray, seconds: float, rows: int
) -> dict:
    return {
        "kind": kind,
        "fit_rows": rows,
        "fit_s": seconds,
        "mae": float(np.mean(np.abs(predicted - actual))),
        "brier": float(np.mean((predicted - actual) ** 2)),
        "auc": float(roc_auc_score(actual, predicted)) if len(set(actual)) == 2 else float("nan"),
        "base_rate": float(actual.mean()),
    }


def calibration_table(actual: np.ndarray, predicted: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Mean predicted vs observed acceptance in bins of the prediction."""
    index = np.minimum((predicted * bins).astype(int), bins - 1)
    frame = pd.DataFrame({"bin": index, "predicted": predicted, "observed": actual})
    table = frame.groupby("bin").agg(
        predicted=("predicted", "mean"), observed=("observed", "mean"), tokens=("observed", "size")
    )
    return table.reset_index(drop=True)
