"""speckv.util.stats on small examples whose answers are worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from speckv.util import stats


def test_bootstrap_of_a_constant_sample_is_that_constant():
    # Every resample of [3, 3, 3] has mean 3, so the interval collapses to [3, 3].
    ci = stats.bootstrap_mean_ci(np.array([3.0, 3.0, 3.0]), n_resamples=200, seed=1)
    assert (ci.estimate, ci.low, ci.high) == (3.0, 3.0, 3.0)


def test_row_bootstrap_of_two_values_follows_the_binomial():
    # Resampling 2 rows from [0, 1]: means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    samples = stats.bootstrap_ratios(np.array([0.0, 1.0]), n_resamples=20000, seed=7)
    assert set(np.unique(samples)) == {0.0, 0.5, 1.0}
    assert np.mean(samples == 0.5) == pytest.approx(0.5, abs=0.02)
    assert np.mean(samples == 0.0) == pytest.approx(0.25, abs=0.02)
    # P(mean = 0) = 1/4 > 2.5%, so the 95% interval is the full [0, 1].
    ci = stats.bootstrap_mean_ci(np.array([0.0, 1.0]), n_resamples=20000, seed=7)
    assert (ci.estimate, ci.low, ci.high) == (0.5, 0.0, 1.0)


def test_cluster_bootstrap_resamples_whole_clusters():
    # Clusters a = {1, 1, 1} (sum 3, 3 rows) and b = {4} (sum 4, 1 row). Drawing 2 clusters:
    # aa -> 6/6 = 1 (p 1/4), ab or ba -> 7/4 = 1.75 (p 1/2), bb -> 8/2 = 4 (p 1/4).
    values = np.array([1.0, 1.0, 1.0, 4.0])
    clusters = np.array(["a", "a", "a", "b"])
    samples = stats.bootstrap_ratios(values, n_resamples=20000, seed=3, clusters=clusters)
    assert set(np.unique(samples)) == {1.0, 1.75, 4.0}
    assert np.mean(samples == 1.75) == pytest.approx(0.5, abs=0.02)


def test_ratio_bootstrap_is_sum_over_sum():
    # Tokens [2, 6] over seconds [1, 2]: 8 / 3 overall; resamples give 2/1, 8/3 or 6/2 = 3,
    # so every resampled ratio lies in [2, 3].
    ci = stats.bootstrap_ratio_ci(np.array([2.0, 6.0]), np.array([1.0, 2.0]), n_resamples=1000, seed=0)
    assert ci.estimate == pytest.approx(8 / 3)
    assert 2.0 <= ci.low <= ci.estimate <= ci.high <= 3.0


def test_bootstrap_is_deterministic_for_a_seed():
    values = np.arange(10.0)
    first = stats.bootstrap_ratios(values, n_resamples=2500, seed=11)
    assert np.array_equal(first, stats.bootstrap_ratios(values, n_resamples=2500, seed=11))
    assert not np.array_equal(first, stats.bootstrap_ratios(values, n_resamples=2500, seed=12))


def test_paired_pvalue_extremes():
    # Treatment beats baseline by exactly 1 on every row: no resample has mean difference <= 0.
    assert stats.paired_bootstrap_pvalue([2, 3, 4], [1, 2, 3], n_resamples=1000, seed=0) == 0.0
    # Treatment is worse on every row: every resample has mean difference < 0.
    assert stats.paired_bootstrap_pvalue([0, 1, 2], [1, 2, 3], n_resamples=1000, seed=0) == 1.0


def test_paired_pvalue_of_symmetric_differences():
    # Differences [+1, -1]: resampled means +1, 0, -1 with p 1/4, 1/2, 1/4, so P(mean <= 0) = 3/4.
    p_value = stats.paired_bootstrap_pvalue([2.0, 0.0], [1.0, 1.0], n_resamples=20000, seed=5)
    assert p_value == pytest.approx(0.75, abs=0.02)


def test_paired_ratio_difference_uses_the_same_draws_for_both_sides():
    # Identical sides: every bootstrap difference is exactly 0, so the CI is [0, 0] and p = 1.
    tokens, seconds = np.array([2.0, 3.0, 5.0]), np.array([1.0, 1.5, 2.0])
    interval, p_value = stats.paired_ratio_difference(
        tokens, seconds, tokens, seconds, n_resamples=500, seed=2
    )
    assert (interval.estimate, interval.low, interval.high, p_value) == (0.0, 0.0, 0.0, 1.0)
    # Side a has twice the tokens in the same time: 20/4.5 - 10/4.5 = 2.222..., and every
    # resample of a is exactly twice that of b, so a - b > 0 always and p = 0.
    interval, p_value = stats.paired_ratio_difference(
        2 * tokens, seconds, tokens, seconds, n_resamples=500, seed=2
    )
    assert interval.estimate == pytest.approx(10 / 4.5)
    assert p_value == 0.0


def test_rate_over_best_chooses_the_fastest_other_row_again_in_every_resample():
    # rows × repeats × prompts. Row a is fast on prompt 0, b on prompt 1: pooled, each makes 20
    # tokens in 5 s and row 0 makes 20 in 4 s (1.25×). A resample drawing one prompt twice meets
    # the row that is fast on it (5 / 10 = 0.5×); one drawing both prompts gives 1.25×. Each is
    # half the resamples, so the 90 % interval spans both.
    tokens = np.full((3, 1, 2), 10.0)
    seconds = np.array([[[2.0, 2.0]], [[1.0, 4.0]], [[4.0, 1.0]]])
    interval = stats.rate_over_best(tokens, seconds)
    assert interval.estimate == pytest.approx(1.25)
    assert (interval.low, interval.high) == pytest.approx((0.5, 1.25))
    assert stats.rate_over_best(tokens[:2], seconds[:2]).estimate == pytest.approx(1.25)  # 20/4 over 20/5


def test_rate_over_best_draws_one_repeat_per_prompt_for_every_row():
    # Row 0 runs each prompt in 2 s in repeat 0 and 1 s in repeat 1, row 1 in 3 s and 1 s: every
    # resample of one prompt sees 1.5× (repeat 0) or 1× (repeat 1), never a mix of the two repeats.
    tokens = np.full((2, 2, 1), 10.0)
    seconds = np.array([[[2.0], [1.0]], [[3.0], [1.0]]])
    interval = stats.rate_over_best(tokens, seconds, n_resamples=400)
    assert interval.estimate == pytest.approx(20 / 3 / (20 / 4))
    assert (interval.low, interval.high) == pytest.approx((1.0, 1.5))


def test_rate_over_best_needs_two_rows_timed_alike():
    with pytest.raises(ValueError, match="rows"):
        stats.rate_over_best(np.ones((1, 2, 2)), np.ones((1, 2, 2)))
    with pytest.raises(ValueError, match="rows"):
        stats.rate_over_best(np.ones((2, 2, 2)), np.ones((2, 2, 3)))


def test_expected_tokens_from_position_probabilities():
    # [0.5, 0.5]: 1 + 0.5 + 0.5 * 0.5 = 1.75.
    assert stats.expected_tokens([0.5, 0.5]) == pytest.approx(1.75)
    # [1, 0, 1]: 1 + 1 + 0 + 0 = 2 (nothing after a certain rejection counts).
    assert stats.expected_tokens([1.0, 0.0, 1.0]) == pytest.approx(2.0)
    # Rows are independent steps: [[0.5, 0.5], [1, 1]] -> [1.75, 3].
    assert np.allclose(stats.expected_tokens([[0.5, 0.5], [1.0, 1.0]]), [1.75, 3.0])


def expected_tokens_constant(rate: np.ndarray | float, gamma: np.ndarray | int) -> np.ndarray:
    """Leviathan et al.'s closed form for a constant rate a, (1 − a^(γ+1)) / (1 − a): an
    independent check of `stats.expected_tokens`."""
    rate = np.asarray(rate, dtype=float)
    gamma = np.asarray(gamma)
    is_one = rate == 1.0
    # a = 1 is the limit γ + 1; substitute a harmless rate there to avoid 0 / 0.
    safe_rate = np.where(is_one, 0.5, rate)
    closed_form = (1 - safe_rate ** (gamma + 1)) / (1 - safe_rate)
    return np.where(is_one, gamma + 1.0, closed_form)


def test_constant_rate_closed_form():
    # a = 0.5, γ = 2: (1 - 0.5^3) / (1 - 0.5) = 0.875 / 0.5 = 1.75, as the product form above.
    assert expected_tokens_constant(0.5, 2) == pytest.approx(1.75)
    # a = 1: every token accepted, γ + 1 = 5; a = 0: only the target's token, 1.
    assert expected_tokens_constant(1.0, 4) == pytest.approx(5.0)
    assert expected_tokens_constant(0.0, 4) == pytest.approx(1.0)
    rates, gammas = np.array([0.2, 0.7, 0.9]), np.array([2, 4, 8])
    product_form = [stats.expected_tokens(np.full(g, a)) for a, g in zip(rates, gammas, strict=True)]
    assert np.allclose(expected_tokens_constant(rates, gammas), product_form)
