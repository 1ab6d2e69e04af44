"""Verification maths on hand-built distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from speckv.decoding.verify import (
    SamplingConfig,
    hold_back_stops,
    leading_true,
    rejection_verify,
    warp_probs,
)
from speckv.errors import SpecKVError

P4 = torch.tensor([0.4, 0.3, 0.2, 0.1])


def test_leading_true():
    assert leading_true(torch.tensor([True, True, False, True])) == 2
    assert leading_true(torch.tensor([False, True])) == 0
    assert leading_true(torch.tensor([True, True])) == 2
    assert leading_true(torch.tensor([], dtype=torch.bool)) == 0


def test_warp_probs_top_p_by_hand():
    # softmax(log p) = p = [0.5, 0.3, 0.15, 0.05]; top_p 0.7 keeps 0.5 and 0.3 (mass before 0.15 is 0.8).
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    warped = warp_probs(probs.log(), SamplingConfig(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(warped, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # Temperature 0.5 squares then renormalises: [0.25, 0.09, 0.0225, 0.0025] / 0.365.
    sharp = warp_probs(probs.log(), SamplingConfig(temperature=0.5))
    torch.testing.assert_close(sharp, torch.tensor([0.25, 0.09, 0.0225, 0.0025]) / 0.365)


def warped(probs, **options) -> torch.Tensor:
    return warp_probs(torch.as_tensor(probs).log(), SamplingConfig(temperature=1.0, **options))


def test_warp_probs_top_k_by_hand():
    # The two most likely of [0.4, 0.3, 0.2, 0.1], renormalised: [0.4, 0.3] / 0.7.
    torch.testing.assert_close(warped(P4, top_k=2), torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))
    # Unsorted input: the kept tokens are found by probability, not by position.
    torch.testing.assert_close(warped([0.1, 0.4, 0.2, 0.3], top_k=1), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # A tie with the k-th token stays (so the result does not hang on a sort's order of equals).
    torch.testing.assert_close(warped([0.3, 0.4, 0.3], top_k=2), torch.tensor([0.3, 0.4, 0.3]))
    # k ≥ the vocabulary, or 0, keeps everything.
    torch.testing.assert_close(warped(P4, top_k=4), P4)
    torch.testing.assert_close(warped(P4, top_k=9), P4)
    torch.testing.assert_close(warped(P4, top_k=0), P4)


def test_warp_probs_min_p_by_hand():
    # min_p 0.45: keep p ≥ 0.45 × 0.4 = 0.18, i.e. [0.4, 0.3, 0.2] / 0.9.
    torch.testing.assert_close(warped(P4, min_p=0.45), torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]))
    # min_p 0.8: threshold 0.32 keeps 0.4 alone; min_p 1 keeps the most likely token and its ties.
    torch.testing.assert_close(warped(P4, min_p=0.8), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(warped([0.4, 0.2, 0.4], min_p=1.0), torch.tensor([0.5, 0.0, 0.5]))
    # After temperature 0.5 (squares, renormalised: [16, 9, 4, 1] / 30), min_p 0.2 keeps
    # p ≥ 0.2 × 16/30 = 3.2/30, i.e. [16, 9, 4] / 29.
    sharp = warp_probs(P4.log(), SamplingConfig(temperature=0.5, min_p=0.2))
    torch.testing.assert_close(sharp, torch.tensor([16 / 29, 9 / 29, 4 / 29, 0.0]))


def test_warp_probs_order_top_k_then_top_p_then_min_p():
    # top_k 3 leaves [0.4, 0.3, 0.2] / 0.9 = [0.444, 0.333, 0.222]; top_p 0.75 measures mass there:
    # before the third token 0.778 ≥ 0.75, so it goes: [0.4, 0.3] / 0.7. (top_p 0.75 alone keeps
    # three tokens: the mass before the third is 0.7.)
    torch.testing.assert_close(warped(P4, top_k=3, top_p=0.75), torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))
    torch.testing.assert_close(warped(P4, top_p=0.75), torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]))
    # min_p is a ratio to the most likely token, which every filter keeps: 0.6 × 0.4 = 0.24.
    torch.testing.assert_close(warped(P4, top_k=3, min_p=0.6), torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))
    torch.testing.assert_close(warped(P4, top_p=0.95, min_p=0.3), torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]))


def test_warp_probs_filters_each_row_by_its_own_distribution():
    rows = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]])
    expected = torch.tensor([[4 / 7, 3 / 7, 0, 0], [0, 0, 0, 1.0], [0.25, 0.25, 0.25, 0.25]])
    torch.testing.assert_close(warped(rows, top_k=2, min_p=0.5), expected)


def test_warp_filters_never_move_the_argmax():
    """What lets greedy decoding ignore them: the most likely token always survives."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 50, generator=generator) * 3
    for options in ({"top_k": 1}, {"top_k": 7, "top_p": 0.3}, {"min_p": 0.9}, {"top_p": 0.01, "min_p": 1.0}):
        probs = warp_probs(logits, SamplingConfig(temperature=0.7, **options))
        assert torch.equal(probs.argmax(-1), logits.argmax(-1)), options
        torch.testing.assert_close(probs.sum(-1), torch.ones(200))


def test_sampling_options_are_checked():
    SamplingConfig(1.0, 0.5, 2**64 - 1, top_k=3, min_p=1.0).check()
    for options, name in [
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"seed": -1}, "seed"),  # torch would take it as 2^64 - 1: a second name for one stream
        ({"seed": 2**64}, "seed"),
    ]:
        with pytest.raises(SpecKVError, match=name):
            SamplingConfig(**{"temperature": 1.0} | options).check()


def test_hold_back_stops_by_hand():
    logits = torch.arange(12.0).reshape(3, 4)
    # Rows whose token would be new token 0, 1 and 2; min_tokens 2 holds back rows 0 and 1.
    # Stop id 99 is past the vocabulary: no row can produce it.
    held = hold_back_stops(logits, [0, 1, 2], 2, {1, 3, 99})
    inf = float("-inf")
    assert held.tolist() == [[0.0, inf, 2.0, inf], [4.0, inf, 6.0, inf], [8.0, 9.0, 10.0, 11.0]]
    assert logits[0, 1] == 1.0  # the input is not modified
    assert hold_back_stops(logits, [2, 3, 4], 2, {1}) is logits  # nothing held back
    assert hold_back_stops(logits, [0, 1, 2], 2, ()) is logits
    # A tree's rows: the root's row and two nodes at depth 0 (1 token in), one at depth 1 (2 in).
    held = hold_back_stops(logits[[0, 1, 2, 2]], [5, 6, 6, 7], 7, [0])
    assert [row[0].item() for row in held] == [inf, inf, inf, 8.0]


def expected_counts(probs: torch.Tensor, counts: np.ndarray) -> np.ndarray:
    probs = probs.double().numpy()
    return probs / probs.sum() * counts.sum()


def test_rejection_verify_keeps_the_target_distribution():
    """First emitted token ~ p_t[0] whatever the draft; 20k draws, chi-square at α = 0.001 (seeded)."""
    generator = torch.Generator().manual_seed(0)
    p_target = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    p_draft = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]])
    counts = np.zeros(4)
    for _ in range(20_000):
        drafted = torch.multinomial(p_draft, 1, generator=generator).squeeze(1)
        accepted, next_token = rejection_verify(drafted, p_draft, p_target, generator)
        counts[int(drafted[0]) if accepted > 0 else next_token] += 1
    assert chisquare(counts, expected_counts(p_target[0], counts)).pvalue > 1e-3
    # The draft's own distribution is clearly rejected by the same test.
    assert chisquare(counts, expected_counts(p_draft[0], counts)).pvalue < 1e-3


def test_rejection_acceptance_rate_matches_theory():
    """P(accept) = Σ_x min(p_t(x), p_d(x)) = 0.1 + 0.2 + 0.2 + 0.1 = 0.6 for these rows."""
    generator = torch.Generator().manual_seed(1)
    p_target = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    p_draft = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    draws = 20_000
    accepted = sum(
        rejection_verify(torch.multinomial(p_draft[0], 1, generator=generator), p_draft, p_target, generator)[
            0
        ]
        for _ in range(draws)
    )
    # Binomial sd = sqrt(0.24 / 20000) ≈ 0.0035: 0.6 ± 0.015 is over 4 sd.
    assert abs(accepted / draws - 0.6) < 0.015


def test_identical_distributions_always_accept():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]])
    accepted, _ = rejection_verify(torch.tensor([0, 1]), p[:2], p, torch.Generator().manual_seed(0))
    assert accepted == 2
