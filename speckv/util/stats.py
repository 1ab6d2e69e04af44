"""Small statistics used by the evaluations: bootstrap CIs, paired tests, expected step tokens.

Everything is a pure, vectorised numpy function. Bootstraps can resample rows or whole clusters
(e.g. prompts, whose steps are correlated); a row bootstrap is a cluster bootstrap with clusters
of one row, so both share one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Resamples drawn per chunk: bounds memory at chunk × clusters indices.
_CHUNK = 1000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval."""

    estimate: float
    low: float
    high: float


def bootstrap_ratios(
    numerator: np.ndarray,
    denominator: np.ndarray | None = None,
    n_resamples: int = 5000,
    seed: int = 0,
    clusters: np.ndarray | None = None,
) -> np.ndarray:
    """Bootstrap distribution of Σ numerator / Σ denominator.

    With the default denominator of ones this is the mean. Rows are resampled with replacement,
    or, if `clusters` labels each row, whole clusters are (so the ratio of sums stays exact).
    """
    numerator = np.asarray(numerator, dtype=float)
    denominator = np.ones_like(numerator) if denominator is None else np.asarray(denominator, float)
    if numerator.size == 0:
        raise ValueError("cannot bootstrap an empty sample")
    num_sums, den_sums = _cluster_sums(numerator, denominator, clusters)
    rng = np.random.default_rng(seed)
    ratios = np.empty(n_resamples)
    for start in range(0, n_resamples, _CHUNK):
        size = min(_CHUNK, n_resamples - start)
        picks = rng.integers(0, num_sums.size, size=(size, num_sums.size))
        ratios[start : start + size] = num_sums[picks].sum(axis=1) / den_sums[picks].sum(axis=1)
    return ratios


def _cluster_sums(
    numerator: np.ndarray, denominator: np.ndarray, clusters: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums of numerator and denominator (rows themselves when no clusters)."""
    if clusters is None:
        return numerator, denominator
    _, codes = np.unique(np.asarray(clusters), return_inverse=True)
    return np.bincount(codes, weights=numerator), np.bincount(codes, weights=denominator)


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central `confidence` percentile interval of bootstrap samples."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_mean_ci(
    values: np.ndarray,
    n_resamples: int = 5000,
    seed: int = 0,
    confidence: float = 0.95,
    clusters: np.ndarray | None = None,
) -> Interval:
    """Mean of `values` with a percentile bootstrap confidence interval."""
    values = np.asarray(values, dtype=float)
    samples = bootstrap_ratios(values, None, n_resamples, seed, clusters)
    return Interval(float(values.mean()), *percentile_interval(samples, confidence))


def bootstrap_ratio_ci(
    numerator: np.ndarray,
    denominator: np.ndarray,
    n_resamples: int = 5000,
    seed: int = 0,
    confidence: float = 0.95,
    clusters: np.ndarray | None = None,
) -> Interval:
    """Σ numerator / Σ denominator (e.g. tokens per second) with a bootstrap interval."""
    numerator = np.asarray(numerator, dtype=float)
    denominator = np.asarray(denominator, dtype=float)
    samples = bootstrap_ratios(numerator, denominator, n_resamples, seed, clusters)
    estimate = float(numerator.sum() / denominator.sum())
    return Interval(estimate, *percentile_interval(samples, confidence))


def rate_over_best(
    tokens: np.ndarray,
    seconds: np.ndarray,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.9,
) -> Interval:
    """Row 0's rate (Σ tokens / Σ seconds) over the largest rate of rows 1.., with an interval.

    `tokens` and `seconds` are rows × repeats × prompts, every row timed on the same prompts in
    the same repeats, side by side. Each resample draws the prompts with replacement and, for
    each drawn prompt, one repeat, the same for every row: the repeats are paired, so drift of
    the machine between them cancels. The fastest other row is chosen again in every resample: a
    row picked as the best in hindsight is favoured by its own noise, and the interval counts that.
    """
    tokens, seconds = np.asarray(tokens, float), np.asarray(seconds, float)
    if tokens.ndim != 3 or tokens.shape != seconds.shape or tokens.shape[0] < 2 or 0 in tokens.shape:
        raise ValueError("need tokens and seconds as rows (two or more) × repeats × prompts")
    pooled = tokens.sum(axis=(1, 2)) / seconds.sum(axis=(1, 2))
    repeats, prompts = tokens.shape[1:]
    rng = np.random.default_rng(seed)
    prompt = rng.integers(prompts, size=(n_resamples, prompts))
    repeat = rng.integers(repeats, size=(n_resamples, prompts))
    rates = tokens[:, repeat, prompt].sum(axis=2) / seconds[:, repeat, prompt].sum(axis=2)
    samples = rates[0] / rates[1:].max(axis=0)
    return Interval(float(pooled[0] / pooled[1:].max()), *percentile_interval(samples, confidence))


def paired_bootstrap_pvalue(
    treatment: np.ndarray,
    baseline: np.ndarray,
    n_resamples: int = 10000,
    seed: int = 0,
    clusters: np.ndarray | None = None,
) -> float:
    """One-sided p-value for "mean(treatment) > mean(baseline)" on paired values.

    The paired differences are resampled together; p is the share of resamples whose mean
    difference is ≤ 0. A p of 0 means "below 1 / n_resamples".
    """
    differences = np.asarray(treatment, dtype=float) - np.asarray(baseline, dtype=float)
    samples = bootstrap_ratios(differences, None, n_resamples, seed, clusters)
    return float(np.mean(samples <= 0))


def expected_tokens(accept_probs: np.ndarray) -> np.ndarray:
    """Expected tokens of a step from per-position acceptance probabilities (last axis = γ).

    E = 1 + Σ_{i=1..γ} Π_{j≤i} a_j: draft token i counts only if all before it were accepted,
    and the target always adds one token.
    """
    accept_probs = np.asarray(accept_probs, dtype=float)
    return 1.0 + np.cumprod(accept_probs, axis=-1).sum(axis=-1)


def paired_ratio_difference(
    numerator_a: np.ndarray,
    denominator_a: np.ndarray,
    numerator_b: np.ndarray,
    denominator_b: np.ndarray,
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    clusters: np.ndarray | None = None,
) -> tuple[Interval, float]:
    """Ratio a minus ratio b on paired rows: CI and one-sided p-value for "a > b".

    Both ratios are resampled with the same seed and clusters, hence the same draws, so each
    bootstrap difference compares a and b on one resample.
    """
    samples_a = bootstrap_ratios(numerator_a, denominator_a, n_resamples, seed, clusters)
    samples_b = bootstrap_ratios(numerator_b, denominator_b, n_resamples, seed, clusters)
    differences = samples_a - samples_b
    estimate = np.sum(numerator_a) / np.sum(denominator_a) - np.sum(numerator_b) / np.sum(denominator_b)
    interval = Interval(float(estimate), *percentile_interval(differences, confidence))
    return interval, float(np.mean(differences <= 0))
