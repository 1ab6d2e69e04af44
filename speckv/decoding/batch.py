"""Several sequences, one target pass: a tick of continuous batching.

On a memory-bound target a pass over a few sequences costs little more than over one (the
weights are read once per pass, whatever the batch), which is where serving throughput comes
from. `step_together` runs one tick over sequence runs whose target caches are rows of one
`SlotStore` (`speckv.decoding.slots`): each run drafts its step (the controller told the batch
size and the batch's output first), or reads a chunk of a long prompt; one pass scores every
run's tokens (each row sees only its own sequence: its cached positions, its own ancestors among
the new tokens, its own position ids); then each run judges its rows and rolls back on its own.
Runs join and leave between ticks.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from speckv.decoding.cache import Feed
from speckv.decoding.slots import SlotStore
from speckv.decoding.step import DraftedStep
from speckv.errors import SpecKVError
from speckv.records import StepRecord

if TYPE_CHECKING:
    from speckv.decoding.engine import SequenceRun


class BatchPace:
    """The batch's output, all sequences together, in tokens per second of whole ticks (drafting,
    the pass, judging): an average over recent ticks (weight `weight` for the newest), which the
    controllers weigh a step's time against."""

    def __init__(self, weight: float = 0.2):
        self.weight = weight
        self.tokens_per_s: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = tokens / seconds
        previous = self.tokens_per_s
        self.tokens_per_s = rate if previous is None else previous + self.weight * (rate - previous)


def step_together(
    runs: list[SequenceRun], prompt_budget: int | None = None, pace: BatchPace | None = None
) -> list[tuple[StepRecord, list[int]] | None]:
    """One tick of a batch: each run either steps (drafts, then its tokens join the shared verify
    pass, then it judges and rolls back) or, while the prompt it has not read is longer than what
    is left of `prompt_budget` (prompt tokens read per pass, shortest unread prompts first; None:
    no limit), reads a chunk of it (or waits, once the budget is spent).
    Returns each run's (record, new tokens), None for a run that only read prompt this tick.
    `pace` tells the controllers the batch's recent output and learns this tick's."""
    tick_start = time.perf_counter()
    budget = prompt_budget
    pending: dict[int, DraftedStep] = {}
    feeds: dict[int, Feed] = {}
    for run in runs:
        if run.decoder.controller is not None:
            run.decoder.controller.observe_batch(len(runs), pace.tokens_per_s if pace else None)
    unread = [run.unread_prompt() for run in runs]
    # The budget goes to the shortest unread prompts first: a short request steps at once even
    # while a long prompt is being read (and runs already stepping read nothing).
    for i in sorted(range(len(runs)), key=unread.__getitem__):
        run = runs[i]
        if budget is not None and unread[i] > budget:
            if budget > 0:  # this tick's share of the prompt; the rest waits for later ticks
                feeds[i] = run.prompt_chunk(budget)
                budget = 0
            continue
        if budget is not None:
            budget -= unread[i]  # the step's pass reads the rest of its prompt
        pending[i] = run.draft()
        feeds[i] = run.feed(pending[i])
    if not feeds:
        return [None] * len(runs)
    started = time.perf_counter()
    store = _store_of(runs)
    by_row = store.forward({runs[i].decoder.verifier.model.row: feed for i, feed in feeds.items()})
    outputs = {i: by_row[runs[i].decoder.verifier.model.row] for i in feeds}
    results = [
        runs[i].settle(pending[i], outputs[i], started) if i in pending else None for i in range(len(runs))
    ]
    if pace is not None:
        tokens = sum(len(result[1]) for result in results if result is not None)
        pace.observe(tokens, time.perf_counter() - tick_start)
    return results


def _store_of(runs: list[SequenceRun]) -> SlotStore:
    """The store every run's target cache is a row of (`SpeculativeDecoder.start(cache=...)`)."""
    stores = {id(getattr(run.decoder.verifier.model, "store", None)) for run in runs}
    store = getattr(runs[0].decoder.verifier.model, "store", None)
    if store is None or len(stores) != 1:
        raise SpecKVError(
            "runs stepped together keep their caches in one SlotStore (start(cache=store.acquire()))"
        )
    return store
