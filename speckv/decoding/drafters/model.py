"""The small-model drafter: a causal LM (the distilled draft) with its own KV cache."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from speckv.decoding.cache import CachedModel
from speckv.decoding.drafters.base import Drafter, Proposal, Verdict, on_target_vocab
from speckv.decoding.models import LoadedModel
from speckv.decoding.signals import logit_signals
from speckv.decoding.verify import SamplingConfig, sample, warp_probs


class ModelDrafter(Drafter):
    """Drafts one token per forward of `draft`; `target_vocab_size` places a reduced-vocabulary
    draft's distribution on the target's vocabulary (needed for rejection sampling)."""

    def __init__(self, draft: LoadedModel, target_vocab_size: int):
        self.loaded = draft
        self.name = draft.name
        self.vocab_map = draft.vocab_map
        self.target_vocab_size = target_vocab_size
        self.model = CachedModel(draft)

    def fresh(self) -> ModelDrafter:
        return ModelDrafter(self.loaded, self.target_vocab_size)

    def begin(self) -> None:
        self.model.reset()

    def chain_drafter(self, context: list[int] | None = None) -> ModelDrafter:
        return self

    def draft(
        self,
        context: list[int],
        budget: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Iterator[Proposal]:
        feed = context[self.model.length :]  # what a batch expects it to feed (`chain_drafter`)
        for _ in range(budget):
            logits = self.model.feed(feed, keep=1).logits[0, -1]
            probs = None
            if sampling.greedy:
                index = int(logits.argmax())
            else:
                warped = warp_probs(logits, sampling).cpu()  # the generator lives on the CPU
                index = sample(warped, generator)
                probs = on_target_vocab(warped, self.vocab_map, self.target_vocab_size)
            token = index if self.vocab_map is None else int(self.vocab_map[index])
            entropy, confidence, token_prob = logit_signals(logits, index)
            yield Proposal(token, entropy, confidence, token_prob, probs)
            feed = [token]  # fed only if the loop asks for another token

    def unread(self, context: list[int]) -> int:
        return len(context) - self.model.length

    def rollback(self, kept: int, verdict: Verdict) -> None:
        self.model.crop(kept)
