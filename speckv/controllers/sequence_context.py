"""What earlier steps of the current sequence showed: the context features every SpecKV model
reads (`CONTEXT_FEATURES`), computed one way for training (`speckv.pipeline.training`) and for
decisions (`speckv.controllers.speckv`), so the features a model was fitted on are the ones it sees."""

from __future__ import annotations

CONTEXT_FEATURES = (
    "first_step",
    "recent_acceptance",
    "last_acceptance",
    "recent_entropy",
    "prev_mean_draft_entropy",
    "prev_mean_draft_confidence",
    "prev_max_draft_entropy",
    "prev_min_draft_confidence",
)


class SequenceContext:
    """What earlier steps of the current sequence showed, as the `CONTEXT_FEATURES` values.

    Acceptance is observed for the drafted tokens up to the first rejection; `recent_*` are
    exponential moving averages (weight `decay` on the newest observation). A step that verifies
    no drafted token observes nothing, yet the text moves on: the acceptance features then revert
    towards the sequence's long-run acceptance by `decay` per step, as a forecast of an AR(1)
    process one step further ahead does, so a run of rejections does not keep the controller idle
    for the rest of the sequence.
    """

    LONG_RUN = 0.05  # weight of each judged token in the sequence's long-run acceptance

    def __init__(self, decay: float = 0.3):
        self.decay = decay
        self.reset()

    def reset(self) -> None:
        self.values = [1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
        self.long_run = 0.5

    def update(self, record) -> None:
        values, decay = self.values, self.decay
        if record.gamma == 0:
            if not values[0]:
                values[1] += decay * (self.long_run - values[1])
                values[2] += decay * (self.long_run - values[2])
            return
        recent = values[1]
        # A tree's accepted path runs along its depth: read it as a chain that long.
        length = record.depth or record.gamma
        for i in range(min(record.accepted + 1, length)):
            recent += decay * ((1.0 if i < record.accepted else 0.0) - recent)
            self.long_run += self.LONG_RUN * ((1.0 if i < record.accepted else 0.0) - self.long_run)
        entropy = values[3]
        for e in record.draft_entropy:
            entropy += decay * (e - entropy)
        entropies, confidences = record.draft_entropy, record.draft_confidence
        self.values = [
            0.0,
            recent,
            record.accepted / length,
            entropy,
            sum(entropies) / len(entropies),
            sum(confidences) / len(confidences),
            max(entropies),
            min(confidences),
        ]
