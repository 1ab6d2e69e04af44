"""The KV caches of a batch of sequences in one store, one row each: the batch's pass reads and
writes them in place.

A pass over several sequences needs their caches side by side. Copying per-sequence caches into
one batch and back costs O(batch × context) memory traffic per pass (at 4 summaries of ~1,000
tokens, more than the pass itself on a CPU), so the batch keeps its caches in one store instead:
per layer, keys and values of shape (rows, heads, capacity, head_dim), row r holding sequence r's
positions 0..length_r - 1. In a pass every row feeds its new tokens left-aligned (padded to the
longest), and `SlotLayer.update` writes each row's new keys at that row's own length, so a
row's positions stay contiguous and a sequence's cache is a view of its row. Padding lands past
a row's length, where the mask hides it and the next pass overwrites it.

Rows are kept dense (0..rows - 1 in use): a sequence that leaves hands its row to the last one,
whose handle moves (one row's copy, once). The capacity grows by doubling when a row needs more
positions, and the store frees its tensors when the last sequence leaves, so memory follows the
load (`SlotStore.bytes`).
"""

from __future__ import annotations

import time

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from speckv.decoding.cache import Feed, ForwardOutput, additive_mask, cached_forward, check_tree_attention
from speckv.decoding.models import LoadedModel
from speckv.decoding.tree import tree_attention, tree_positions
from speckv.errors import SpecKVError

MIN_CAPACITY = 256  # positions per row at first; doubled as rows grow
# A feed longer than this (a prompt, a draft catching up) runs over its row alone: a shared pass
# pads every row to its longest feed, so one prompt chunk would multiply the whole batch's work.
SOLO_TOKENS = 32


class SlotLayer(CacheLayerMixin):
    """One layer of the store, as transformers' attention sees it during a pass."""

    def __init__(self, store: SlotStore, index: int):
        super().__init__()
        self.store, self.index = store, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The store allocates its own tensors."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write each row's new keys and values at its own length; return every row's positions up
        to the longest row plus the new tokens (the mask says which are real)."""
        store = self.store
        keys, values = store.keys[self.index], store.values[self.index]
        new = key_states.shape[-2]
        window = store.window  # the rows in this pass: a slice, so what attention reads is a view
        for i, length in enumerate(store.lengths[window]):
            keys[window.start + i, :, length : length + new] = key_states[i]
            values[window.start + i, :, length : length + new] = value_states[i]
        end = max(store.lengths[window]) + new
        return keys[window, :, :end], values[window, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return max(self.store.lengths[self.store.window]) + query_length, 0

    def get_seq_length(self) -> int:
        return max(self.store.lengths[self.store.window], default=0)

    def get_max_length(self) -> int:
        return -1


class SlotModel:
    """One sequence's view of the store: what `CachedModel` is for a sequence decoded alone
    (`length`, `crop`, `keep_positions`, `feed`), for a sequence decoded in a batch."""

    def __init__(self, store: SlotStore, row: int):
        self.store, self.row = store, row
        self.prepared: tuple[list[int], ForwardOutput] | None = None  # (tokens, output): `SlotStore.prepare`

    @property
    def loaded(self) -> LoadedModel:
        return self.store.loaded

    @property
    def length(self) -> int:
        """Positions the sequence has fed (a prepared pass counts once its output is read)."""
        return self.store.lengths[self.row] - (len(self.prepared[0]) if self.prepared else 0)

    def reset(self) -> None:
        self.store.lengths[self.row] = 0

    def feed(self, tokens, keep=1, hidden_states=False, parents=None) -> ForwardOutput:
        """A pass of this sequence alone (the batch's other rows feed nothing), unless the batch
        already ran it (`SlotStore.prepare`)."""
        prepared = self.prepared
        if (
            prepared is not None
            and prepared[0] == list(tokens)
            and (keep, hidden_states, parents) == (1, False, None)
        ):
            self.prepared = None
            return prepared[1]
        self.unprepare()  # not what the batch expected: undo it, then feed alone
        return self.store.forward({self.row: Feed(tokens, keep, hidden_states, parents)})[self.row]

    def crop(self, kept: int) -> None:
        self.unprepare()
        self.store.lengths[self.row] = min(self.length, kept)

    def unprepare(self) -> None:
        """Undo a prepared pass nobody read (the row keeps what it held before)."""
        if self.prepared is not None:
            self.store.lengths[self.row] = self.length
            self.prepared = None

    def keep_positions(self, positions: list[int]) -> None:
        """Keep only these positions (ascending): the sequence plus a tree's accepted path, moved
        into place within the row."""
        start = next((i for i, p in enumerate(positions) if p != i), len(positions))
        if start < len(positions):
            source = torch.tensor(positions[start:], device=self.loaded.device)
            with torch.inference_mode():
                for tensors in (*self.store.keys, *self.store.values):
                    row = tensors[self.row]
                    row[:, start : len(positions)] = row.index_select(-2, source)
        self.store.lengths[self.row] = len(positions)

    def release(self) -> None:
        """The sequence is over: its row goes back to the store."""
        self.store.release(self)


class SlotStore:
    """Rows of KV cache for the sequences of a batch, all of one model."""

    def __init__(self, loaded: LoadedModel):
        check_tree_attention(loaded)  # a batch needs the explicit 4D mask, as trees do
        self.loaded = loaded
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # per row in use
        self.handles: list[SlotModel] = []  # per row in use
        self.window = slice(0, 0)  # the rows the running pass covers
        self.shared_pass: tuple[int, int, float] | None = None  # the last shared pass: rows, width, s
        self.cache = Cache(layers=[SlotLayer(self, i) for i in range(loaded.model.config.num_hidden_layers)])

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def acquire(self) -> SlotModel:
        """A row for a new sequence (empty)."""
        handle = SlotModel(self, len(self.lengths))
        self.lengths.append(0)
        self.handles.append(handle)
        return handle

    def release(self, handle: SlotModel) -> None:
        """Free `handle`'s row: the last row moves into it, so rows stay dense."""
        held = handle.store is self and 0 <= handle.row < len(self.handles)
        if not held or self.handles[handle.row] is not handle:
            raise SpecKVError("this row is not held by that sequence")
        row, last = handle.row, len(self.lengths) - 1
        if row != last:
            # A row acquired since the last pass has no tensors yet (and holds nothing to move).
            if self.keys and last < self.keys[0].shape[0]:
                with torch.inference_mode():
                    for tensor in (*self.keys, *self.values):
                        tensor[row, :, : self.lengths[last]] = tensor[last, :, : self.lengths[last]]
            moved = self.handles[last]
            moved.row = row
            self.handles[row], self.lengths[row] = moved, self.lengths[last]
        self.handles.pop()
        self.lengths.pop()
        handle.row = -1
        if not self.lengths:  # nobody left: give the memory back
            self.keys, self.values = [], []

    def forward(self, feeds: dict[int, Feed]) -> dict[int, ForwardOutput]:
        """The rows' passes: `feeds[row]` (`cache.Feed`) for the rows that feed. Each row's output
        is as if fed alone: logits (1, keep, V) (keep 0: every row), hidden states (1, n, H) when
        asked. Short feeds share one pass over every row in use (the others feed a masked dummy
        token); a feed longer than `SOLO_TOKENS` (a prompt) or the only one runs over its row
        alone, since a shared pass pads every row to its longest feed."""
        rows = len(self.lengths)
        if not feeds or any(not 0 <= row < rows for row in feeds):
            raise SpecKVError("a pass feeds rows of sequences in the store")
        if any(not feed.tokens for feed in feeds.values()):
            raise SpecKVError("every sequence of a pass feeds at least one token")
        solo = [row for row, feed in feeds.items() if len(feed.tokens) > SOLO_TOKENS or len(feeds) == 1]
        outputs = {}
        for row in solo:
            outputs |= self._pass(slice(row, row + 1), {row: feeds[row]})
        shared = {row: feed for row, feed in feeds.items() if row not in solo}
        if shared:
            started = time.perf_counter()
            outputs |= self._pass(slice(0, rows), shared)
            width = max(len(feed.tokens) for feed in shared.values())
            self.shared_pass = (rows, width, time.perf_counter() - started)
        return outputs

    def _pass(self, window: slice, feeds: dict[int, Feed]) -> dict[int, ForwardOutput]:
        """One forward over the rows of `window`."""
        first, rows = window.start, window.stop - window.start
        lengths = self.lengths[window]
        sizes = [len(feeds[row].tokens) if row in feeds else 1 for row in range(first, window.stop)]
        new = max(sizes)
        self._make_room(max(length + new for length in lengths), len(self.lengths))
        width = max(lengths) + new
        input_ids = torch.zeros(rows, new, dtype=torch.long)
        positions = torch.zeros(rows, new, dtype=torch.long)
        allowed = torch.zeros(rows, new, width, dtype=torch.bool)
        for row, (length, size) in enumerate(zip(lengths, sizes, strict=True)):
            feed = feeds.get(first + row)
            tree = (feed.parents or []) if feed else []
            unseen = size - len(tree)
            if feed is not None:
                input_ids[row, :size] = torch.tensor(feed.tokens)
            mask = tree_attention(tree, length, unseen)  # (size, length + size): the row's own layout
            allowed[row, :size, : length + size] = mask
            positions[row, :size] = torch.tensor(tree_positions(tree, length, unseen))
            for pad in range(size, new):  # padding (and idle rows) see only themselves
                allowed[row, pad, length + pad] = True
                positions[row, pad] = length + pad
        # The LM head only over the positions some row needs logits of (the same for all rows).
        size_of = {row: sizes[row - first] for row in feeds}
        wanted = sorted(
            {
                i
                for row, f in feeds.items()
                for i in range(size_of[row] - (f.keep or size_of[row]), size_of[row])
            }
        )
        device = self.loaded.device
        self.window = window
        try:
            out = cached_forward(
                self.loaded.model,
                self.cache,
                input_ids.to(device),
                torch.tensor(wanted, device=device),
                additive_mask(allowed, self.loaded)[:, None].to(device),
                positions.to(device),
                hidden_states=any(f.hidden_states for f in feeds.values()),
            )
        finally:
            self.window = slice(0, 0)
        where = {position: i for i, position in enumerate(wanted)}
        outputs = {}
        for row, feed in feeds.items():
            size, i = size_of[row], row - first
            rows_kept = [where[p] for p in range(size - (feed.keep or size), size)]
            logits = out.logits[i : i + 1, rows_kept]
            hidden = None
            if feed.hidden_states:
                hidden = tuple(layer[i : i + 1, :size] for layer in out.hidden_states)
            outputs[row] = ForwardOutput(logits, hidden)
            self.lengths[row] += size
        return outputs

    def prepare(self, feeds: dict[SlotModel, list[int]]) -> None:
        """Run the passes several sequences are about to ask for, one token row each (`keep=1`),
        as one pass: each row's `feed` then returns its output instead of running it (a batch's
        draft passes, `speckv.decoding.batch`)."""
        outputs = self.forward({slot.row: Feed(tokens, keep=1) for slot, tokens in feeds.items()})
        for slot, tokens in feeds.items():
            slot.prepared = (list(tokens), outputs[slot.row])

    def _make_room(self, positions: int, rows: int) -> None:
        """Tensors with at least `rows` rows and `positions` positions (doubling, copying once)."""
        have_rows = self.keys[0].shape[0] if self.keys else 0
        have = self.keys[0].shape[2] if self.keys else 0
        if have_rows >= rows and have >= positions:
            return
        capacity = max(have, MIN_CAPACITY)
        while capacity < positions:
            capacity *= 2
        row_capacity = max(rows, 2 * have_rows if have_rows < rows else have_rows)
        config = self.loaded.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = self.loaded.compute_dtype if self.loaded.compute_dtype.is_floating_point else torch.float32
        with torch.inference_mode():  # the pass writes into them in inference mode
            fresh = [
                torch.zeros(row_capacity, heads, capacity, dim, dtype=dtype, device=self.loaded.device)
                for _ in range(2 * config.num_hidden_layers)
            ]
            for old, new in zip((*self.keys, *self.values), fresh, strict=False):
                new[: old.shape[0], :, : old.shape[2]] = old
        layers = config.num_hidden_layers
        self.keys, self.values = fresh[:layers], fresh[layers:]
