"""From generated token ids to the text a client sees: incremental decoding and stop strings.

A speculative step emits several tokens at once, and a stop string may span tokens (even steps),
so tokens go through `TextOutput` one at a time: the detokenizer turns each into new text once
it is complete (a multi-byte character split over tokens decodes as U+FFFD until its last byte
arrives), and the stop matcher releases text only when it cannot be the start of a stop string.
Streamed and plain responses both read this one path, so they carry the same text.

`find_stop` and `held_back_length` are pure functions over strings, tested with hand-made cases.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index in `text` where the earliest stop string begins, or None when none occurs."""
    found = [index for index in (text.find(stop) for stop in stops if stop) if index >= 0]
    return min(found) if found else None


def held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start (a proper prefix) of a stop string:
    text that must wait, because the next tokens may complete the stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class StopMatcher:
    """Stop strings over text arriving in pieces. `feed` returns (text safe to send, stopped)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""  # text held back: it may be the beginning of a stop string

    def feed(self, text: str) -> tuple[str, bool]:
        buffer = self.pending + text
        # Any stop string not seen yet starts inside `pending` or later: `pending` is the longest
        # tail that can still grow into one, so searching `buffer` alone is enough.
        cut = find_stop(buffer, self.stops)
        if cut is not None:
            self.pending = ""
            return buffer[:cut], True
        hold = held_back_length(buffer, self.stops)
        self.pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """The sequence ended without a stop string: the held-back text is plain output."""
        text, self.pending = self.pending, ""
        return text


class IncrementalDetokenizer:
    """Decodes a growing token list piece by piece, with the same text as decoding it whole.

    Each token is decoded together with the tokens since the last complete piece (`prefix`), and
    only the text beyond the prefix's own text is new: tokenizers that merge spaces or bytes
    across tokens need that context."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the tokens decoded together with the newest ones
        self.read = 0  # end of the tokens whose text has been returned

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # a special token (skipped) or an incomplete character: wait
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class TextOutput:
    """One sequence's output text: tokens in, text out, until a stop string appears."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.matcher = StopMatcher(stops)
        self.tokens = 0  # tokens consumed, up to and including the one that completed a stop string
        self.stopped = False

    def add(self, tokens: Sequence[int]) -> str:
        """Text released by `tokens`; after a stop string, the rest of them are dropped."""
        released = []
        for token in tokens:
            if self.stopped:
                break
            self.tokens += 1
            text, self.stopped = self.matcher.feed(self.detokenizer.add(token))
            released.append(text)
        return "".join(released)

    def finish(self) -> str:
        """The sequence ended (EOS or length): text still held back."""
        return "" if self.stopped else self.matcher.flush()
