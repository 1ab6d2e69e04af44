"""Several sequences, one target pass: a tick of continuous batching.

On a memory-bound target a pass over a few sequences costs little more than over one (the
weights are read once per pass, whatever the batch), which is where serving throughput comes
from. `step_together` runs one tick over sequence runs whose target caches are rows of one
`SlotStore` (`speckv.decoding.slots`): each run drafts its step (the controller told the batch
size and the batch's output first), or reads a chunk of a long prompt; one pass scores every
run's tokens (each row sees only its own sequence: its cached positions, its own ancestors among
the new tokens, its own position ids); then each run judges its rows and rolls back on its own.
Runs join and leave between ticks.

Drafting goes in rounds, one drafted token per run still drafting: a draft model's chains whose
caches are rows of one draft store (`start(draft_store=...)`) run each round's passes as one pass
(`SlotStore.prepare`), which on a small draft costs about what one sequence's pass does, so a
batch of 8 drafts for about the time of 2 sequences alone instead of 8.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from speckv.controllers.batch_budget import SharedVerifyBudget
from speckv.decoding.cache import Feed
from speckv.decoding.slots import SOLO_TOKENS, SlotStore
from speckv.decoding.step import DraftedStep
from speckv.errors import SpecKVError
from speckv.records import StepRecord

if TYPE_CHECKING:
    from speckv.decoding.builder import DecoderFactory
    from speckv.decoding.engine import SequenceRun, SpeculativeDecoder
    from speckv.decoding.verify import SamplingConfig


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
    runs: list[SequenceRun],
    prompt_budget: int | None = None,
    pace: BatchPace | None = None,
    shared: SharedVerifyBudget | None = None,
) -> list[tuple[StepRecord, list[int]] | None]:
    """One tick of a batch: each run either steps (drafts, then its tokens join the shared verify
    pass, then it judges and rolls back) or, while the prompt it has not read is longer than what
    is left of `prompt_budget` (prompt tokens read per pass, shortest unread prompts first; None:
    no limit), reads a chunk of it (or waits, once the budget is spent).
    Returns each run's (record, new tokens), None for a run that only read prompt this tick.
    `pace` tells the controllers the batch's recent output and learns this tick's. With `shared`
    (`Controller.batch_budget`), the controllers plan with its pass times and the batch shares
    the pass's width out by what each sequence's tokens are likely to yield (greedy decoding)."""
    tick_start = time.perf_counter()
    budget = prompt_budget
    stepping: dict[int, SequenceRun] = {}
    feeds: dict[int, Feed] = {}
    store = _store_of(runs)
    rate = pace.tokens_per_s if pace else None
    view = shared.start_tick(len(store.lengths)) if shared is not None else None
    for run in runs:
        if run.decoder.controller is not None:
            run.decoder.controller.observe_batch(len(runs), rate, view)
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
        stepping[i] = run
    pending = _draft_together(stepping)
    if shared is not None and pending:
        # Short prompt chunks widen the shared pass anyway (long ones run alone: `SlotStore.forward`)
        floor = max((len(f.tokens) for f in feeds.values() if len(f.tokens) <= SOLO_TOKENS), default=1)
        _share_pass(shared, len(store.lengths), runs, pending, floor, rate, tick_start)
    for i, step in pending.items():
        feeds[i] = runs[i].feed(step)
    if not feeds:
        return [None] * len(runs)
    started = time.perf_counter()
    store.shared_pass = None
    by_row = store.forward({runs[i].decoder.verifier.model.row: feed for i, feed in feeds.items()})
    if shared is not None and store.shared_pass is not None:
        shared.observe(*store.shared_pass)
    outputs = {i: by_row[runs[i].decoder.verifier.model.row] for i in feeds}
    results = [
        runs[i].settle(pending[i], outputs[i], started) if i in pending else None for i in range(len(runs))
    ]
    if pace is not None:
        tokens = sum(len(result[1]) for result in results if result is not None)
        pace.observe(tokens, time.perf_counter() - tick_start)
    return results


class Batch:
    """What the concurrent sequences of one `DecoderFactory` share across ticks: the target's KV
    rows, the draft model's (its chains draft for all at once), and the controller's shared
    verify budget (SpecKV's; None: each verifies what it drafted)."""

    def __init__(self, factory: DecoderFactory):
        self.store = SlotStore(factory.target)
        self.draft_store = SlotStore(factory.draft_model) if factory.draft_model is not None else None
        self.shared = factory.controller.batch_budget() if factory.controller is not None else None

    def start(
        self, decoder: SpeculativeDecoder, prompt_ids: list[int], max_new_tokens: int, min_new_tokens: int = 0
    ) -> SequenceRun:
        """`decoder.start` with its caches in rows of this batch (handed back by the run's `close`)."""
        row = self.store.acquire()
        try:
            return decoder.start(
                prompt_ids, max_new_tokens, min_new_tokens, cache=row, draft_store=self.draft_store
            )
        except BaseException:
            row.release()
            raise

    def step(
        self, runs: list[SequenceRun], prompt_budget: int | None, pace: BatchPace | None = None
    ) -> list[tuple[StepRecord, list[int]] | None]:
        """One tick of `runs` (`step_together`) with this batch's shared verify budget."""
        return step_together(runs, prompt_budget, pace, self.shared)


def generate_together(
    factory: DecoderFactory,
    prompts: list[list[int]],
    max_new_tokens: int,
    concurrency: int,
    prompt_budget: int | None = 256,
    sampling: SamplingConfig | None = None,
) -> list[list[int]]:
    """Decode `prompts` as the server does: up to `concurrency` at once, each joining as another
    finishes (continuous batching), one `step_together` per tick, with the factory's controller's
    shared verify budget. Returns each prompt's new tokens."""
    batch, pace = Batch(factory), BatchPace()
    waiting, running = list(range(len(prompts))), []
    outputs: list[list[int]] = [[] for _ in prompts]
    try:
        while waiting or running:
            while waiting and len(running) < concurrency:
                i = waiting.pop(0)
                running.append((i, batch.start(factory.new(sampling), prompts[i], max_new_tokens)))
            results = batch.step([run for _, run in running], prompt_budget, pace)
            for (i, run), result in zip(running, results, strict=True):
                if result is not None:
                    outputs[i].extend(result[1])
                if run.done:
                    run.close()
            running = [(i, run) for i, run in running if not run.done]
    finally:
        for _, run in running:
            run.close()
    return outputs


def _share_pass(
    shared: SharedVerifyBudget,
    rows: int,
    runs: list[SequenceRun],
    pending: dict[int, DraftedStep],
    floor: int,
    rate: float | None,
    tick_start: float,
) -> None:
    """Cut each drafted chain to what the shared pass's width lets it verify
    (`speckv.controllers.batch_budget.share_verify`); only greedy chains are cut, by their
    controllers' predicted reach (in sampling, dropping a token for its own probability would
    bias the output). A run still reading a long prompt rest runs its pass alone and keeps all."""

    def unread(i: int) -> int:
        return len(runs[i].tokens) - runs[i].decoder.verifier.model.length

    order = [i for i in pending if unread(i) + len(pending[i].drafted) <= SOLO_TOKENS]
    if not order:
        return
    reaches = []
    for i in order:
        controller, greedy = runs[i].decoder.controller, runs[i].decoder.sampling.greedy
        reach = controller.step_reach(pending[i].record) if controller and greedy else None
        reaches.append(reach)
    drafted = [len(pending[i].drafted) for i in order]
    bases = [unread(i) for i in order]
    sunk = time.perf_counter() - tick_start
    kept = shared.share(rows, reaches, drafted, bases, floor, rate, sunk)
    for i, keep in zip(order, kept, strict=True):
        pending[i].keep(keep)


# A draft pass feeding more tokens than this (a draft catching up on a prompt, or on the tokens
# n-gram steps skipped) runs alone: in a shared pass every row would be padded to its length.
BATCHED_FEED_LIMIT = 16


def _draft_together(runs: dict[int, SequenceRun]) -> dict[int, DraftedStep]:
    """Each run's drafting (`SequenceRun.drafting`), in rounds: before each round, the passes the
    runs' chain drafters are about to run go through their draft store as one pass, whose time is
    shared among them in their records."""
    rounds = {i: run.drafting() for i, run in runs.items()}
    so_far: dict[int, list[int]] = {}  # runs about to draft another token: their tokens so far
    done: dict[int, DraftedStep] = {}
    shares = dict.fromkeys(runs, 0.0)

    def advance(i: int) -> None:
        try:
            so_far[i] = next(rounds[i])
        except StopIteration as finished:
            so_far.pop(i, None)
            done[i] = finished.value

    for i in rounds:  # each step's budget is set, and its source chosen, before its first draft
        advance(i)
    # Who drafts each step with a chain drafter on a draft store is fixed for the tick.
    chains = {}
    for i in so_far:
        drafter = runs[i].decoder.drafter
        chain = drafter.chain_drafter(runs[i].tokens) if drafter else None
        if chain is not None and getattr(chain.model, "store", None) is not None:
            chains[i] = chain.model
    while so_far:
        passes: dict[SlotStore, dict[int, tuple]] = {}
        for i, drafted in so_far.items():
            if i not in chains:
                continue
            slot, tokens = chains[i], runs[i].tokens
            # the sequence so far (prompt, output, drafted) past what the draft's cache holds
            fed = slot.length
            feed = tokens[fed:] + drafted if fed <= len(tokens) else drafted[fed - len(tokens) :]
            if 0 < len(feed) <= BATCHED_FEED_LIMIT:
                passes.setdefault(slot.store, {})[i] = (slot, feed)
        for store, rows in passes.items():
            if len(rows) > 1:  # one alone runs its own pass
                started = time.perf_counter()
                store.prepare(dict(rows.values()))
                share = (time.perf_counter() - started) / len(rows)
                for i in rows:
                    shares[i] += share
        for i in list(so_far):
            advance(i)
        for rows in passes.values():
            for slot, _ in rows.values():
                slot.unprepare()  # a pass its drafter did not ask for after all
    for i, step in done.items():
        step.record.draft_time_s += shares[i]
    return done


def _store_of(runs: list[SequenceRun]) -> SlotStore:
    """The store every run's target cache is a row of (`SpeculativeDecoder.start(cache=...)`)."""
    stores = {id(getattr(run.decoder.verifier.model, "store", None)) for run in runs}
    store = getattr(runs[0].decoder.verifier.model, "store", None)
    if store is None or len(stores) != 1:
        raise SpecKVError(
            "runs stepped together keep their caches in one SlotStore (start(cache=store.acquire()))"
        )
    return store
