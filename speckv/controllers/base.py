"""The interface between the speculative loop and a γ policy.

Per step the engine asks `begin_step()` for the most tokens to draft, then, after each drafted
token, `continue_drafting(signals)` whether to draft another; in greedy decoding it may then keep
only a prefix of the drafted tokens for verification (`verify_count(record)`); after verification
it reports the step through `end_step(record)`. A policy that only picks γ ignores the per-token call; one that
only stops early returns a large budget from `begin_step`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from speckv.errors import SpecKVError

if TYPE_CHECKING:
    from speckv.controllers.batch_budget import SharedPass, SharedVerifyBudget
    from speckv.records import CopyMatch, StepRecord, TokenSignals

GAMMA_LIMIT = 64


class Drafts(enum.Enum):
    """What a controller's budget counts, so whoever builds the drafter knows what to build."""

    CHAINS = "chains"  # tokens of one chain
    TREES = "trees"  # nodes of a token tree: only a drafter that branches can spend it
    EITHER = "either"  # sizes trees where the drafter branches, chains elsewhere (learned tree model)


def check_gamma(gamma: int, what: str = "gamma") -> int:
    if isinstance(gamma, bool) or not isinstance(gamma, int) or not 1 <= gamma <= GAMMA_LIMIT:
        raise SpecKVError(f"{what} must be an integer from 1 to {GAMMA_LIMIT}, got {gamma!r}")
    return gamma


class Controller(ABC):
    """A γ policy. Subclasses keep their state small: they run inside the decoding loop."""

    name: str = "controller"
    drafts: Drafts = Drafts.CHAINS
    reads_copies: bool = False  # is told `copies_ahead` before each step (a drafter lookup)

    def bind(self, drafter) -> None:
        """The decoder's drafter (None: target only), once, before decoding: a controller whose
        `drafts` is EITHER reads `drafter.branches` here."""

    def reset(self) -> None:
        """Called before each generation: forget per-sequence state."""

    def observe_batch(
        self, sequences: int, tokens_per_s: float | None = None, shared: SharedPass | None = None
    ) -> None:
        """Before a step: how many sequences share its target pass (1 alone; the server batches
        its running requests), and the batch's recent output, all sequences together (None:
        not measured yet). A pass over a batch costs little more than over one sequence, but the
        time this step drafts and verifies delays every sequence of the batch. `shared` (from a
        `batch_budget`): the pass's seconds as its widest row feeds k = 1.. tokens, and the tick;
        then the batch shares the pass out by `step_reach`, and `verify_count` keeps every token."""

    def batch_budget(self) -> SharedVerifyBudget | None:
        """What a batch of this controller's sequences shares its verify pass by (None: each
        verifies what it drafted; `speckv.controllers.batch_budget`)."""
        return None

    def step_reach(self, record: StepRecord) -> list[float] | None:
        """For the step just drafted (`record` holds every drafted token's signals): P(the first j
        drafted tokens are all accepted), j = 1..drafted, as this controller predicts it; None:
        verify all of them. Asked in greedy decoding in a batch with a shared budget."""
        return None

    def copies_ahead(self, match: CopyMatch) -> None:
        """Before `begin_step`, where `reads_copies`: how many of the sequence's last tokens the
        drafter found earlier, whose continuation it could copy (n-gram candidates: no draft pass
        runs for them; length 0 where it has nothing to copy), and whether one token followed
        them every time."""

    def copies_chosen(self) -> bool | None:
        """After `begin_step`, where `reads_copies`: whether the step drafts the copies (True) or
        the draft model's tokens (False); None leaves it to the drafter's own rule."""
        return None

    @abstractmethod
    def begin_step(self) -> int:
        """The most tokens to draft in the coming step (0..GAMMA_LIMIT; 0 = a plain target step)."""

    def continue_drafting(self, signals: TokenSignals) -> bool:
        """After each drafted token: draft another one (until the step's budget)?"""
        return True

    def verify_count(self, record: StepRecord) -> int:
        """How many of the drafted tokens (a prefix, 0..all) the target verifies; all by default.
        `record` holds the signals of every drafted token. Drafting is paid by now, but a wider
        target pass costs more (on CPUs a lot more), so a token that will likely be rejected can be
        dropped. Asked in greedy decoding only: in sampling, dropping a token because of its own
        probability would bias the output."""
        return len(record.draft_confidence)

    def end_step(self, record: StepRecord) -> None:
        """After verification: learn from what was accepted."""

    def describe(self) -> str:
        return self.name
