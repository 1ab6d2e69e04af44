"""The n-gram drafter: continuations copied from the prompt and the text generated so far.

Prompt lookup / suffix matching: find the longest suffix of the sequence (from `max_match` down to
`min_match` tokens) that occurred before, and propose the tokens that followed it. It costs no
model forward, so even a modest acceptance pays; it shines where the output repeats its input
(summaries quoting the source, code editing, retrieval answers).

Signals come from the counts: among the earlier occurrences of the matched suffix, the empirical
distribution of the token that followed gives the entropy, the confidence (its largest share)
and the proposed token's share, so controllers read them as they read a model's. In sampling the
proposal is drawn from that distribution, which makes rejection sampling exact.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

import torch

from speckv.decoding.drafters.base import Drafter, Proposal, Verdict
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError


class SuffixIndex:
    """For every n-gram (n = min..max) of a growing token sequence, the tokens that followed it."""

    def __init__(self, min_match: int, max_match: int):
        self.min_match, self.max_match = min_match, max_match
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.followers: dict[tuple[int, ...], Counter] = {}
        self.last_position: dict[tuple[int, ...], int] = {}  # most recent occurrence's follower index

    def extend(self, tokens: list[int]) -> None:
        """Append `tokens`, indexing every n-gram that now has a follower."""
        start = len(self.tokens)
        self.tokens.extend(tokens)
        for follower in range(max(start, 1), len(self.tokens)):
            token = self.tokens[follower]
            for n in range(self.min_match, min(self.max_match, follower) + 1):
                key = tuple(self.tokens[follower - n : follower])
                self.followers.setdefault(key, Counter())[token] += 1
                self.last_position[key] = follower

    def match_length(self, suffix: list[int]) -> int:
        """The length of the longest indexed suffix of `suffix` (0: none)."""
        for n in range(min(self.max_match, len(suffix)), self.min_match - 1, -1):
            if tuple(suffix[-n:]) in self.followers:
                return n
        return 0

    def lookup(self, suffix: list[int]) -> tuple[Counter, int] | None:
        """Followers of the longest indexed suffix of `suffix`, and the most recent one's index."""
        for n in range(min(self.max_match, len(suffix)), self.min_match - 1, -1):
            key = tuple(suffix[-n:])
            if key in self.followers:
                return self.followers[key], self.last_position[key]
        return None


class NGramDrafter(Drafter):
    """Proposes what followed the longest earlier match of the sequence's suffix."""

    def __init__(self, vocab_size: int, min_match: int = 1, max_match: int = 4):
        if not 1 <= min_match <= max_match:
            raise SpecKVError(
                f"n-gram match lengths must satisfy 1 ≤ min ≤ max, got {min_match}, {max_match}"
            )
        self.name = f"ngram:{min_match}-{max_match}"
        self.vocab_size = vocab_size
        self.index = SuffixIndex(min_match, max_match)

    def fresh(self) -> NGramDrafter:
        return NGramDrafter(self.vocab_size, self.index.min_match, self.index.max_match)

    def begin(self) -> None:
        self.index.reset()

    def match_length(self, context: list[int]) -> int:
        """How many of the sequence's last tokens occurred before (0: nothing to copy)."""
        self.index.extend(context[len(self.index.tokens) :])
        return self.index.match_length(context[-self.index.max_match :])

    def draft(
        self,
        context: list[int],
        budget: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Iterator[Proposal]:
        self.index.extend(context[len(self.index.tokens) :])
        # Drafted tokens extend the suffix to match but are not indexed: they may be rejected.
        suffix = context[-self.index.max_match :]
        for _ in range(budget):
            found = self.index.lookup(suffix)
            if found is None:
                return
            counts, recent = found
            total = sum(counts.values())
            probs = None
            if sampling.greedy:
                # The most frequent follower; ties go to the most recent occurrence's follower.
                top = max(counts.values())
                latest = self.index.tokens[recent]
                token = latest if counts[latest] == top else max(counts, key=counts.__getitem__)
            else:
                probs = torch.zeros(self.vocab_size)
                probs[list(counts)] = torch.tensor(list(counts.values()), dtype=torch.float) / total
                token = int(torch.multinomial(probs, 1, generator=generator))
            shares = [c / total for c in counts.values()]
            entropy = -sum(s * math.log2(s) for s in shares)
            yield Proposal(token, entropy, max(shares), counts[token] / total, probs, free=True)
            suffix = [*suffix[1:], token] if len(suffix) >= self.index.max_match else [*suffix, token]

    def rollback(self, kept: int, verdict: Verdict) -> None:
        """Nothing to undo: only verified text is indexed."""
