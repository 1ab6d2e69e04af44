"""γ policies: schedules and parsing, checked step by step by hand."""

from __future__ import annotations

import numpy as np
import pytest

from speckv.controllers import ConfidenceController, HeuristicController, make_controller
from speckv.controllers.confidence import adapted_threshold
from speckv.errors import SpecKVError
from speckv.records import StepRecord, TokenSignals


def step(gamma: int, accepted: int, probs: list[float] | None = None) -> StepRecord:
    return StepRecord(
        step=0,
        gamma_budget=gamma,
        gamma=gamma,
        accepted=accepted,
        tokens_produced=accepted + 1,
        draft_token_prob=probs or [0.5] * gamma,
    )


def test_heuristic_schedule():
    controller = HeuristicController(initial_gamma=5, gamma_max=8)
    seen = []
    for accepted_all in (True, True, False, False, True):
        gamma = controller.begin_step()
        seen.append(gamma)
        controller.end_step(step(gamma, gamma if accepted_all else 0))
    # 5 → +2 = 7 → +2 capped at 8 → -1 = 7 → -1 = 6 → (accepted) 8
    assert seen == [5, 7, 8, 7, 6]
    assert controller.begin_step() == 8


def test_heuristic_floor_and_transient_reset():
    controller = HeuristicController(initial_gamma=2, transient=True)
    for _ in range(4):
        controller.end_step(step(controller.begin_step(), 0))
    assert controller.begin_step() == 1
    controller.reset()
    assert controller.begin_step() == 2
    persistent = HeuristicController(initial_gamma=2)
    persistent.end_step(step(2, 0))
    persistent.reset()
    assert persistent.begin_step() == 1


def test_confidence_stops_below_threshold():
    controller = ConfidenceController(threshold=0.4, adaptive=False)
    assert controller.continue_drafting(TokenSignals(1, 1.0, 0.6, 0.6))
    assert not controller.continue_drafting(TokenSignals(2, 2.0, 0.3, 0.3))


def test_adapted_threshold_by_hand():
    # 4 bins. Accepted tokens had probabilities in bins 2 and 3 (2 each); rejected ones in bins 0, 1.
    accepted = np.array([0, 0, 2, 2])
    rejected = np.array([3, 1, 0, 0])
    # Threshold at edge 2 (= 0.5): no accepted token below it, no rejected one above: cost 0.
    assert adapted_threshold(accepted, rejected, current=0.9) == 0.5
    # Too few samples: keep the current threshold.
    assert adapted_threshold(np.array([1, 0, 0, 0]), np.array([0, 1, 0, 0]), current=0.4) == 0.4


def test_confidence_adapts_after_steps():
    controller = ConfidenceController(threshold=0.9, gamma_max=10)
    for _ in range(3):
        # Tokens with probability 0.8 are accepted, the next one with 0.2 is rejected.
        controller.end_step(step(3, 2, [0.8, 0.8, 0.2]))
    assert 0.2 < controller.threshold <= 0.8


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fixed:0", "gamma must be an integer from 1 to 64"),
        ("fixed:65", "gamma must be an integer from 1 to 64"),
        ("fixed", "needs a number"),
        ("fixed:x", "not an integer"),
        ("bogus", "unknown controller 'bogus'"),
        ("confidence:1.5", "threshold must be in"),
    ],
)
def test_bad_controller_specs(spec, message):
    with pytest.raises(SpecKVError, match=message):
        make_controller(spec)


def test_controller_specs():
    assert make_controller("fixed:3").begin_step() == 3
    assert make_controller("heuristic").begin_step() == 5
    assert make_controller("confidence", gamma_max=12).begin_step() == 12
    assert make_controller("confidence-fixed:0.2").name == "confidence:0.2:fixed"
