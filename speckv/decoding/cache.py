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
class Feed:
    """One sequence's share of a forward pass: its tokens (positions length.. of the sequence),
    how many last rows need logits, and `parents` when the last len(parents) tokens are a token tree."""

    tokens: list[int]
    keep: int = 1
    hidden_states: bool = False
    parents: list[int] | None = None


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


def additive_mask(allowed: torch.Tensor, loaded: LoadedModel) -> torch.Tensor:
    """A boolean mask as an additive one (0 where allowed, the dtype's minimum elsewhere): SDPA
    takes either, but eager attention adds the mask to the scores, so a boolean would add 0 or 1
    and mask nothing."""
    dtype = loaded.model.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:  # quantised embeddings: the activations are float32
        dtype = torch.float32
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


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
            mask = self._additive(tree_attention(parents, self.length, unseen))
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
            self._additive(attention),
            torch.tensor([positions], device=device),
        )
        self.length += len(tokens)
        return out

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        return additive_mask(allowed, self.loaded)[None, None].to(self.loaded.device)

    def keep_positions(self, positions: list[int]) -> None:
        """Keep only these positions of the cache (ascending), e.g. the sequence plus the accepted
        path of a token tree. DynamicCache can crop but not gather: the slots after the common
        prefix are moved into place layer by layer (only the path, not the whole cache), then
        the cache is cropped."""
        start = next((i for i, p in enumerate(positions) if p != i), len(positions))
        if start < len(positions):
            self._check_plain_layers()
            source = torch.tensor(positions[start:], device=self.loaded.device)
            with torch.inference_mode():  # the cache's tensors were made in inference mode
                for layer in self.cache.layers:
                    if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                        continue
                    layer.keys[..., start : len(positions), :] = layer.keys.index_select(-2, source)
                    layer.values[..., start : len(positions), :] = layer.values.index_select(-2, source)
        self.crop(len(positions))

    def crop(self, kept: int) -> None:
        """Roll the cache back to the first `kept` positions of the sequence (no-op if shorter)."""
        if self.length > kept:
            self._check_plain_layers()
            self.cache.crop(kept - self.length)  # transformers 5 crops by a negative count
            self.length = kept

    def _check_plain_layers(self) -> None:
        """Rolling back needs every layer to hold every position: sliding-window layers forget the
        oldest ones (and count positions their own way), so they cannot be rolled back here."""
        for layer in self.cache.layers:
            if type(layer).__name__ != "DynamicLayer":
                raise SpecKVError(
                    f"{self.loaded.name} has {type(layer).__name__} cache layers (sliding-window "
                    "attention): speculative decoding cannot roll them back yet; decode it with --no-draft"
                )
