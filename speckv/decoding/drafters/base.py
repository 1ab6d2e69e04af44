"""The drafter interface: what the loop needs from anything that proposes tokens.

Per step the loop iterates `draft(context, budget, …)`, one `Proposal` at a time, and stops
pulling when the budget is reached, a proposal is an end-of-sequence token or the controller says
stop (the stopping rules live in the step protocol, `speckv.decoding.step`, not in drafters).
After verification it calls `rollback(kept, verdict)`: the drafter keeps the first `kept`
positions of the sequence in whatever state it holds (a KV cache, a suffix index, nothing).
`begin()` and `end(sequence)` bracket each sequence; `end` hands over the whole of it, which a
drafter matching earlier requests (`suffix.SuffixDrafter`) indexes.

A drafter that reads the target's hidden states (a feature head) names the layers in
`target_hidden_layers`; the verify pass then returns them in `Verdict.hidden_states` without an
extra target forward. A model-free drafter (n-gram) needs no state at all; a tree drafter
proposes more than one chain, and the verifier reports the accepted path as tokens, so the loop
never indexes the draft itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from speckv.decoding.models import LoadedModel
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError
from speckv.records import CopyMatch


@dataclass(frozen=True, slots=True)
class Proposal:
    """One drafted token with the drafter's signals about it."""

    token: int
    entropy: float  # bits, of the drafter's next-token distribution
    confidence: float  # that distribution's largest probability
    token_prob: float  # probability of `token` under it
    probs: torch.Tensor | None = None  # full target-vocabulary distribution; sampling only
    # Index (in proposal order) of the node this token follows, -1 for the root (the sequence's
    # last token); None = the previous proposal, which makes a chain.
    parent: int | None = None
    free: bool = False  # copied, not drafted: no draft pass ran for it (n-gram candidates)


@dataclass
class Verdict:
    """What verification decided: the accepted drafted tokens and the target's own next token."""

    accepted_tokens: list[int]
    next_token: int
    # Indices (in proposal order) of the accepted nodes, root first: 0..accepted-1 for a chain.
    path: list[int] = field(default_factory=list)
    # Hidden states of the target pass (one tensor per layer in `target_hidden_layers`, shape
    # (positions fed, hidden)); None unless the drafter asked for them.
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def accepted(self) -> int:
        return len(self.accepted_tokens)


def on_target_vocab(probs: torch.Tensor, vocab_map: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """A reduced-vocabulary distribution placed on the target's vocabulary (for rejection sampling)."""
    if vocab_map is None:
        return probs
    full = torch.zeros(vocab_size, device=probs.device)
    return full.index_copy_(0, vocab_map.to(probs.device), probs)


class Drafter(ABC):
    """Proposes candidate tokens for the target to verify; one sequence at a time."""

    name: str = "drafter"
    target_hidden_layers: tuple[int, ...] = ()
    branches: bool = False  # proposes token trees (proposals name their parents)
    copies_only: bool = False  # every proposal is copied (n-gram): there is no draft model
    loaded: LoadedModel | None = None  # the draft model it runs, if any (context limits, baselines)

    def fresh(self) -> Drafter:
        """Another drafter like this one for a concurrent sequence, sharing its weights (the
        server gives each request its own)."""
        raise SpecKVError(f"drafter {self.name} cannot be copied for concurrent sequences")

    def begin(self) -> None:
        """A new sequence starts: forget the previous one."""

    def end(self, sequence: list[int]) -> None:
        """The sequence is over (finished, stopped early or abandoned): `sequence` is all of it,
        prompt and verified output. Only a drafter that learns across sequences keeps anything."""

    @abstractmethod
    def draft(
        self,
        context: list[int],
        budget: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Iterator[Proposal]:
        """Propose up to `budget` tokens following `context` (the whole sequence so far), lazily:
        the loop stops iterating when it has enough."""

    def rollback(self, kept: int, verdict: Verdict) -> None:
        """After verification: keep the first `kept` positions of the sequence."""

    def copy_match(self, context: list[int]) -> CopyMatch:
        """How many of the last tokens of `context` occurred earlier, whose continuation the
        proposals after it could copy (free: no draft pass runs for them; length 0: nothing to
        copy), and whether one token followed them every time. A controller may want to know
        before it sets the budget."""
        return CopyMatch()

    def unread(self, context: list[int]) -> int:
        """How many tokens of `context` the draft model would read before drafting after it: 1 or
        2 after its own step (the target's token, and its last drafted one when all were
        accepted), the whole prompt at a sequence's first pass, more after steps it sat out
        (copies, plain steps). 0 where no draft model runs (n-grams); trees and feature heads do
        not tell."""
        return 0

    def use_copies(self, copy: bool | None) -> None:
        """For the next `draft` only: draft the copies (True) or the draft model's tokens (False),
        as the controller chose; None: the drafter's own rule. Only a drafter with both sources
        (`hybrid.SwitchingChainDrafter`) has a choice to make."""

    def chain_drafter(self, context: list[int] | None = None) -> Drafter | None:
        """The draft model's chain drafter (`ModelDrafter`) inside this one: one pass per drafted
        token over its cache `model`, which a batch makes a row of one draft store so that every
        sequence's next pass runs as one (`speckv.decoding.batch`). Given `context`: only if it
        drafts the step after it. None where there is none (n-grams, trees and feature heads
        draft each sequence alone)."""
        return None
