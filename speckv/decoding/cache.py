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
from speckv.decoding.tree import is_chain, tree_attention, tree_positions
from speckv.errors import SpecKVError

# Attention implementations known to honour a custom 4D mask (flash attention ignores it).
TREE_ATTENTION = ("sdpa", "eager")


def check_tree_attention(loaded: LoadedModel) -> None:
    implementation = getattr(loaded.model.config, "_attn_implementation", None)
    if implementation not in TREE_ATTENTION:
        raise SpecKVError(
            f"{loaded.name} uses {implementation} attention, which cannot verify a token tree "
            f"(needs one of {', '.join(TREE_ATTENTION)}); use a chain controller (e.g. fixed:4)"
        )


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

    def feed(
        self,
        tokens: list[int],
        keep: int = 1,
        hidden_states: bool = False,
        parents: list[int] | None = None,
    ) -> ForwardOutput:
        """Run `tokens` (positions length.. of the sequence) through the model; logits (1, keep, V).

        With `parents`, the last len(parents) tokens are a token tree (`speckv.decoding.tree`):
        each attends to the sequence and its own ancestors, at the position of its depth."""
        device = self.loaded.device
        input_ids = torch.tensor([tokens], device=device)
        mask = positions = None
        if parents is not None and not is_chain(parents):
            check_tree_attention(self.loaded)
            unseen = len(tokens) - len(parents)
            mask = tree_attention(parents, self.length, unseen)[None, None].to(device)
            positions = torch.tensor([tree_positions(parents, self.length, unseen)], device=device)
        out = cached_forward(
            self.loaded.model, self.cache, input_ids, keep, mask, positions, hidden_states=hidden_states
        )
        self.length += len(tokens)
        return out

    def feed_masked(
        self, tokens: list[int], attention: torch.Tensor, positions: list[int], keep: int = 0
    ) -> ForwardOutput:
        """Feed `tokens` with an explicit boolean attention (len(tokens), length + len(tokens)) and
        position ids: for drafters that grow a token tree over several passes."""
        check_tree_attention(self.loaded)
        device = self.loaded.device
        out = cached_forward(
            self.loaded.model,
            self.cache,
            torch.tensor([tokens], device=device),
            keep,
            attention[None, None].to(device),
            torch.tensor([positions], device=device),
        )
        self.length += len(tokens)
        return out

    def keep_positions(self, positions: list[int]) -> None:
        """Keep only these positions of the cache (ascending), e.g. the sequence plus the accepted
        path of a token tree. DynamicCache can crop but not gather, so each layer is gathered."""
        index = torch.tensor(positions, device=self.loaded.device)
        for layer in self.cache.layers:
            if not hasattr(layer, "keys") or layer.keys is None:
                continue
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
        self.length = len(positions)

    def crop(self, kept: int) -> None:
        """Roll the cache back to the first `kept` positions of the sequence (no-op if shorter)."""
        if self.length > kept:
            self.cache.crop(kept - self.length)  # transformers 5 crops by a negative count
            self.length = kept
