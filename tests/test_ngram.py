"""The n-gram drafter: suffix matching worked out by hand, and lossless decoding with it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_VOCAB, chi_square_p, exact_first_two, loaded, tiny_model
from test_engine import reference_greedy

from speckv.controllers import make_controller
from speckv.decoding.drafters import ModelDrafter, NGramDrafter, SwitchingChainDrafter, Verdict, make_drafter
from speckv.decoding.drafters.ngram import Match, NGramTable, SuffixIndex, ngrams, proposal
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError
from speckv.records import CopyMatch

GREEDY = SamplingConfig()


def test_ngrams_by_hand():
    # Followers at positions 1, 2, 3; the 2-grams start once a follower has two tokens before it.
    assert list(ngrams([5, 6, 7, 8], 1, 2)) == [((5,), 6), ((6,), 7), ((5, 6), 7), ((7,), 8), ((6, 7), 8)]
    assert list(ngrams([5, 6, 7, 8], 2, 3, first=3)) == [((6, 7), 8), ((5, 6, 7), 8)]


def test_suffix_index_by_hand():
    index = SuffixIndex(min_match=1, max_match=2)
    index.extend([1, 2, 3, 1, 2])
    index.extend([4, 1, 2])  # indexed incrementally: the same as all at once
    # [1, 2] was followed by 3, then by 4: counts in order of the latest occurrence.
    found = index.lookup([9, 1, 2])
    assert found == Match(2, {3: 1, 4: 1}) and list(found.counts) == [3, 4]
    # The longest match wins: [2, 1] never occurred, so [1] alone: followed by 2, 2, 2.
    assert index.lookup([2, 1]) == Match(1, {2: 3})
    assert index.lookup([7]) is None
    # An n-gram followed once holds its follower alone; a second follower makes a dict of counts.
    assert index.followers[(2, 3)] == 1 and index.followers[(1, 2)] == {3: 1, 4: 1}


def test_table_keeps_followers_in_order_of_their_latest_occurrence():
    table = NGramTable(1, 1)
    table.count([5, 1, 5, 2, 5, 1])  # 5 → 1, 5 → 2, 5 → 1: 1 occurred last
    assert list(table.followers[(5,)].items()) == [(2, 1), (1, 2)]
    table.count([5, 2])
    assert list(table.followers[(5,)].items()) == [(1, 2), (2, 2)]
    # A tie of counts goes to the most recent follower, 2.
    (greedy,) = [proposal(table.lookup([5]), GREEDY, None, 8)]
    assert greedy.token == 2 and greedy.token_prob == 0.5 and greedy.entropy == pytest.approx(1.0)
    # Taking back the oldest sequence leaves the order of what remains.
    table.uncount([5, 1, 5, 2, 5, 1])
    assert table.followers[(5,)] == {2: 1} and (1,) not in table.followers


def test_drafter_copies_the_continuation_with_count_signals():
    drafter = NGramDrafter(vocab_size=16, min_match=1, max_match=3)
    proposals = list(drafter.draft([5, 6, 7, 8, 9, 5, 6], 3, GREEDY, None))
    assert [p.token for p in proposals] == [7, 8, 9]
    assert all(p.confidence == p.token_prob == 1.0 and p.entropy == 0.0 for p in proposals)
    # Two followers seen once each: 1 bit of entropy, confidence ½, the most recent one proposed.
    drafter.begin()
    (first,) = drafter.draft([1, 2, 3, 1, 2, 4, 1, 2], 1, GREEDY, None)
    assert first.token == 4 and first.entropy == pytest.approx(1.0) and first.token_prob == 0.5
    # Nothing to copy: no proposal, the step becomes a plain target step.
    drafter.begin()
    assert list(drafter.draft([1, 2, 3], 4, GREEDY, None)) == []
    # Told before drafting: how long a match the copies would continue, and whether its followers
    # agree ("1 2" was followed by 3 and by 4; "3 1 2" by 4 alone).
    assert drafter.copy_match([1, 2, 3]) == CopyMatch() and drafter.copies_only
    assert drafter.copy_match([1, 2, 3, 1]) == CopyMatch(1, True)
    assert drafter.copy_match([1, 2, 3, 1, 2]) == CopyMatch(2, True)
    assert drafter.copy_match([1, 2, 3, 1, 2, 4, 1, 2]) == CopyMatch(2, False)
    drafter.begin()
    assert drafter.copy_match([1, 2, 3, 1, 2, 4, 3, 1, 2]) == CopyMatch(3, True)


def test_drafter_spec_parsing(tiny_target):
    assert make_drafter("ngram", tiny_target).name == "ngram:1-4"
    assert make_drafter("ngram:2-3", tiny_target).name == "ngram:2-3"
    with pytest.raises(SpecKVError, match="bad n-gram drafter"):
        make_drafter("ngram:x", tiny_target)
    with pytest.raises(SpecKVError, match="min ≤ max"):
        make_drafter("ngram:3-2", tiny_target)


@pytest.mark.parametrize("spec", ["fixed:1", "fixed:4", "fixed:8", "heuristic", "confidence:0.5"])
def test_greedy_with_ngrams_equals_target_greedy(tiny_target, spec):
    base = [7, 3, 9, 11, 2]
    # A prompt that contains the target's own continuation: copying it is often right.
    continuation = reference_greedy(tiny_target.model, base, 12)
    prompt = base + continuation + [5] + base
    expected = reference_greedy(tiny_target.model, prompt, 30)
    drafter = NGramDrafter(tiny_target.model.config.vocab_size)
    decoder = SpeculativeDecoder(tiny_target, drafter, make_controller(spec), eos_token_ids=())
    result = decoder.generate(prompt, 30)
    assert result.token_ids == expected
    assert sum(s.accepted for s in result.steps) >= 5  # the copied continuation was accepted
    again = decoder.generate(prompt, 30)  # a second stream on the same decoder starts clean
    assert again.token_ids == expected


def test_sampling_with_ngrams_follows_the_target_distribution():
    target = loaded(tiny_model(seed=10, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-target")
    prompt = [3, 1, 2, 3, 1, 4, 3, 1]  # [3, 1] was followed by 2 and by 4: the draft samples one
    config = SamplingConfig(1.0)
    exact = exact_first_two(target.model, prompt, config)
    counts = torch.zeros(SMALL_VOCAB, SMALL_VOCAB).numpy()
    drafted = 0
    for seed in range(1200):
        decoder = SpeculativeDecoder(
            target, NGramDrafter(SMALL_VOCAB), make_controller("fixed:3"), SamplingConfig(1.0, seed=seed), ()
        )
        result = decoder.generate(prompt, 2)
        counts[result.token_ids[0], result.token_ids[1]] += 1
        drafted += sum(s.gamma for s in result.steps)
    assert drafted > 600  # the drafter did propose
    assert chi_square_p(counts, exact) > 1e-3


def test_generate_with_the_ngram_drafter(capsys, tiny_model_dirs):
    from speckv.cli import main

    target = str(tiny_model_dirs["target"])
    common = [
        "generate",
        "--target",
        target,
        "--prompt",
        "w5 w6 w7 w5 w6",
        "--max-new-tokens",
        "12",
        "--json",
    ]
    assert main([*common, "--draft", "ngram:1-3", "--gamma", "3"]) == 0
    speculative = json.loads(capsys.readouterr().out)
    assert speculative["config"]["draft"] == "ngram:1-3"
    assert main([*common, "--no-draft"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == speculative["token_ids"]


@pytest.mark.parametrize(("low", "high", "gamma"), [(1, 4, 4), (2, 6, 8), (3, 3, 2)])
def test_offline_ngram_replay_equals_the_live_engine(tiny_target, low, high, gamma):
    """benchmarks/ngram_match.py chooses match lengths by replaying the n-gram drafter along the
    target's continuation: exactly what the engine does live."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from ngram_match import replay_ngram

    base = [7, 3, 9, 11, 2]
    prompt = base + reference_greedy(tiny_target.model, base, 12) + [5] + base
    drafter = NGramDrafter(tiny_target.model.config.vocab_size, low, high)
    decoder = SpeculativeDecoder(tiny_target, drafter, make_controller(f"fixed:{gamma}"), eos_token_ids=())
    live = decoder.generate(prompt, 30)
    replayed = replay_ngram(prompt, live.token_ids, low, high, gamma)
    assert replayed == [(s.gamma, s.accepted) for s in live.steps]
    assert sum(a for _, a in replayed) >= 5


def switching(tiny_target, draft) -> SwitchingChainDrafter:
    vocab = tiny_target.model.config.vocab_size
    return SwitchingChainDrafter(ModelDrafter(draft, vocab), NGramDrafter(vocab), min_match=3)


def test_the_switching_drafter_copies_where_a_long_match_exists(tiny_target, tiny_drafts):
    drafter = switching(tiny_target, tiny_drafts["unrelated"])
    drafter.begin()
    greedy = SamplingConfig()
    repeated = [7, 3, 9, 11, 2, 5, 7, 3, 9]  # "7 3 9" occurred before: copy "11 2 5 …"
    assert drafter.copy_match(repeated[:-1]).length == 2  # "7 3" is too short for min_match 3
    assert drafter.chain_drafter(repeated[:-1]) is drafter.model
    assert drafter.copy_match(repeated).length == 3 and drafter.chain_drafter(repeated) is None
    assert [p.token for p in drafter.draft(repeated, 3, greedy, None)] == [11, 2, 5]
    drafter.rollback(len(repeated), Verdict([], 0))
    model_only = ModelDrafter(tiny_drafts["unrelated"], tiny_target.model.config.vocab_size)
    fresh = [4, 8, 12, 16]  # nothing repeats: the model drafts (after catching up on the skipped tokens)
    expected = [p.token for p in model_only.draft([*repeated, *fresh], 3, greedy, None)]
    assert [p.token for p in drafter.draft([*repeated, *fresh], 3, greedy, None)] == expected


def test_the_switching_drafter_drafts_from_the_source_the_controller_chose(tiny_target, tiny_drafts):
    drafter = switching(tiny_target, tiny_drafts["unrelated"])
    drafter.begin()
    greedy = SamplingConfig()
    short = [7, 3, 9, 11, 2, 5, 7, 3]  # "7 3" occurred before: too short for the drafter's own rule
    model_only = ModelDrafter(tiny_drafts["unrelated"], tiny_target.model.config.vocab_size)
    by_model = [p.token for p in model_only.draft(short, 2, greedy, None)]
    drafter.use_copies(True)
    assert drafter.chain_drafter(short) is None
    copies = list(drafter.draft(short, 2, greedy, None))
    assert [p.token for p in copies] == [9, 11] and all(p.free for p in copies)
    drafter.rollback(len(short), Verdict([], 0))
    # The choice holds for one step; then the drafter's own rule again (the model, here).
    assert [p.token for p in drafter.draft(short, 2, greedy, None)] == by_model
    drafter.rollback(len(short), Verdict([], 0))
    drafter.use_copies(False)  # the model, though "7 3 9" has occurred before
    assert drafter.chain_drafter([*short, 9]) is drafter.model
    longer = list(drafter.draft([*short, 9], 1, greedy, None))
    assert not longer[0].free


@pytest.mark.parametrize("spec", ["fixed:1", "fixed:4", "heuristic", "confidence:0.5", "speckv"])
def test_greedy_with_the_switching_drafter_equals_target_greedy(tiny_target, tiny_drafts, spec):
    base = [7, 3, 9, 11, 2]
    prompt = base + reference_greedy(tiny_target.model, base, 12) + [5] + base
    expected = reference_greedy(tiny_target.model, prompt, 30)
    decoder = SpeculativeDecoder(
        tiny_target, switching(tiny_target, tiny_drafts["close"]), make_controller(spec), eos_token_ids=()
    )
    for _ in range(2):  # a second stream on the same decoder starts clean
        assert decoder.generate(prompt, 30).token_ids == expected


def test_sampling_with_the_switching_drafter_follows_the_target_distribution():
    target = loaded(tiny_model(seed=10, vocab=SMALL_VOCAB, head_scale=6.0, eos=0), "small-target")
    draft = loaded(tiny_model(seed=11, vocab=SMALL_VOCAB, head_scale=3.0, eos=0), "small-draft")
    prompt = [3, 1, 2, 4, 3, 1, 2]  # "3 1 2" repeats: the first step copies, the second may not
    exact = exact_first_two(target.model, prompt, SamplingConfig(1.0))
    counts = torch.zeros(SMALL_VOCAB, SMALL_VOCAB).numpy()
    for seed in range(1200):
        decoder = SpeculativeDecoder(
            target, switching(target, draft), make_controller("fixed:2"), SamplingConfig(1.0, seed=seed), ()
        )
        result = decoder.generate(prompt, 2)
        counts[result.token_ids[0], result.token_ids[1]] += 1
    assert chi_square_p(counts, exact) > 1e-3
