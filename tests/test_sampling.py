"""Verification maths on hand-built distributions."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import chisquare

from speckv.decoding.verify import SamplingConfig, leading_true, rejection_verify, warp_probs


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
