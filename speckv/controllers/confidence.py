"""Stop drafting when the draft's probability for its token falls below a threshold.

With `adaptive=True` the threshold is re-chosen after every step the way Hugging Face's assisted
generation does it: among past drafted tokens, those accepted are positives, the first rejected
one of each step a negative, and the threshold minimises FPR + 3·FNR (missing a good token costs
more than drafting a bad one). Histograms keep that O(bins) per step.
"""

from __future__ import annotations

import numpy as np

from speckv.controllers.base import Controller, check_gamma
from speckv.errors import SpecKVError

_BINS = 100


class ConfidenceController(Controller):
    def __init__(self, threshold: float = 0.4, gamma_max: int = 20, adaptive: bool = True):
        if not 0.0 <= threshold <= 1.0:
            raise SpecKVError(f"confidence threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold
        self.gamma_max = check_gamma(gamma_max, "gamma_max")
        self.adaptive = adaptive
        self.name = f"confidence:{threshold}" + ("" if adaptive else ":fixed")
        self._accepted_hist = np.zeros(_BINS, dtype=np.int64)
        self._rejected_hist = np.zeros(_BINS, dtype=np.int64)

    def begin_step(self) -> int:
        return self.gamma_max

    def continue_drafting(self, signals) -> bool:
        return signals.token_prob >= self.threshold

    def end_step(self, record) -> None:
        if not self.adaptive or record.gamma == 0:
            return
        probs = record.draft_token_prob
        for p in probs[: record.accepted]:
            self._accepted_hist[min(int(p * _BINS), _BINS - 1)] += 1
        if record.accepted < len(probs):
            self._rejected_hist[min(int(probs[record.accepted] * _BINS), _BINS - 1)] += 1
        self.threshold = adapted_threshold(self._accepted_hist, self._rejected_hist, self.threshold)


def adapted_threshold(accepted_hist: np.ndarray, rejected_hist: np.ndarray, current: float) -> float:
    """The bin edge τ minimising FPR + 3·FNR, where tokens with probability < τ stop drafting."""
    positives, negatives = accepted_hist.sum(), rejected_hist.sum()
    if positives == 0 or negatives == 0 or positives + negatives <= 5:
        return current
    # Threshold at edge k (= k / bins) keeps bins k.. : false negatives are accepted tokens below it.
    false_negatives = np.concatenate(([0], np.cumsum(accepted_hist)))
    false_positives = negatives - np.concatenate(([0], np.cumsum(rejected_hist)))
    cost = false_positives / negatives + 3.0 * false_negatives / positives
    return float(np.argmin(cost)) / len(accepted_hist)
