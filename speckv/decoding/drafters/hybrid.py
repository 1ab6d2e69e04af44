"""N-gram candidates beside a draft model: an extra branch of its token tree, or, for chains,
the n-gram continuation instead of the model's chain wherever the sequence's suffix has a long
earlier match.

Copying from the prompt and the text so far is free and often right where a small draft is not
(summaries quoting their source, code repeating identifiers), and the model's tree covers the
rest. The n-gram continuation is proposed first, as one branch from the root (it is the cheapest
candidate: no forward at all); the model tree's best-first nodes follow, renumbered, and a model
node that repeats an n-gram node (same parent, same token) merges into it, so the model's
subtree continues below the n-gram's tokens instead of duplicating them. The budget counts the
proposals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch

from speckv.decoding.drafters.base import Drafter, Proposal, Verdict
from speckv.decoding.drafters.model import ModelDrafter
from speckv.decoding.drafters.ngram import NGramDrafter
from speckv.decoding.drafters.tree import ModelTreeDrafter
from speckv.decoding.verify import SamplingConfig
from speckv.records import CopyMatch


class HybridTreeDrafter(Drafter):
    """A `ModelTreeDrafter` plus at most `ngram_tokens` n-gram candidates as a first branch."""

    branches = True

    def __init__(self, model_tree: ModelTreeDrafter, ngram: NGramDrafter, ngram_tokens: int = 4):
        self.model_tree, self.ngram, self.ngram_tokens = model_tree, ngram, ngram_tokens
        self.loaded = model_tree.loaded
        self.name = f"{model_tree.name}+{ngram.name}"
        self._to_model: dict[int, int] = {}  # proposal index here -> the model tree's index

    def fresh(self) -> HybridTreeDrafter:
        return HybridTreeDrafter(self.model_tree.fresh(), self.ngram.fresh(), self.ngram_tokens)

    def begin(self) -> None:
        self.model_tree.begin()
        self.ngram.begin()

    def end(self, sequence: list[int]) -> None:
        self.model_tree.end(sequence)
        self.ngram.end(sequence)

    def draft(
        self,
        context: list[int],
        budget: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Iterator[Proposal]:
        # Deterministic candidates in sampling too: the n-gram's greedy choice (its sampled one
        # would need its own distribution, which a shared tree cannot use).
        greedy = SamplingConfig()
        branch = list(self.ngram.draft(context, min(self.ngram_tokens, budget), greedy, None))
        by_edge = {}  # (parent, token) -> index of the proposal: the tree is a trie
        for i, proposal in enumerate(branch):
            by_edge[(i - 1, proposal.token)] = i
            yield replace(proposal, parent=i - 1, probs=None)
        # Model nodes that repeat an n-gram node merge into it (their subtrees hang below it).
        self._to_model = {}
        model_index = {}  # model proposal index -> proposal index here
        count = len(branch)
        for i, proposal in enumerate(self.model_tree.draft(context, budget, sampling, generator)):
            parent = -1 if proposal.parent < 0 else model_index[proposal.parent]
            existing = by_edge.get((parent, proposal.token))
            if existing is not None:
                model_index[i] = existing
                self._to_model[existing] = i
                continue
            model_index[i], self._to_model[count] = count, i
            count += 1
            yield replace(proposal, parent=parent)

    def rollback(self, kept: int, verdict: Verdict) -> None:
        """The model tree keeps the accepted path as far as it has the nodes (none when only the
        n-gram branch had them)."""
        path = []
        for index in verdict.path:
            if index not in self._to_model:
                break
            path.append(self._to_model[index])
        self.model_tree.rollback(kept, replace(verdict, path=path))
        self.ngram.rollback(kept, verdict)


class SwitchingChainDrafter(Drafter):
    """Per step, a chain from one source: the n-gram continuation (it costs no forward, and a
    long match is often right: summaries quoting their source, code repeating itself) or the
    draft model's chain. The model's cache catches up on the tokens it skipped at its next step.

    A controller that weighs the two (SpecKV: by the chance of copies after a match that long,
    against the model's best step) chooses per step (`use_copies`). Left to itself, the drafter
    copies where the sequence's last `min_match` or more tokens occurred before. Why 2 tokens:
    under SpecKV verifying only the copies that pay, copying from 2-token matches was ahead of 3
    on all four tasks of the dev split at bf16 and fp32, or level; 1-token matches, mostly chance,
    won on summarization and lost on the other three."""

    def __init__(self, model: ModelDrafter, ngram: NGramDrafter, min_match: int = 2):
        self.model, self.ngram, self.min_match = model, ngram, min_match
        self.loaded = model.loaded
        self.name = f"{model.name}|{ngram.name}"
        self._chosen: bool | None = None  # the controller's choice for the next step
        self._told = (-1, CopyMatch())  # (context length, match) last looked up: a step asks twice

    def fresh(self) -> SwitchingChainDrafter:
        return SwitchingChainDrafter(self.model.fresh(), self.ngram.fresh(), self.min_match)

    def begin(self) -> None:
        self.model.begin()
        self.ngram.begin()
        self._told = (-1, CopyMatch())

    def end(self, sequence: list[int]) -> None:
        self.model.end(sequence)
        self.ngram.end(sequence)

    def draft(
        self,
        context: list[int],
        budget: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Iterator[Proposal]:
        source = self.ngram if self._copies(context) else self.model
        self._chosen = None  # chosen for one step
        yield from source.draft(context, budget, sampling, generator)

    def copy_match(self, context: list[int]) -> CopyMatch:
        # A sequence's contexts only grow between steps: its length names this step's lookup.
        if self._told[0] != len(context):
            self._told = (len(context), self.ngram.copy_match(context))
        return self._told[1]

    def unread(self, context: list[int]) -> int:
        return self.model.unread(context)

    def use_copies(self, copy: bool | None) -> None:
        self._chosen = copy

    def _copies(self, context: list[int]) -> bool:
        """Whether the step after `context` copies: as chosen, else by the match's length."""
        if self._chosen is not None:
            return self._chosen and self.copy_match(context).length > 0
        return self.copy_match(context).length >= self.min_match

    def chain_drafter(self, context: list[int] | None = None) -> ModelDrafter | None:
        return None if context is not None and self._copies(context) else self.model

    def rollback(self, kept: int, verdict: Verdict) -> None:
        self.model.rollback(kept, verdict)  # crops only what the model drafted; n-grams hold nothing
