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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from speckv.decoding.drafters.base import Drafter, Proposal, Verdict
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError
from speckv.records import CopyMatch


def ngrams(
    tokens: Sequence[int], min_match: int, max_match: int, first: int = 1
) -> Iterator[tuple[tuple[int, ...], int]]:
    """(n-gram, the token that followed it) for every n = min..max and every follower position
    from `first` on, in order of position."""
    for follower in range(max(first, 1), len(tokens)):
        for n in range(min_match, min(max_match, follower) + 1):
            yield tuple(tokens[follower - n : follower]), tokens[follower]


@dataclass(frozen=True, slots=True)
class Match:
    """What followed the longest indexed suffix: `length` tokens long, its followers' counts in
    order of their latest occurrence (greedy ties go to the most recent)."""

    length: int
    counts: dict[int, int]


class NGramTable:
    """For every counted n-gram (n = min..max), the tokens that followed it and how often.

    Memory is what limits an index of many sequences (`suffix.EarlierSequences`), so the table is
    lean: an n-gram followed once is stored with its follower alone, a bare token (most n-grams of
    real text, and a dict would cost 224 bytes); otherwise with a dict of counts kept in order of
    the followers' latest occurrence (a count moves to the end when it grows), so greedy ties go to
    the most recent follower without a second table."""

    def __init__(self, min_match: int, max_match: int):
        check_match_lengths(min_match, max_match)
        self.min_match, self.max_match = min_match, max_match
        self.followers: dict[tuple[int, ...], int | dict[int, int]] = {}

    def count(self, tokens: Sequence[int], first: int = 1) -> None:
        """Count the n-grams of `tokens` whose follower is at position `first` or later."""
        for key, token in ngrams(tokens, self.min_match, self.max_match, first):
            seen = self.followers.get(key)
            if seen is None:
                self.followers[key] = token
            elif isinstance(seen, int):
                self.followers[key] = {token: 2} if seen == token else {seen: 1, token: 1}
            else:
                seen[token] = seen.pop(token, 0) + 1

    def uncount(self, tokens: Sequence[int]) -> None:
        """Take back the counts of `tokens`, counted before every sequence still counted: the
        oldest goes first, so each n-gram's last follower stays the most recent one left."""
        for key, token in ngrams(tokens, self.min_match, self.max_match):
            seen = self.followers[key]
            if isinstance(seen, int):
                del self.followers[key]
                continue
            seen[token] -= 1  # in place: the order of the others is untouched
            if not seen[token]:
                del seen[token]
                if not seen:
                    del self.followers[key]

    def lookup(self, suffix: list[int]) -> Match | None:
        """Followers of the longest counted n-gram that ends `suffix` (None: none)."""
        for n in range(min(self.max_match, len(suffix)), self.min_match - 1, -1):
            seen = self.followers.get(tuple(suffix[-n:]))
            if seen is not None:
                return Match(n, {seen: 1} if isinstance(seen, int) else seen)
        return None


class SuffixIndex(NGramTable):
    """The n-gram table of one growing token sequence."""

    def __init__(self, min_match: int, max_match: int):
        super().__init__(min_match, max_match)
        self.tokens: list[int] = []

    def reset(self) -> None:
        self.tokens = []
        self.followers = {}

    def extend(self, tokens: list[int]) -> None:
        """Append `tokens`, counting every n-gram that now has a follower."""
        start = len(self.tokens)
        self.tokens.extend(tokens)
        self.count(self.tokens, first=start)


def proposal(
    match: Match, sampling: SamplingConfig, generator: torch.Generator | None, vocab_size: int
) -> Proposal:
    """The proposal from a match: greedy, the most frequent follower (ties go to the most recent);
    sampling, a draw from the followers' empirical distribution, which rides along for rejection
    sampling. The signals come from the same counts."""
    counts = match.counts
    total = sum(counts.values())
    probs = None
    if sampling.greedy:  # `max` keeps the first of equals: over `reversed`, the most recent
        token = max(reversed(counts), key=counts.__getitem__)
    else:
        probs = torch.zeros(vocab_size)
        probs[list(counts)] = torch.tensor(list(counts.values()), dtype=torch.float) / total
        token = int(torch.multinomial(probs, 1, generator=generator))
    shares = [c / total for c in counts.values()]
    entropy = -sum(s * math.log2(s) for s in shares)
    return Proposal(token, entropy, max(shares), counts[token] / total, probs, free=True)


def copy_match(match: Match | None, shorter_by: int = 0) -> CopyMatch:
    """What copies from `match` would continue, counted `shorter_by` tokens shorter than it is."""
    if match is None or match.length <= shorter_by:
        return CopyMatch()
    return CopyMatch(match.length - shorter_by, len(match.counts) == 1)


class NGramDrafter(Drafter):
    """Proposes what followed the longest earlier match of the sequence's suffix."""

    copies_only = True

    def __init__(self, vocab_size: int, min_match: int = 1, max_match: int = 4):
        self.name = f"ngram:{min_match}-{max_match}"
        self.vocab_size = vocab_size
        self.index = SuffixIndex(min_match, max_match)

    def fresh(self) -> NGramDrafter:
        return NGramDrafter(self.vocab_size, self.index.min_match, self.index.max_match)

    def begin(self) -> None:
        self.index.reset()

    def lookup(self, suffix: list[int]) -> Match | None:
        """What followed the longest earlier match of `suffix` (the sequence's own text so far)."""
        return self.index.lookup(suffix)

    def copy_match(self, context: list[int]) -> CopyMatch:
        """How many of the sequence's last tokens occurred before (0: nothing to copy), and
        whether one token followed them every time."""
        self.index.extend(context[len(self.index.tokens) :])
        return copy_match(self.lookup(context[-self.index.max_match :]))

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
            found = self.lookup(suffix)
            if found is None:
                return
            drafted = proposal(found, sampling, generator, self.vocab_size)
            yield drafted
            suffix = [*suffix, drafted.token][-self.index.max_match :]

    def rollback(self, kept: int, verdict: Verdict) -> None:
        """Nothing to undo: only verified text is indexed."""


def check_match_lengths(min_match: int, max_match: int) -> None:
    if not 1 <= min_match <= max_match:
        raise SpecKVError(f"n-gram match lengths must satisfy 1 ≤ min ≤ max, got {min_match}, {max_match}")
