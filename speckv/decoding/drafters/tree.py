"""Token trees from a drafter's own forward (a draft model, a feature head): a batch of nodes
expanded per draft forward, the nodes with the best path probability proposed, best first
(EAGLE-2's selection).

A node's score is the draft's log-probability of the whole path from the root, so a node never
scores above its parent, and the best n nodes always form a tree. Proposals come best first,
lazily: the best node not yet proposed is proposed as soon as no unexpanded node scores above
it (only their children could outrank it). Otherwise a round feeds, in one draft pass with a
tree attention mask (each node sees the sequence and its ancestors), the `width` best unexpanded
nodes that could still enter the tree (score above the budget-th best found so far) and adds
their `top_k` children. So a step costs one draft forward per round, about one per depth, not
one per node: on a CPU a forward over a few tokens costs about what one token does. And since
the loop stops pulling when the controller says so, a small tree pays only the rounds it needed.

Every prefix of the proposals is the best tree of its size (what `Controller.verify_count`
relies on). `TreeDrafter` is that search; a subclass says what a forward over nodes is and what
its state keeps after verification: `ModelTreeDrafter` keeps the sequence plus the fed nodes of
the accepted path in the draft model's cache, gathered per layer.
"""

from __future__ import annotations

from abc import abstractmethod
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
    parent: int  # node index, -1 = root
    depth: int
    score: float  # log-probability of the path from the root
    signals: tuple[float, float, float]
    cache_position: int | None = None  # where the node sits in the draft's cache once fed
    output: torch.Tensor | None = None  # what the forward that fed it returned, if a subclass keeps it


class TreeDrafter(Drafter):
    """Proposes up to the budget's nodes; `top_k` children per expanded node, `width` nodes
    expanded per forward. Subclasses implement `_root`, `_forward` and `_keep`."""

    branches = True

    def __init__(self, vocab_map: torch.Tensor | None, top_k: int, width: int):
        self.vocab_map = vocab_map
        self.top_k, self.width = top_k, width
        self.forwards = 0  # forwards over tree nodes in the last step (the rounds)
        self._nodes: list[_Node] = []
        self._proposed: list[int] = []  # node index of each proposal
        self._base = 0  # cache length before the tree
        self._first = 0  # position of the tree's depth-0 nodes

    @abstractmethod
    def _root(self, context: list[int]) -> torch.Tensor | None:
        """Catch up with `context` (the cache then holds `_cache_length()` entries); the logits
        of the token after it, or None to draft nothing this step."""

    @abstractmethod
    def _cache_length(self) -> int: ...

    @abstractmethod
    def _forward(self, indices: list[int], attention: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """Feed these nodes in one pass with this boolean attention over cache + nodes; their
        next-token logits, one row each."""

    @abstractmethod
    def _keep(self, kept: int, verdict: Verdict, fed: list[int] | None) -> None:
        """After verification: `fed` = cache positions of the accepted path's fed nodes (a prefix
        of the path); None when this step grew no tree."""

    def draft(
        self,
        context: list[int],
        budget: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Iterator[Proposal]:
        # Candidates are the draft's top-k, fixed by the context: verification treats them as
        # such in sampling too (speckv.decoding.tree.sampling_tree_accept), which stays exact.
        self._nodes, self._proposed, self.forwards = [], [], 0
        root_logits = self._root(context)
        if root_logits is None:
            return
        self._base, self._first = self._cache_length(), len(context)
        self._add_children(-1, root_logits)
        waiting = list(range(len(self._nodes)))  # not proposed yet
        unexpanded = list(waiting)
        number: dict[int, int] = {}  # node index -> proposal index
        while waiting and len(self._proposed) < budget:
            # Best first; a tie goes to the older node, so a parent always precedes its children.
            best = min(waiting, key=lambda i: (-self._nodes[i].score, i))
            rank = (-self._nodes[best].score, best)
            if not any((-self._nodes[i].score, i) < rank for i in unexpanded):
                waiting.remove(best)
                node = self._nodes[best]
                number[best] = len(self._proposed)
                self._proposed.append(best)
                yield Proposal(
                    node.token, *node.signals, parent=-1 if node.parent < 0 else number[node.parent]
                )
                continue
            batch, pruned = self._round(unexpanded, budget)
            unexpanded = [i for i in unexpanded if i not in batch and i not in pruned]
            for index, logits in zip(batch, self._expand(batch), strict=True):
                first = len(self._nodes)
                self._add_children(index, logits)
                waiting.extend(range(first, len(self._nodes)))
                unexpanded.extend(range(first, len(self._nodes)))
            self.forwards += 1

    def _round(self, unexpanded: list[int], budget: int) -> tuple[list[int], list[int]]:
        """(the nodes to expand in one pass, the nodes never worth expanding). A node's children
        can enter the tree only if they outrank the room-th best node waiting (room = proposals
        left; a child scores at most its parent, and loses ties to older nodes) and fit within
        the budget's depth (a chain is the deepest tree). Both limits only tighten, so a node
        that fails them is dropped for good."""
        proposed = set(self._proposed)
        room = budget - len(proposed)
        waiting = sorted((n.score for i, n in enumerate(self._nodes) if i not in proposed), reverse=True)
        threshold = waiting[room - 1] if len(waiting) >= room else float("-inf")
        useful, pruned = [], []
        for i in sorted(unexpanded, key=lambda i: (-self._nodes[i].score, i)):
            node = self._nodes[i]
            fits = node.depth + 2 <= budget and node.score > threshold
            (useful if fits else pruned).append(i)
        return useful[: self.width], pruned

    def _add_children(self, parent: int, logits: torch.Tensor) -> None:
        """The top-k next tokens (target ids) after `parent`, as nodes with their signals."""
        log_probs = torch.log_softmax(logits.float(), -1)
        values, indices = log_probs.topk(min(self.top_k, log_probs.shape[-1]))
        base_score, depth = (
            (0.0, 0) if parent < 0 else (self._nodes[parent].score, self._nodes[parent].depth + 1)
        )
        for logp, index in zip(values.tolist(), indices.tolist(), strict=True):
            token = index if self.vocab_map is None else int(self.vocab_map[index])
            signals = tuple(signal_tensor(log_probs, index).tolist())
            self._nodes.append(_Node(token, parent, depth, base_score + logp, signals))

    def _expand(self, indices: list[int]) -> torch.Tensor:
        """One forward over these nodes: each sees the cache before the tree, its ancestors and
        itself, at the position of its depth."""
        length, count = self._cache_length(), len(indices)
        attention = torch.zeros(count, length + count, dtype=torch.bool)
        attention[:, : self._base] = True
        for row, index in enumerate(indices):
            attention[row, length + row] = True
            ancestor = self._nodes[index].parent
            while ancestor >= 0:  # fed before: a node exists only once its parent was expanded
                attention[row, self._nodes[ancestor].cache_position] = True
                ancestor = self._nodes[ancestor].parent
            self._nodes[index].cache_position = length + row
        return self._forward(indices, attention, [self._first + self._nodes[i].depth for i in indices])

    def rollback(self, kept: int, verdict: Verdict) -> None:
        fed = None
        if self._nodes:
            fed = []
            for proposal in verdict.path:
                position = self._nodes[self._proposed[proposal]].cache_position
                if position is None:
                    break
                fed.append(position)
        self._keep(kept, verdict, fed)
        self._nodes, self._proposed = [], []


class ModelTreeDrafter(TreeDrafter):
    """A draft model's token trees, in its own KV cache."""

    def __init__(self, draft: LoadedModel, top_k: int = 4, width: int = 4):
        super().__init__(draft.vocab_map, top_k, width)
        self.loaded = draft
        self.name = f"{draft.name} tree:top{top_k}"
        self.model = CachedModel(draft)

    def fresh(self) -> ModelTreeDrafter:
        return ModelTreeDrafter(self.loaded, self.top_k, self.width)

    def begin(self) -> None:
        self.model.reset()
        self._nodes, self._proposed = [], []

    def _root(self, context: list[int]) -> torch.Tensor:
        return self.model.feed(context[self.model.length :], keep=1).logits[0, -1]

    def _cache_length(self) -> int:
        return self.model.length

    def _forward(self, indices: list[int], attention: torch.Tensor, positions: list[int]) -> torch.Tensor:
        tokens = [self._nodes[i].token for i in indices]
        return self.model.feed_masked(tokens, attention, positions).logits[0]

    def _keep(self, kept: int, verdict: Verdict, fed: list[int] | None) -> None:
        if fed is None:
            self.model.crop(kept)
        else:
            self.model.keep_positions(list(range(self._base)) + fed)
