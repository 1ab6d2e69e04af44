"""Stop strings and incremental detokenization of the server (pure functions, hand-made cases)."""

from __future__ import annotations

import pytest
from conftest import tiny_tokenizer

from speckv.decoding.text import IncrementalDetokenizer, StopMatcher, TextOutput, find_stop, held_back_length


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello world", ["world"], 6),
        ("hello world", ["xyz"], None),
        ("abcabc", ["c", "b"], 1),  # the earliest occurrence of any stop string wins
        ("abc", [], None),
        ("abc", [""], None),  # an empty stop string never matches
        ("a\nb", ["\n"], 1),
    ],
)
def test_find_stop(text, stops, expected):
    assert find_stop(text, stops) == expected


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello wor", ["world"], 3),
        ("hello world", ["world"], 0),  # a whole stop string is found, not held back
        ("hello", ["xyz"], 0),
        ("aaa", ["aab"], 2),
        ("xa", ["ab", "aXb"], 1),
        ("ab", ["abc", "bcd"], 2),  # the longest tail that can still grow into a stop string
        ("", ["abc"], 0),
        ("ab", ["abc", "b"], 2),
    ],
)
def test_held_back_length(text, stops, expected):
    assert held_back_length(text, stops) == expected


def feed_all(pieces: list[str], stops: list[str]) -> tuple[list[str], bool, str]:
    matcher = StopMatcher(stops)
    released, stopped = [], False
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        released.append(text)
        if stopped:
            break
    return released, stopped, "" if stopped else matcher.flush()


def test_stop_string_across_pieces():
    released, stopped, rest = feed_all(["Hel", "lo ST", "O", "P more"], ["STOP"])
    assert stopped and "".join(released) == "Hello " and rest == ""
    assert released[:3] == ["Hel", "lo ", ""]  # "ST" and "STO" wait: they may start "STOP"


def test_false_start_is_released():
    released, stopped, rest = feed_all(["a ST", "ART b"], ["STOP"])
    assert not stopped and "".join(released) + rest == "a START b"
    assert released == ["a ", "START b"]


def test_held_back_text_flushed_at_the_end():
    released, stopped, rest = feed_all(["end S", "T"], ["STOP"])
    assert not stopped and released == ["end ", ""] and rest == "ST"


def test_earliest_of_several_stops_and_overlap():
    released, stopped, _ = feed_all(["x", "yz", "ab"], ["zab", "yz"])
    assert stopped and "".join(released) == "x"
    released, stopped, _ = feed_all(["aa", "ab"], ["aab"])
    assert stopped and "".join(released) == "a"


class CharTokenizer:
    """Token i decodes to bytes; multi-byte characters split over tokens decode as U+FFFD."""

    def __init__(self, pieces: dict[int, bytes]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_detokenizer_waits_for_a_split_character():
    euro = "€".encode()  # three bytes, one token each
    tokenizer = CharTokenizer({1: b"a", 2: euro[:1], 3: euro[1:2], 4: euro[2:], 5: b"b"})
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(t) for t in (1, 2, 3, 4, 5)] == ["a", "", "", "€", "b"]


def test_detokenizer_matches_whole_decode_and_skips_special_tokens():
    tokenizer = tiny_tokenizer()
    ids = [5, 9, 1, 12, 0, 7]  # 1 = </s> and 0 = <s> are special
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add(t) for t in ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_text_output_counts_tokens_up_to_the_stop():
    tokenizer = tiny_tokenizer()
    output = TextOutput(tokenizer, ["w7 w"])  # spans two tokens and the space between them
    assert output.add([5, 6]) == "w5 w6"
    assert output.add([7]) == " "  # "w7" may start the stop string: held back
    assert output.add([8, 9, 10]) == ""  # "w7 w8" → cut before "w7 w"; 9 and 10 are dropped
    assert output.stopped and output.tokens == 4 and output.finish() == ""
