"""The target's side of a step: one forward over the unseen tokens plus the draft, then the
verification maths of `speckv.decoding.verify` (greedy matching or lossless rejection sampling).

The target's rows are first reshaped by the rules that define the distribution being decoded
(stop tokens held back before `min_tokens`, then the sampling warps), so both greedy matching
and rejection sampling verify against that distribution, and stay exact for it."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from speckv.decoding.cache import CachedModel, Feed, ForwardOutput
from speckv.decoding.drafters.base import Verdict
from speckv.decoding.models import LoadedModel
from speckv.decoding.tree import greedy_tree_accept, is_chain, row_depths, sampling_tree_accept
from speckv.decoding.verify import SamplingConfig, hold_back_stops, rejection_verify, warp_probs


class TargetVerifier:
    """Verifies drafted tokens with `target` and its KV cache; `hidden_layers` = layers whose
    hidden states go back to the drafter (a feature head), empty for most drafters. `stop_ids`
    are the tokens `begin`'s `min_tokens` holds back."""

    def __init__(
        self,
        target: LoadedModel,
        sampling: SamplingConfig,
        hidden_layers: tuple[int, ...] = (),
        stop_ids: Iterable[int] = (),
    ):
        self.model = CachedModel(target)
        self.sampling = sampling
        self.hidden_layers = hidden_layers
        self.stop_ids = frozenset(stop_ids)
        self._prompt_length = self._min_tokens = 0

    def begin(self, prompt_length: int, min_tokens: int = 0) -> None:
        """A new sequence whose first `prompt_length` tokens are the prompt; no stop token may
        come before its `min_tokens`-th new token."""
        self.model.reset()
        self._base, self._path = 0, []
        self._prompt_length, self._min_tokens = prompt_length, min_tokens

    def verify(
        self,
        context: list[int],
        drafted: list[int],
        parents: list[int],
        draft_probs: list[torch.Tensor],
        generator: torch.Generator | None,
    ) -> Verdict:
        """One pass over the unseen sequence tokens plus the drafted chain or tree."""
        out = self.model.feed(**vars(self.feed_for(context, drafted, parents)))
        return self.judge(out, context, drafted, parents, draft_probs, generator)

    def feed_for(self, context: list[int], drafted: list[int], parents: list[int]) -> Feed:
        """What the verify pass feeds: the sequence tokens the cache has not seen, then the draft
        (a batch runs many sequences' feeds in one pass, `speckv.decoding.batch`)."""
        return Feed(
            context[self.model.length :] + drafted,
            keep=len(drafted) + 1,
            hidden_states=bool(self.hidden_layers),
            parents=None if is_chain(parents) else parents,
        )

    def judge(
        self,
        out: ForwardOutput,
        context: list[int],
        drafted: list[int],
        parents: list[int],
        draft_probs: list[torch.Tensor],
        generator: torch.Generator | None,
    ) -> Verdict:
        """The verification maths on the pass's rows: greedy matching or rejection sampling."""
        self._base = len(context)
        logits = out.logits[0]
        if self._min_tokens > 0:
            produced = len(context) - self._prompt_length
            before = [produced + depth for depth in row_depths(parents)]
            logits = hold_back_stops(logits, before, self._min_tokens, self.stop_ids)
        hidden = tuple(out.hidden_states[i][0] for i in self.hidden_layers) if self.hidden_layers else None
        if self.sampling.greedy:
            path, token = greedy_tree_accept(drafted, parents, logits.argmax(-1).tolist())
        else:
            # The random draws use the (CPU) generator, so the few rows they read move to the CPU.
            target_probs = warp_probs(logits, self.sampling).cpu()
            if is_chain(parents) and drafted and len(draft_probs) == len(drafted):
                # A sampled chain knows its proposal distribution: classic speculative sampling.
                accepted, token = rejection_verify(
                    torch.tensor(drafted), torch.stack(draft_probs).cpu(), target_probs, generator
                )
                path = list(range(accepted))
            else:  # exact for any candidates fixed before verification (speckv.decoding.tree)
                path, token = sampling_tree_accept(drafted, parents, target_probs, generator)
        self._path = path
        return Verdict([drafted[i] for i in path], token, path=path, hidden_states=hidden)

    def rollback(self, kept: int) -> None:
        """Keep the sequence and the accepted path: a crop for a chain, a gather for a tree."""
        path = self._path
        if path == list(range(len(path))):
            self.model.crop(kept)
        else:
            self.model.keep_positions(list(range(self._base)) + [self._base + i for i in path])
