"""The target's side of a step: one forward over the unseen tokens plus the draft, then the
verification maths of `speckv.decoding.verify` (greedy matching or lossless rejection sampling)."""

from __future__ import annotations

import torch

from speckv.decoding.cache import CachedModel
from speckv.decoding.drafters.base import Verdict
from speckv.decoding.models import LoadedModel
from speckv.decoding.verify import SamplingConfig, greedy_verify, rejection_verify, sample, warp_probs


class TargetVerifier:
    """Verifies drafted tokens with `target` and its KV cache; `hidden_layers` = layers whose
    hidden states go back to the drafter (a feature head), empty for most drafters."""

    def __init__(self, target: LoadedModel, sampling: SamplingConfig, hidden_layers: tuple[int, ...] = ()):
        self.model = CachedModel(target)
        self.sampling = sampling
        self.hidden_layers = hidden_layers

    def begin(self) -> None:
        self.model.reset()

    def verify(
        self,
        context: list[int],
        drafted: list[int],
        draft_probs: list[torch.Tensor],
        generator: torch.Generator | None,
    ) -> Verdict:
        out = self.model.feed(
            context[self.model.length :] + drafted,
            keep=len(drafted) + 1,
            hidden_states=bool(self.hidden_layers),
        )
        logits = out.logits[0]
        hidden = tuple(out.hidden_states[i][0] for i in self.hidden_layers) if self.hidden_layers else None
        if self.sampling.greedy:
            if not drafted:
                return Verdict([], int(logits[0].argmax()), hidden)
            accepted, token = greedy_verify(torch.tensor(drafted, device=logits.device), logits)
            return Verdict(drafted[:accepted], token, hidden)
        target_probs = warp_probs(logits, self.sampling)
        if not drafted:
            return Verdict([], sample(target_probs[0], generator), hidden)
        accepted, token = rejection_verify(
            torch.tensor(drafted, device=logits.device), torch.stack(draft_probs), target_probs, generator
        )
        return Verdict(drafted[:accepted], token, hidden)

    def rollback(self, kept: int) -> None:
        self.model.crop(kept)
