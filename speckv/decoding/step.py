"""One speculative step, the controller-facing protocol, written once.

The engine runs it with live models; offline replay runs it with a recorded trace standing in for
the drafter and the target (`speckv.pipeline.replay`), so every controller sees exactly the same
calls in both:

1. `begin_step()` sets the budget, capped at what the sequence may still use (a controller that
   `reads_copies` is told first how long a match the drafter could copy from, `copies_ahead`, and
   the drafter then whether the step copies, `copies_chosen`);
2. the drafter proposes tokens until the budget, an end-of-sequence token, or
   `continue_drafting(signals)` returning False;
3. in greedy decoding `verify_count(record)` may keep only a prefix for the target (range-checked;
   drafters propose parents before children, so a prefix of a token tree is a tree);
4. the verifier decides (accepted tokens, the target's next token), and both sides roll back to
   the kept sequence;
5. `end_step(record)` sees the finished record.

Times are wall-clock seconds, or modelled by a cost model when one is given (replay).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Protocol

import torch

from speckv.controllers.base import Controller
from speckv.costs import CostModel
from speckv.decoding.drafters.base import Drafter, Verdict
from speckv.decoding.tree import check_parents, depths
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError
from speckv.records import StepRecord, TokenSignals


class Verifier(Protocol):
    """The target's side of a step."""

    def verify(
        self,
        context: list[int],
        drafted: list[int],
        parents: list[int],
        draft_probs: list[torch.Tensor],
        generator: torch.Generator | None,
    ) -> Verdict: ...

    def rollback(self, kept: int) -> None: ...


def asked_budget(controller: Controller) -> int:
    """`controller.begin_step()`, checked: a budget is an integer ≥ 0."""
    wanted = controller.begin_step()
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 0:
        raise SpecKVError(f"{controller.describe()} set a budget of {wanted!r}; budgets are integers ≥ 0")
    return wanted


def asked_prefix(controller: Controller, record: StepRecord) -> int:
    """`controller.verify_count(record)`, checked: a prefix length, 0 to every drafted token."""
    drafted = len(record.draft_confidence)
    keep = controller.verify_count(record)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= drafted:
        raise SpecKVError(f"{controller.describe()} asked to verify {keep!r} of {drafted} tokens")
    return keep


@dataclass
class DraftedStep:
    """A step between drafting and verification: the record so far and what the target verifies."""

    record: StepRecord
    drafted: list[int]
    parents: list[int]  # a chain unless the drafter says otherwise (speckv.decoding.tree)
    draft_probs: list[torch.Tensor]

    def keep(self, count: int) -> None:
        """Verify only the first `count` drafted tokens (a prefix of a tree is a tree)."""
        self.drafted, self.parents = self.drafted[:count], self.parents[:count]
        self.record.parents = self.parents
        self.draft_probs = self.draft_probs[:count]


def run_step(
    step: int,
    context: list[int],
    cap: int,
    controller: Controller | None,
    drafter: Drafter | None,
    verifier: Verifier,
    sampling: SamplingConfig,
    eos_ids: frozenset[int],
    generator: torch.Generator | None = None,
    cost: CostModel | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[StepRecord, list[int]]:
    """Run one step after `context` (the whole sequence so far, which the caller extends with the
    returned tokens); `cap` = the most tokens the step may draft. Returns (record, new tokens).
    A batch of sequences runs the same two halves around one shared target pass
    (`speckv.decoding.batch`)."""
    pending = draft_step(step, context, cap, controller, drafter, sampling, eos_ids, generator, clock)
    verify_start = clock()
    verdict = verifier.verify(context, pending.drafted, pending.parents, pending.draft_probs, generator)
    return settle_step(
        pending, verdict, context, controller, drafter, verifier, eos_ids, verify_start, cost, clock
    )


def draft_step(
    step: int,
    context: list[int],
    cap: int,
    controller: Controller | None,
    drafter: Drafter | None,
    sampling: SamplingConfig,
    eos_ids: frozenset[int],
    generator: torch.Generator | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> DraftedStep:
    """Protocol points 1-3: the budget, the drafting, the verified prefix."""
    rounds = drafting(step, context, cap, controller, drafter, sampling, eos_ids, generator, clock)
    while True:
        try:
            next(rounds)
        except StopIteration as finished:
            return finished.value


def drafting(
    step: int,
    context: list[int],
    cap: int,
    controller: Controller | None,
    drafter: Drafter | None,
    sampling: SamplingConfig,
    eos_ids: frozenset[int],
    generator: torch.Generator | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Generator[list[int], None, DraftedStep]:
    """`draft_step` in rounds: it yields the tokens drafted so far each time it is about to ask
    the drafter for another, and returns the `DraftedStep`. A batch runs every sequence's next
    draft pass at once between rounds (`speckv.decoding.batch`); the time spent paused is not
    this step's drafting."""
    started = clock()
    budget = 0
    if controller is not None and drafter is not None:
        if controller.reads_copies:
            controller.copies_ahead(drafter.copy_match(context))
        budget = min(asked_budget(controller), cap)
        if controller.reads_copies:
            drafter.use_copies(controller.copies_chosen())
    record = StepRecord(step=step, gamma_budget=budget, gamma=0, accepted=0, tokens_produced=0)
    record.controller_time_s = clock() - started

    drafted: list[int] = []
    parents: list[int] = []
    draft_probs: list[torch.Tensor] = []
    if budget > 0:
        unread = drafter.unread(context)  # before drafting reads it
        draft_start = clock()
        asking = paused = 0.0
        proposals = drafter.draft(context, budget, sampling, generator)
        for position in range(1, budget + 1):
            pause = clock()
            yield drafted
            paused += clock() - pause
            proposal = next(proposals, None)
            if proposal is None:
                break
            record.draft_entropy.append(proposal.entropy)
            record.draft_confidence.append(proposal.confidence)
            record.draft_token_prob.append(proposal.token_prob)
            drafted.append(proposal.token)
            record.copied += proposal.free
            parent = position - 2 if proposal.parent is None else proposal.parent
            parents.append(parent)
            if proposal.probs is not None:
                draft_probs.append(proposal.probs)
            if proposal.token in eos_ids or position >= budget:
                break
            asked = clock()
            go_on = controller.continue_drafting(
                TokenSignals(
                    position,
                    proposal.entropy,
                    proposal.confidence,
                    proposal.token_prob,
                    parent,
                    proposal.free,
                )
            )
            asking += clock() - asked
            if not go_on:
                break
        record.controller_time_s += asking
        record.draft_time_s = clock() - draft_start - asking - paused
        record.draft_read = unread if len(drafted) > record.copied else 0
    record.drafted = len(drafted)
    record.parents = parents
    if draft_probs and len(draft_probs) != len(drafted):
        raise SpecKVError(f"drafter {drafter.name} gave distributions for some proposals but not all")
    if drafted and sampling.greedy:
        asked = clock()
        keep = asked_prefix(controller, record)
        record.controller_time_s += clock() - asked
    else:
        keep = len(drafted)
    check_parents(parents)
    step = DraftedStep(record, drafted, parents, draft_probs)
    step.keep(keep)
    return step


def settle_step(
    pending: DraftedStep,
    verdict: Verdict,
    context: list[int],
    controller: Controller | None,
    drafter: Drafter | None,
    verifier: Verifier,
    eos_ids: frozenset[int],
    verify_start: float,
    cost: CostModel | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[StepRecord, list[int]]:
    """Protocol points 4-5 once the target has judged: the new tokens, both sides rolled back to
    the kept sequence, the record finished and shown to the controller."""
    record, drafted, parents = pending.record, pending.drafted, pending.parents
    new_tokens = [*verdict.accepted_tokens, verdict.next_token]
    hit_eos = next((i for i, t in enumerate(new_tokens) if t in eos_ids), None)
    if hit_eos is not None:
        new_tokens = new_tokens[: hit_eos + 1]
    kept = len(context) + verdict.accepted  # what both sides keep: the next token is not fed yet
    verifier.rollback(kept)
    if drafter is not None:
        drafter.rollback(kept, verdict)
    record.verify_time_s = clock() - verify_start

    record.gamma, record.accepted, record.tokens_produced = len(drafted), verdict.accepted, len(new_tokens)
    record.depth = max(depths(parents), default=-1) + 1
    if cost is not None:
        record.draft_time_s = (record.drafted - record.copied) * cost.t_draft_s + cost.read_time(
            record.draft_read
        )
        record.verify_time_s = cost.t_verify_s[record.gamma]
    if controller is not None:
        ended = clock()
        controller.end_step(record)
        record.controller_time_s += clock() - ended
    return record, new_tokens
