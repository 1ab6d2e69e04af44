"""Drafts from earlier requests: the shared index and its eviction by hand, the drafter's choice
between its own sequence and earlier ones, sharing through `fresh()`, and lossless decoding."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import SMALL_VOCAB, chi_square_p, exact_first_two, loaded, tiny_model
from test_engine import reference_greedy
from test_ngram import switching

from speckv.controllers import make_controller
from speckv.decoding.builder import DecoderSpec
from speckv.decoding.drafters import (
    EarlierSequences,
    NGramDrafter,
    SuffixDrafter,
    SwitchingChainDrafter,
    make_drafter,
)
from speckv.decoding.drafters.ngram import Match, NGramTable
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError
from speckv.records import CopyMatch

GREEDY = SamplingConfig()


def test_earlier_sequences_are_counted_apart():
    earlier = EarlierSequences(1, 2)
    earlier.add([1, 2, 3])
    earlier.add([1, 2, 4])
    assert earlier.lookup([9, 1, 2]) == Match(2, {3: 1, 4: 1})
    # No n-gram spans two sequences: [3, 1] never occurred, so [1] alone, followed by 2 twice.
    assert earlier.lookup([3, 1]) == Match(1, {2: 2})
    assert (earlier.sequences, earlier.tokens) == (2, 6)


def test_the_oldest_sequences_are_evicted_first():
    earlier = EarlierSequences(1, 2, capacity=9)
    earlier.add([1, 2, 3])
    earlier.add([1, 2, 4])
    earlier.add([1, 2, 3])
    assert list(earlier.lookup([1, 2]).counts.items()) == [(4, 1), (3, 2)]  # 3 occurred last
    earlier.add([5, 6])  # 11 tokens > 9: the first [1, 2, 3] goes
    assert (earlier.sequences, earlier.tokens) == (3, 8)
    # 4 and 3 once each now, the latest (3, of the third sequence) still last: greedy ties go to it.
    assert list(earlier.lookup([1, 2]).counts.items()) == [(4, 1), (3, 1)]
    earlier.add([5, 6, 7, 8])  # 12 > 9: the [1, 2, 4] goes
    assert (earlier.sequences, earlier.tokens) == (3, 9)
    assert earlier.lookup([1, 2]) == Match(2, {3: 1}) and earlier.lookup([2, 4]) is None
    assert earlier.lookup([5, 6]) == Match(2, {7: 1})
    # A sequence longer than the capacity keeps its end and leaves nothing else.
    earlier.add(list(range(7, 17)))
    assert (earlier.sequences, earlier.tokens) == (1, 9)
    assert earlier.lookup([7]) is None and earlier.lookup([1]) is None
    assert earlier.lookup([8]) == Match(1, {9: 1})


def test_eviction_leaves_exactly_the_counts_of_the_sequences_kept():
    rng = random.Random(0)
    earlier = EarlierSequences(1, 3, capacity=60)
    added = [[rng.randrange(6) for _ in range(rng.randrange(1, 20))] for _ in range(40)]
    for sequence in added:
        earlier.add(sequence)
    kept, size = [], 0
    for sequence in reversed(added):  # the newest that fit, as eviction keeps them
        if size + len(sequence) > 60:
            break
        kept.insert(0, sequence)
        size += len(sequence)
    fresh = NGramTable(1, 3)
    for sequence in kept:
        fresh.count(sequence)
    assert earlier.tokens == size
    # Same n-grams, same counts and the same order of followers (the greedy tie-break).
    left = earlier.table.followers
    assert left.keys() == fresh.followers.keys()
    for key, seen in fresh.followers.items():
        assert _items(left[key]) == _items(seen), key


def _items(seen: int | dict[int, int]) -> list[tuple[int, int]]:
    """(follower, count) pairs in order, a bare follower being one seen once."""
    return [(seen, 1)] if isinstance(seen, int) else list(seen.items())


def test_capacity_and_match_lengths_are_checked():
    with pytest.raises(SpecKVError, match="at least 1 token"):
        EarlierSequences(capacity=0)
    with pytest.raises(SpecKVError, match="indexed for 1-4-token matches, the drafter matches 2-3"):
        SuffixDrafter(16, 2, 3, EarlierSequences(1, 4))


def test_the_longer_match_wins_and_the_own_sequence_wins_a_tie():
    earlier = EarlierSequences(1, 3)
    earlier.add([5, 6, 7, 8])
    drafter = SuffixDrafter(16, 1, 3, earlier)
    drafter.begin()
    # Nothing of its own matches: the earlier sequence's continuation, with its signals.
    proposals = list(drafter.draft([9, 6, 7], 2, GREEDY, None))
    assert [p.token for p in proposals] == [8]  # after 8 nothing matches anywhere
    assert proposals[0].free and proposals[0].confidence == 1.0
    # Its own "7 → 1" (1 token) loses to the earlier "6 7 → 8" (2 tokens).
    drafter.begin()
    assert [p.token for p in drafter.draft([7, 1, 6, 7], 1, GREEDY, None)] == [8]
    # Its own "6 7 → 2" ties the earlier "6 7 → 8" (neither has "0 6 7"): its own wins.
    drafter.begin()
    assert [p.token for p in drafter.draft([6, 7, 2, 0, 6, 7], 1, GREEDY, None)] == [2]
    # The plain n-gram drafter sees only its own sequence: nothing to copy.
    assert list(NGramDrafter(16, 1, 3).draft([9, 6, 7], 2, GREEDY, None)) == []


def test_an_earlier_match_counts_a_token_shorter_for_the_switch(tiny_target, tiny_drafts):
    earlier = EarlierSequences()
    earlier.add([4, 5, 6, 7, 8])
    drafter = SuffixDrafter(tiny_target.model.config.vocab_size, earlier=earlier)
    drafter.begin()
    assert drafter.copy_match([0, 5, 6, 7]) == CopyMatch(
        2, True
    )  # "5 6 7" occurred earlier: 3 tokens, counted 2
    # "5 6" is its own as well, followed by 7 and (earlier) by 7: 2
    assert drafter.copy_match([0, 5, 6, 7, 1, 5, 6]) == CopyMatch(2, True)
    assert drafter.copy_match([0, 5, 6, 7, 1, 5, 6, 2, 5, 6]) == CopyMatch(2, False)  # its own: 7, then 2
    drafter.begin()
    assert drafter.copy_match([0, 0, 6, 7]) == CopyMatch(1, True)  # "6 7": 2 tokens, counted 1
    # So the switching drafter (copying from 2-token matches) runs the model after the 2-token
    # earlier match, copies after the 3.
    switch = SwitchingChainDrafter(switching(tiny_target, tiny_drafts["unrelated"]).model, drafter.fresh())
    assert switch.min_match == 2
    switch.begin()
    copied = list(switch.draft([0, 5, 6, 7], 2, GREEDY, None))
    assert [p.token for p in copied] == [8] and copied[0].free
    switch.begin()
    drafted = list(switch.draft([0, 0, 6, 7], 2, GREEDY, None))
    assert len(drafted) == 2 and not any(p.free for p in drafted)


def test_spec_parsing_and_fresh_copies_share_the_earlier_sequences(tiny_target):
    drafter = make_drafter("suffix", tiny_target)
    assert isinstance(drafter, SuffixDrafter) and drafter.name == "suffix:1-4"
    assert make_drafter("suffix:2-3", tiny_target).name == "suffix:2-3"
    with pytest.raises(SpecKVError, match="use suffix or suffix:MIN-MAX"):
        make_drafter("suffix:x", tiny_target)
    one, two = drafter.fresh(), drafter.fresh()
    assert one.earlier is two.earlier is drafter.earlier and one.index is not two.index
    # Two prototypes share nothing.
    assert make_drafter("suffix", tiny_target).earlier is not drafter.earlier


def test_hybrid_specs_take_suffix_candidates(tiny_model_dirs, tiny_target):
    chain = make_drafter(f"{tiny_model_dirs['draft']}+suffix:2-3", tiny_target)
    assert isinstance(chain, SwitchingChainDrafter) and isinstance(chain.ngram, SuffixDrafter)
    assert chain.fresh().ngram.earlier is chain.ngram.earlier
    with pytest.raises(SpecKVError, match="DRAFT\\+ngram\\[:MIN-MAX\\] or DRAFT\\+suffix"):
        make_drafter(f"{tiny_model_dirs['draft']}+other", tiny_target)


def test_the_engine_hands_over_every_finished_or_abandoned_sequence(tiny_target):
    drafter = SuffixDrafter(tiny_target.model.config.vocab_size)
    decoder = SpeculativeDecoder(tiny_target, drafter, make_controller("fixed:3"), eos_token_ids=())
    prompt = [7, 3, 9, 11, 2]
    result = decoder.generate(prompt, 10)
    assert drafter.earlier.sequences == 1 and drafter.earlier.tokens == 15
    assert drafter.earlier.lookup(prompt + result.token_ids[:3]).length == 4  # its 4-grams are in
    stream = decoder.stream([4, 8, 12], 10)
    _, first = next(stream)
    stream.close()  # a client went away after one step: its verified text still counts
    assert drafter.earlier.sequences == 2 and drafter.earlier.tokens == 15 + 3 + len(first)


def test_requests_of_one_factory_learn_from_each_other(tiny_target):
    factory = DecoderSpec(tiny_target, draft="suffix", controller="fixed:4").build(progress=False)
    base = [7, 3, 9, 11, 2]
    first = factory.new(eos_token_ids=()).generate(base, 20)
    # A later request to the same model copies the earlier output from its first step on.
    again = factory.new(eos_token_ids=()).generate(base, 20)
    assert again.token_ids == first.token_ids
    assert again.steps[0].accepted == 4
    alone = SpeculativeDecoder(
        tiny_target, make_drafter("ngram", tiny_target), make_controller("fixed:4"), eos_token_ids=()
    )
    assert alone.generate(base, 20).steps[0].accepted == 0  # the prompt alone has nothing to copy


@pytest.mark.parametrize("spec", ["fixed:1", "fixed:4", "fixed:8", "heuristic", "confidence:0.5"])
def test_greedy_with_earlier_sequences_equals_target_greedy(tiny_target, spec):
    base = [7, 3, 9, 11, 2]
    drafter = SuffixDrafter(tiny_target.model.config.vocab_size)
    decoder = SpeculativeDecoder(tiny_target, drafter, make_controller(spec), eos_token_ids=())
    # Earlier requests: the target's own continuation of `base`, and unrelated text that also
    # matches here and there (wrong candidates the target must reject).
    drafter.end(base + reference_greedy(tiny_target.model, base, 12))
    drafter.end([5, 7, 3, 4, 4, 9, 11, 6, 2, 8])
    for prompt in ([4, 8, 9, 11], base):
        result = decoder.generate(prompt, 30)
        assert result.token_ids == reference_greedy(tiny_target.model, prompt, 30)
    assert sum(s.accepted for s in result.steps) >= 10  # copied from the earlier continuation


@pytest.mark.parametrize("spec", ["fixed:1", "fixed:4", "heuristic"])
def test_greedy_with_the_switching_drafter_and_earlier_sequences(tiny_target, tiny_drafts, spec):
    base = [7, 3, 9, 11, 2]
    vocab = tiny_target.model.config.vocab_size
    drafter = SwitchingChainDrafter(switching(tiny_target, tiny_drafts["close"]).model, SuffixDrafter(vocab))
    decoder = SpeculativeDecoder(tiny_target, drafter, make_controller(spec), eos_token_ids=())
    drafter.end(base + reference_greedy(tiny_target.model, base, 12))
    expected = reference_greedy(tiny_target.model, base, 30)
    for _ in range(2):  # the second stream also matches the first one's output
        assert decoder.generate(base, 30).token_ids == expected
    assert drafter.ngram.earlier.sequences == 3


def test_sampling_from_earlier_sequences_follows_the_target_distribution():
    target = loaded(tiny_model(seed=10, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-target")
    prompt = [4, 3, 1]  # nothing repeats within it: every draft comes from earlier sequences
    config = SamplingConfig(1.0)
    exact = exact_first_two(target.model, prompt, config)
    counts = torch.zeros(SMALL_VOCAB, SMALL_VOCAB).numpy()
    drafted = 0
    for seed in range(1200):
        earlier = EarlierSequences()
        earlier.add([3, 1, 2, 3])  # "3 1" was followed by 2 and, below, by 4: the draft samples one
        earlier.add([3, 1, 4, 2])
        drafter = SuffixDrafter(SMALL_VOCAB, earlier=earlier)
        decoder = SpeculativeDecoder(
            target, drafter, make_controller("fixed:3"), SamplingConfig(1.0, seed=seed), ()
        )
        result = decoder.generate(prompt, 2)
        counts[result.token_ids[0], result.token_ids[1]] += 1
        drafted += sum(s.gamma for s in result.steps)
    assert drafted > 600  # the drafter did propose
    assert chi_square_p(counts, exact) > 1e-3
