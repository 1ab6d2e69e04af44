"""Verification maths of a drafted chain: sampling warps and lossless rejection sampling (greedy
matching, which also covers trees, is `speckv.decoding.tree.greedy_tree_accept`).

Pure tensor functions (no models, no caches) so they can be tested with hand-built
distributions. Shapes: `draft_tokens` (γ,), draft probabilities (γ, V), target logits or
probabilities (γ + 1, V): row i scores the token that follows i accepted draft tokens.

Rejection sampling is exact for whatever target distribution both of its sides read, so every
rule that only reshapes the target's next-token distribution (temperature, top-k, top-p, min-p,
a stop token held back until `min_tokens`) stays lossless, as long as it is applied to the
target's rows before verification: the drafter's proposal may be anything it can report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from speckv.errors import SpecKVError

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 64 bits (negatives alias 2^64 + seed)


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy decoding. top_k (0: off), top_p (1: off) and min_p (0: off)
    filter the warped distribution (`warp_probs`); each keeps the most likely token, so none
    changes greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self) -> None:
        """Raise a `SpecKVError` naming the first option out of range."""
        if not _number(self.temperature) or not self.temperature >= 0 or math.isinf(self.temperature):
            raise SpecKVError(f"temperature must be a finite number ≥ 0, got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:  # `not <` also rejects NaN
            raise SpecKVError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _integer(self.top_k) or self.top_k < 0:
            raise SpecKVError(f"top_k must be an integer ≥ 0 (0 keeps every token), got {self.top_k!r}")
        if not _number(self.min_p) or not 0 <= self.min_p <= 1:
            raise SpecKVError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise SpecKVError(f"seed must be an integer in [0, 2^64 - 1], got {self.seed!r}")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def warp_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Probabilities after temperature, then top-k, top-p (nucleus) and min-p, row-wise.

    The order is Hugging Face's (and vLLM's) and matters only for top-p, which measures mass
    within what top-k kept. Each filter keeps a head of the tokens sorted by probability:
    top-k the tokens at least as likely as the k-th (ties with it stay, so the result does not
    depend on how a sort orders equal values), top-p the smallest head whose mass reaches top_p,
    min-p the tokens at least min_p × the most likely one's probability (a ratio, which
    renormalising after the other filters does not change)."""
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_k <= 0 and config.top_p >= 1.0 and config.min_p <= 0.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if 0 < config.top_k < probs.shape[-1]:
        keep &= sorted_probs >= sorted_probs[..., config.top_k - 1 : config.top_k]
    if config.top_p < 1.0:
        head = sorted_probs * keep
        # The first token is always kept: its mass before is 0.
        mass_before = head.cumsum(dim=-1) - head
        keep &= mass_before < config.top_p * head.sum(dim=-1, keepdim=True)
    if config.min_p > 0.0:
        keep &= sorted_probs >= config.min_p * sorted_probs[..., :1]
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)
    return kept / kept.sum(dim=-1, keepdim=True)


def hold_back_stops(
    logits: torch.Tensor, produced: Iterable[int], min_tokens: int, stop_ids: Iterable[int]
) -> torch.Tensor:
    """`logits` with the stop tokens at -inf in every row whose token would come before the
    `min_tokens`-th new token: `produced[r]` = new tokens before row r's token (row r is held
    back when produced[r] < min_tokens). The target's distribution is then the one conditioned
    on "no stop yet", which greedy argmax and sampling both read. Stop ids past the rows' width
    cannot be produced and are skipped; the input is returned as is when no row is held back."""
    width = logits.shape[-1]
    rows = [row for row, count in enumerate(produced) if count < min_tokens]
    columns = sorted({token for token in stop_ids if 0 <= token < width})
    if not rows or not columns:
        return logits
    banned = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    row_index = torch.tensor(rows, device=logits.device)[:, None]
    banned[row_index, torch.tensor(columns, device=logits.device)[None, :]] = True
    return logits.masked_fill(banned, float("-inf"))


def leading_true(mask: torch.Tensor) -> int:
    """Number of leading True values of a 1-D boolean tensor."""
    return int(mask.to(torch.int64).cumprod(dim=0).sum())


def rejection_verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): output ~ target exactly.

    Token i is kept with probability min(1, p_t(x)/p_d(x)); at the first rejection the
    replacement is drawn from norm(max(0, p_t - p_d)); if all are kept, a bonus token is drawn
    from the target's next distribution.
    """
    gamma = len(draft_tokens)
    rows = torch.arange(gamma)
    p_target = target_probs[rows, draft_tokens]
    p_draft = draft_probs[rows, draft_tokens]
    uniform = torch.rand(gamma, generator=generator)
    accepted = leading_true(uniform * p_draft < p_target)
    if accepted == gamma:
        next_dist = target_probs[gamma]
    else:
        residual = (target_probs[accepted] - draft_probs[accepted]).clamp_(min=0.0)
        total = residual.sum()
        # residual is all zero only when p_t == p_d, where a rejection has probability 0.
        next_dist = residual / total if total > 0 else target_probs[accepted]
    return accepted, int(torch.multinomial(next_dist, 1, generator=generator))


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
