"""A token tree from the draft model, grown best-first by path probability (EAGLE-2's selection).

Each proposed node is the most probable path extension not yet proposed: its score is the draft's
log-probability of the whole path from the root, so a node never scores above its parent and
every prefix of the proposals is the best tree of its size under the draft's own estimate. The
loop stops pulling when the controller's budget (the node count) is reached.

A node's children need a draft forward on the node itself. Forwards are lazy and batched: before
proposing the best pending candidate, every proposed node whose score still beats it is fed in
one pass with a tree attention mask (each sees the sequence and its own ancestors), since only
their children could outrank it. After verification the draft's cache keeps the sequence plus the
fed nodes of the accepted path, gathered per layer.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from speckv.decoding.cache import CachedModel
from speckv.decoding.drafters.base import Drafter, Proposal, Verdict
from speckv.decoding.models import LoadedModel
from speckv.decoding.signals import signal_tensor
from speckv.decoding.verify import SamplingConfig


@dataclass
class _Node:
    token: int
    parent: int  # proposal index, -1 = root
    depth: int
    score: float  # log-probability of the path from the root
    cache_position: int | None = None  # where the node sits in the draft's cache once fed


class ModelTreeDrafter(Drafter):
    """Proposes up to the budget's nodes, `top_k` children per expanded node at most."""

    def __init__(self, draft: LoadedModel, top_k: int = 4):
        self.loaded = draft
        self.name = f"{draft.name} tree:top{top_k}"
        self.vocab_map = draft.vocab_map
        self.top_k = top_k
        self.model = CachedModel(draft)
        self._nodes: list[_Node] = []
        self._base = 0

    def begin(self) -> None:
        self.model.reset()
        self._nodes, self._base = [], 0

    def draft(
        self,
        context: list[int],
        budget: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Iterator[Proposal]:
        # Candidates are the draft's top-k, fixed by the context: verification treats them as
        # such in sampling too (speckv.decoding.tree.sampling_tree_accept), which stays exact.
        root_logits = self.model.feed(context[self.model.length :], keep=1).logits[0, -1]
        self._base = self.model.length
        self._nodes = []
        pending: list[tuple[float, int, int, int, tuple[float, float, float]]] = []
        order = 0
        for token, signals, logp in self._children(root_logits):
            heapq.heappush(pending, (-logp, order, -1, token, signals))
            order += 1
        unexpanded: list[int] = []
        while (pending or unexpanded) and len(self._nodes) < budget:
            best = -pending[0][0] if pending else float("-inf")
            worth = [i for i in unexpanded if self._nodes[i].score > best]
            if worth:  # only children of these can outrank the best pending candidate
                unexpanded = [i for i in unexpanded if i not in worth]
                for index, logits in zip(worth, self._expand(worth), strict=True):
                    for token, signals, logp in self._children(logits):
                        heapq.heappush(
                            pending, (-(self._nodes[index].score + logp), order, index, token, signals)
                        )
                        order += 1
                continue
            negative_score, _, parent, token, signals = heapq.heappop(pending)
            depth = 0 if parent < 0 else self._nodes[parent].depth + 1
            self._nodes.append(_Node(token, parent, depth, -negative_score))
            unexpanded.append(len(self._nodes) - 1)
            yield Proposal(token, *signals, parent=parent)

    def _children(self, logits: torch.Tensor) -> list[tuple[int, tuple[float, float, float], float]]:
        """The top-k next tokens (target ids) with their signals and log-probabilities."""
        log_probs = torch.log_softmax(logits.float(), -1)
        values, indices = log_probs.topk(min(self.top_k, log_probs.shape[-1]))
        out = []
        for logp, index in zip(values.tolist(), indices.tolist(), strict=True):
            token = index if self.vocab_map is None else int(self.vocab_map[index])
            signals = tuple(signal_tensor(log_probs, index).tolist())
            out.append((token, signals, logp))
        return out

    def _expand(self, indices: list[int]) -> torch.Tensor:
        """One draft pass over these proposed nodes; their next-token logits, one row each."""
        length, count = self.model.length, len(indices)
        attention = torch.zeros(count, length + count, dtype=torch.bool)
        attention[:, : self._base] = True
        for row, index in enumerate(indices):
            attention[row, length + row] = True
            ancestor = self._nodes[index].parent
            while ancestor >= 0:  # fed before: a node is expanded after its parent was
                attention[row, self._nodes[ancestor].cache_position] = True
                ancestor = self._nodes[ancestor].parent
            self._nodes[index].cache_position = length + row
        positions = [self._base + self._nodes[i].depth for i in indices]
        tokens = [self._nodes[i].token for i in indices]
        return self.model.feed_masked(tokens, attention, positions).logits[0]

    def rollback(self, kept: int, verdict: Verdict) -> None:
        """Keep the sequence and the accepted path's fed nodes (a prefix of the path)."""
        if not self._nodes:  # this step drafted nothing
            self.model.crop(kept)
            return
        fed = []
        for index in verdict.path:
            position = self._nodes[index].cache_position
            if position is None:
                break
            fed.append(position)
        self.model.keep_positions(list(range(self._base)) + fed)
        self._nodes = []
