"""Drafts from earlier requests: the n-gram drafter also matching the recent sequences of every
request to the same model (SuffixDecoding's idea, in the n-gram drafter's terms).

Requests to one model repeat each other: the same template with different inputs (many math
problems in a row, many code tasks) gives outputs that share their phrasing, which an index of
the request's own text learns only after writing it. `EarlierSequences` holds the n-gram counts
of finished sequences; every drafter that `fresh()` makes from one prototype shares it by
reference (the server's requests, the API's decoders; the CLI's one decoder shares it across its
prompts). `SuffixDrafter` looks up its own sequence and the earlier ones and takes the longer
match, its own on a tie: at equal length, what this request wrote is the better evidence.

Memory is bounded: at most `capacity` tokens of sequences, the oldest evicted first. Evicting
subtracts that sequence's counts; the most recent follower of an n-gram that is still counted
then belongs to a newer sequence, all of which are kept, so greedy ties stay well defined.

Lossless like every drafter: the target verifies whatever is proposed; in sampling the proposal
is drawn from the counts as they were at that moment, and that distribution rides along.
"""

from __future__ import annotations

import threading
from collections import deque

from speckv.decoding.drafters.ngram import Match, NGramDrafter, NGramTable, copy_match
from speckv.errors import SpecKVError
from speckv.records import CopyMatch

DEFAULT_CAPACITY = 200_000  # tokens of earlier sequences kept


class EarlierSequences:
    """The n-gram counts of recent finished sequences, at most `capacity` tokens of them (the
    oldest evicted first); safe to share between threads."""

    def __init__(self, min_match: int = 1, max_match: int = 4, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise SpecKVError(f"the earlier-sequence capacity must be at least 1 token, got {capacity}")
        self.table = NGramTable(min_match, max_match)
        self.capacity = capacity
        self.tokens = 0  # held now
        self._sequences: deque[tuple[int, ...]] = deque()
        # The server decodes in one worker thread, but the API's decoders may run in several.
        self._lock = threading.Lock()

    def add(self, sequence: list[int]) -> None:
        """Count a finished sequence (its last `capacity` tokens), evicting the oldest as needed."""
        # A tuple, not an array: the n-grams' keys then share its int objects instead of making
        # their own (28 bytes each, a few per token).
        kept = tuple(sequence[-self.capacity :])
        with self._lock:
            self.table.count(kept)
            self._sequences.append(kept)
            self.tokens += len(kept)
            while self.tokens > self.capacity:
                oldest = self._sequences.popleft()
                self.tokens -= len(oldest)
                self.table.uncount(oldest)

    def lookup(self, suffix: list[int]) -> Match | None:
        """Followers of the longest suffix of `suffix` seen in an earlier sequence (a copy of the
        counts: another thread may add a sequence while the caller reads them)."""
        with self._lock:
            found = self.table.lookup(suffix)
            return None if found is None else Match(found.length, dict(found.counts))

    @property
    def sequences(self) -> int:
        return len(self._sequences)


class SuffixDrafter(NGramDrafter):
    """The n-gram drafter over its own sequence and the earlier sequences it shares."""

    def __init__(
        self, vocab_size: int, min_match: int = 1, max_match: int = 4, earlier: EarlierSequences | None = None
    ):
        super().__init__(vocab_size, min_match, max_match)
        self.name = f"suffix:{min_match}-{max_match}"
        self.earlier = earlier if earlier is not None else EarlierSequences(min_match, max_match)
        table = self.earlier.table
        if (table.min_match, table.max_match) != (min_match, max_match):
            raise SpecKVError(
                f"earlier sequences are indexed for {table.min_match}-{table.max_match}-token matches, "
                f"the drafter matches {min_match}-{max_match}"
            )

    def fresh(self) -> SuffixDrafter:
        return SuffixDrafter(self.vocab_size, self.index.min_match, self.index.max_match, self.earlier)

    def lookup(self, suffix: list[int]) -> Match | None:
        own = self.index.lookup(suffix)
        if own is not None and own.length == self.index.max_match:
            return own  # no earlier match can be longer
        earlier = self.earlier.lookup(suffix)
        if earlier is None or own is not None and own.length >= earlier.length:
            return own
        return earlier

    def copy_match(self, context: list[int]) -> CopyMatch:
        """The case for copying instead of running a draft model (`SwitchingChainDrafter`): the
        match in the sequence's own text, or one in an earlier sequence counted a token shorter.
        Another request's phrase is weaker evidence than the request repeating itself: at equal
        length its copies are accepted less than half as often (docs/drafters.md)."""
        self.index.extend(context[len(self.index.tokens) :])
        suffix = context[-self.index.max_match :]
        own, earlier = copy_match(self.index.lookup(suffix)), copy_match(self.earlier.lookup(suffix), 1)
        return own if own.length >= earlier.length else earlier

    def end(self, sequence: list[int]) -> None:
        self.earlier.add(sequence)
