"""Running a model over a KV cache: the one place that calls a model forward with a cache.

`cached_forward` is the call itself (batched or not); `CachedModel` is one sequence's view of a
model: its cache and how many positions the cache holds, so a caller feeds only the tokens the
cache has not seen and rolls the cache back to a kept prefix after verification.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from speckv.decoding.models import LoadedModel


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # (batch, keep, vocab)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer (embeddings first), when asked


def cached_forward(
    model: torch.nn.Module,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    keep: int = 0,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    hidden_states: bool = False,
) -> ForwardOutput:
    """One forward pass of `input_ids` (batch, length) that extends `cache`.

    `keep` = how many last positions need logits (0: all); the LM head over the full vocabulary
    is the most expensive layer of a small model, so callers ask only for the rows they read."""
    with torch.inference_mode():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=keep,
            output_hidden_states=hidden_states,
        )
    return ForwardOutput(out.logits, out.hidden_states if hidden_states else None)


class CachedModel:
    """A loaded model, its KV cache and the length of the sequence the cache holds (batch 1)."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.reset()

    def reset(self) -> None:
        """Forget the sequence: a new, empty cache."""
        self.cache = DynamicCache(config=self.loaded.model.config)
        self.length = 0

    def feed(self, tokens: list[int], keep: int = 1, hidden_states: bool = False) -> ForwardOutput:
        """Run `tokens` (positions length.. of the sequence) through the model; logits (1, keep, V)."""
        input_ids = torch.tensor([tokens], device=self.loaded.device)
        out = cached_forward(self.loaded.model, self.cache, input_ids, keep, hidden_states=hidden_states)
        self.length += len(tokens)
        return out

    def crop(self, kept: int) -> None:
        """Roll the cache back to the first `kept` positions of the sequence (no-op if shorter)."""
        if self.length > kept:
            self.cache.crop(kept - self.length)  # transformers 5 crops by a negative count
            self.length = kept
