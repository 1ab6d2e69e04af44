"""`speckv train --trees`: fit the tree model, P(a tree node is accepted | its parent is), on a
profile.

A draft's path probability is not a calibrated acceptance probability, so the controller maps a
node's signals and the sequence context to one, fitted here. The rows come from the profile's traces without running
any tree: in greedy verification a node whose parent was accepted sits in the target's own
continuation, so the draft's candidates there are its top-k after the target's tokens, and a
candidate is accepted exactly when it is the target's next token. One teacher-forced draft pass
over prompt + continuation gives every such row: the top-k at each generated position with the
signals a tree node carries (entropy, confidence, its probability, whether it is the top choice),
the sequence context a controller has there (from replaying a fixed-γ chain policy, as the
chain models' rows do), and 1/0 for "is the target's token". Rows of the validation prompts
score the fit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from speckv.controllers.predictor import AcceptancePredictor
from speckv.controllers.sequence_context import CONTEXT_FEATURES
from speckv.controllers.speckv import compression_features, top_choice, tree_features
from speckv.decoding.cache import CachedModel
from speckv.decoding.models import LoadedModel
from speckv.errors import SpecKVError
from speckv.pipeline.replay import Trace, replay
from speckv.pipeline.training import ContextRecorder, calibration_table, prediction_scores
from speckv.util.progress import progress_bar

TOP_K = 4  # the tree drafter's children per node (speckv.decoding.drafters.tree)
CONTEXT_GAMMA = 4  # the chain policy whose steps give the sequence context of each position


def contexts_along(trace: Trace, decay: float) -> np.ndarray:
    """The controller's sequence context (`SequenceContext` values) before the step that emits
    each position, replaying fixed γ = CONTEXT_GAMMA: what a controller knows at that point."""
    recorder = ContextRecorder(CONTEXT_GAMMA, decay)
    replay(trace, recorder)
    out = np.empty((trace.n_tokens, len(CONTEXT_FEATURES)))
    t = 0
    for before, record in recorder.steps:
        out[t : t + record.tokens_produced] = before
        t += record.tokens_produced
    return out


def tree_rows(
    traces: list[Trace],
    prompts: dict[str, list[int]],
    draft: LoadedModel,
    compressions: tuple[str, ...],
    top_k: int = TOP_K,
    progress: bool = True,
    decay: float = 0.3,
) -> pd.DataFrame:
    """One row per (generated position, draft candidate): sequence context, level one-hot, node
    signals, accepted."""
    rows = []
    for trace in progress_bar(traces, desc="tree rows", show=progress):
        if trace.chains is not None:
            raise SpecKVError(
                f"{trace.prompt_id}: a feature head's profile; the tree model is fitted for draft models"
            )
        if trace.prompt_id not in prompts:
            raise SpecKVError(f"the profile lists no prompt {trace.prompt_id}")
        tokens = trace.tokens
        with torch.inference_mode():
            logits = (
                CachedModel(draft).feed(prompts[trace.prompt_id] + tokens[:-1], keep=len(tokens)).logits[0]
            )
        log_probs = torch.log_softmax(logits.float(), -1)
        probs = log_probs.exp()
        entropy = (-(probs * log_probs).sum(-1) / np.log(2.0)).numpy()
        values, indices = probs.topk(top_k, -1)
        if draft.vocab_map is not None:
            indices = draft.vocab_map[indices]
        values, indices = values.numpy(), indices.numpy()
        one_hot = [1.0 if c == trace.compression else 0.0 for c in compressions]
        accepted = indices == np.asarray(tokens)[:, None]
        frame = pd.DataFrame(
            {
                "prompt_id": trace.prompt_id,
                "compression": trace.compression,
                **dict(
                    zip(CONTEXT_FEATURES, np.repeat(contexts_along(trace, decay), top_k, 0).T, strict=True)
                ),
                **dict(zip(compression_features(compressions), one_hot, strict=True)),
                "entropy": np.repeat(entropy, top_k),
                "confidence": np.repeat(values[:, 0], top_k),
                "token_prob": values.reshape(-1),
                "accepted": accepted.reshape(-1).astype(float),
            }
        )
        frame["top_choice"] = top_choice(frame["confidence"], frame["token_prob"])
        rows.append(frame)
    if not rows:
        raise SpecKVError("no traces to fit the tree model on")
    return pd.concat(rows, ignore_index=True)[
        ["prompt_id", "compression", *tree_features(compressions), "accepted"]
    ]


def fit_tree_model(
    rows: pd.DataFrame, compressions: tuple[str, ...], validation: np.ndarray, kind: str = "mlp16"
) -> tuple[AcceptancePredictor, dict]:
    """The tree model fitted on the rows outside `validation` (a boolean mask), scored on those in
    it, then refitted on all rows; returns (model, scores with a calibration table)."""
    features = list(tree_features(compressions))
    fit = rows[~validation] if validation.any() and not validation.all() else rows
    held = rows[validation] if validation.any() else rows
    model = AcceptancePredictor(kind, features).fit(fit, fit["accepted"])
    predicted = model.predict(held, clip=True)
    actual = held["accepted"].to_numpy()
    scores = prediction_scores(kind, actual, predicted, 0.0, len(fit))
    scores.pop("fit_s")
    top = held["top_choice"].to_numpy() == 1
    scores["base_rate_top_choice"] = float(actual[top].mean())
    scores["base_rate_other"] = float(actual[~top].mean())
    scores["calibration"] = calibration_table(actual, predicted).to_dict("records")
    return AcceptancePredictor(kind, features).fit(rows, rows["accepted"]), scores
