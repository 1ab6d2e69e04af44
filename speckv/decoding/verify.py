"""Verification maths of a drafted chain: sampling warps and lossless rejection sampling (greedy
matching, which also covers trees, is `speckv.decoding.tree.greedy_tree_accept`).

Pure tensor functions (no models, no caches) so they can be tested with hand-built
distributions. Shapes: `draft_tokens` (γ,), draft probabilities (γ, V), target logits or
probabilities (γ + 1, V): row i scores the token that follows i accepted draft tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy decoding; top_p applies to the target's distribution."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Probabilities after temperature and nucleus (top-p) filtering, row-wise."""
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= config.top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


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
