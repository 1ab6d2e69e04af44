"""Several sequences, one target pass: the batched forward behind continuous batching.

On a memory-bound target a pass over a few sequences costs little more than over one (the
weights are read once per pass, whatever the batch), which is where serving throughput comes
from. `feed_together` runs the feeds of several sequences (`cache.Feed`: a verify pass's unseen
tokens plus draft, or a chunk of a prompt) as one forward:

- each sequence keeps its own KV cache (`CachedModel`), so sequences join and leave between
  passes and roll back on their own; for the pass, the caches are laid side by side, padded to
  the longest, and the new tokens of each row are aligned at the end (so the rows that need
  logits are the last ones of every row, and `logits_to_keep` still saves the LM head);
- one 4D mask says who sees whom: each token sees its own sequence's cached positions, never the
  padding, and its own ancestors among the new tokens (causal for chains, the tree for trees);
  a padding query sees only itself, so no row is all masked (softmax would be NaN);
- position ids are each sequence's own;
- afterwards each cache takes back its positions plus its new tokens.

A batch of one is the plain `CachedModel.feed`, bit for bit. The per-pass copy of the caches is
O(batch × context) memory traffic; a paged cache would avoid it, at the cost of writing the
attention ourselves (docs/serving.md says why we did not).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from speckv.decoding.cache import (
    CachedModel,
    Feed,
    ForwardOutput,
    additive_mask,
    cached_forward,
    check_tree_attention,
)
from speckv.decoding.step import DraftedStep
from speckv.decoding.tree import tree_attention, tree_positions
from speckv.errors import SpecKVError
from speckv.records import StepRecord

if TYPE_CHECKING:
    from speckv.decoding.engine import SequenceRun


def feed_together(models: list[CachedModel], feeds: list[Feed]) -> list[ForwardOutput]:
    """Run each model's feed in one forward pass; every `CachedModel` must view the same model.
    Returns each sequence's output as if fed alone: logits (1, keep, V), hidden states (1, n, H)."""
    if len(models) != len(feeds) or not models:
        raise SpecKVError("feed_together needs one feed per sequence")
    if len(models) == 1:
        return [models[0].feed(**vars(feeds[0]))]
    loaded = models[0].loaded
    if any(m.loaded.model is not loaded.model for m in models):
        raise SpecKVError("sequences of one pass must share their model")
    if any(not f.tokens for f in feeds):
        raise SpecKVError("every sequence of a pass feeds at least one token")
    check_tree_attention(loaded)  # padding needs the explicit mask, as trees do
    lengths = [m.length for m in models]
    sizes = [len(f.tokens) for f in feeds]
    width, new = max(lengths), max(sizes)
    device = loaded.device

    input_ids = torch.zeros(len(models), new, dtype=torch.long)
    positions = torch.zeros(len(models), new, dtype=torch.long)
    allowed = torch.zeros(len(models), new, width + new, dtype=torch.bool)
    for row, (feed, length, size) in enumerate(zip(feeds, lengths, sizes, strict=True)):
        start = new - size  # the row's new tokens are right-aligned
        input_ids[row, start:] = torch.tensor(feed.tokens)
        tree = feed.parents or []
        unseen = size - len(tree)
        positions[row, start:] = torch.tensor(tree_positions(tree, length, unseen))
        positions[row, :start] = length
        mask = tree_attention(tree, length, unseen)  # (size, length + size)
        allowed[row, start:, :length] = mask[:, :length]
        allowed[row, start:, width + start :] = mask[:, length:]
        for pad in range(start):  # a padding query sees itself only
            allowed[row, pad, width + pad] = True

    cache = _side_by_side(models, lengths, width)
    out = cached_forward(
        loaded.model,
        cache,
        input_ids.to(device),
        0 if any(f.keep == 0 for f in feeds) else max(f.keep for f in feeds),
        additive_mask(allowed, loaded)[:, None].to(device),
        positions.to(device),
        hidden_states=any(f.hidden_states for f in feeds),
    )
    keep = out.logits.shape[1]
    outputs = []
    for row, (model, feed, length, size) in enumerate(zip(models, feeds, lengths, sizes, strict=True)):
        taken = torch.cat([torch.arange(length), torch.arange(width + new - size, width + new)]).to(device)
        _take_back(model, cache, row, taken)
        model.length = length + size
        logits = out.logits[row : row + 1, keep - (feed.keep or size) :]  # keep 0: every row
        hidden = None
        if feed.hidden_states:
            hidden = tuple(layer[row : row + 1, new - size :] for layer in out.hidden_states)
        outputs.append(ForwardOutput(logits, hidden))
    return outputs


def _side_by_side(models: list[CachedModel], lengths: list[int], width: int) -> DynamicCache:
    """One cache holding every sequence's cached positions, padded with zeros to `width`."""
    cache = DynamicCache(config=models[0].loaded.model.config)
    if width == 0:
        return cache
    source = next(m for m, length in zip(models, lengths, strict=True) if length > 0)
    with torch.inference_mode():  # the caches' tensors were made in inference mode
        for index, layer in enumerate(source.cache.layers):
            heads, dim = layer.keys.shape[1], layer.keys.shape[3]
            keys = layer.keys.new_zeros(len(models), heads, width, dim)
            values = layer.values.new_zeros(len(models), heads, width, layer.values.shape[3])
            for row, (model, length) in enumerate(zip(models, lengths, strict=True)):
                if length:
                    keys[row, :, :length] = model.cache.layers[index].keys[0]
                    values[row, :, :length] = model.cache.layers[index].values[0]
            cache.update(keys, values, index)
    return cache


def _take_back(model: CachedModel, batched: DynamicCache, row: int, positions: torch.Tensor) -> None:
    """The sequence's cache becomes its own positions of the batched cache (a copy)."""
    model._check_plain_layers()
    with torch.inference_mode():
        for own, shared in zip(model.cache.layers, batched.layers, strict=True):
            keys = shared.keys[row : row + 1].index_select(-2, positions)
            values = shared.values[row : row + 1].index_select(-2, positions)
            if not own.is_initialized:
                own.lazy_initialization(keys, values)
            own.keys, own.values = keys, values


class BatchPace:
    """The batch's output, all sequences together, in tokens per second of whole ticks (drafting,
    the pass, judging): an average over recent ticks (weight `weight` for the newest), which the
    controllers weigh a step's time against."""

    def __init__(self, weight: float = 0.2):
        self.weight = weight
        self.tokens_per_s: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = tokens / seconds
        previous = self.tokens_per_s
        self.tokens_per_s = rate if previous is None else previous + self.weight * (rate - previous)


def step_together(
    runs: list[SequenceRun], prompt_budget: int | None = None, pace: BatchPace | None = None
) -> list[tuple[StepRecord, list[int]] | None]:
    """One tick of a batch: each run either steps (drafts, then its tokens join the shared verify
    pass, then it judges and rolls back) or, while the prompt it has not read is longer than what
    is left of `prompt_budget` (prompt tokens read per pass, in run order; None: no limit), reads
    a chunk of it (or waits, once the budget is spent).
    Returns each run's (record, new tokens), None for a run that only read prompt this tick.
    `pace` tells the controllers the batch's recent output and learns this tick's."""
    tick_start = time.perf_counter()
    budget = prompt_budget
    pending: dict[int, DraftedStep] = {}
    feeds: dict[int, Feed] = {}
    for run in runs:
        if run.decoder.controller is not None:
            run.decoder.controller.observe_batch(len(runs), pace.tokens_per_s if pace else None)
    for i, run in enumerate(runs):
        unread = run.unread_prompt()
        if budget is not None and unread > budget:
            if budget > 0:  # this tick's share of the prompt; the rest waits for later ticks
                feeds[i] = run.prompt_chunk(budget)
                budget = 0
            continue
        if budget is not None:
            budget -= unread  # the step's pass reads the rest of its prompt
        pending[i] = run.draft()
        feeds[i] = run.feed(pending[i])
    if not feeds:
        return [None] * len(runs)
    order = sorted(feeds)
    started = time.perf_counter()
    outputs = dict(
        zip(
            order,
            feed_together([runs[i].decoder.verifier.model for i in order], [feeds[i] for i in order]),
            strict=True,
        )
    )
    results = [
        runs[i].settle(pending[i], outputs[i], started) if i in pending else None for i in range(len(runs))
    ]
    if pace is not None:
        tokens = sum(len(result[1]) for result in results if result is not None)
        pace.observe(tokens, time.perf_counter() - tick_start)
    return results
