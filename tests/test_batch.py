"""Several sequences in one target pass (`speckv.decoding.batch`): each sequence's output is what
it is alone, whatever the others draft, however long their prompts, and when they join or end."""

from __future__ import annotations

import pytest
import torch
from test_engine import reference_greedy

from speckv.controllers import make_controller
from speckv.decoding.batch import step_together
from speckv.decoding.cache import CachedModel, Feed
from speckv.decoding.drafters import ModelTreeDrafter, NGramDrafter
from speckv.decoding.engine import SpeculativeDecoder
from speckv.decoding.slots import SlotStore
from speckv.decoding.verify import SamplingConfig
from speckv.errors import SpecKVError

PROMPTS = [[5], [7, 3, 9, 11, 2], [12, 13, 14, 12, 13, 14, 12, 13], list(range(3, 40)), [9, 9]]


def decoders(target, drafts, sampling=None):
    """A mix: target alone, chains of two drafts, a tree, n-grams."""
    return [
        SpeculativeDecoder(target, None, None, sampling, eos_token_ids=()),
        SpeculativeDecoder(target, drafts["close"], make_controller("fixed:3"), sampling, eos_token_ids=()),
        SpeculativeDecoder(
            target, drafts["unrelated"], make_controller("heuristic"), sampling, eos_token_ids=()
        ),
        SpeculativeDecoder(
            target, ModelTreeDrafter(drafts["close"]), make_controller("tree:6"), sampling, eos_token_ids=()
        ),
        SpeculativeDecoder(target, NGramDrafter(64), make_controller("fixed:4"), sampling, eos_token_ids=()),
    ]


def run_batch(runs, prompt_budget=None, join_at=None):
    """Tick until every run is done; `join_at[i]` = the tick run i joins at."""
    outputs = {i: [] for i in range(len(runs))}
    tick = 0
    while not all(run.done for run in runs):
        live = [i for i, run in enumerate(runs) if not run.done and (join_at or {}).get(i, 0) <= tick]
        for i, result in zip(live, step_together([runs[i] for i in live], prompt_budget), strict=True):
            if result is not None:
                outputs[i].extend(result[1])
        tick += 1
    return [outputs[i] for i in range(len(runs))]


@pytest.mark.parametrize("prompt_budget", [None, 4])
def test_each_sequence_of_a_batch_decodes_as_alone(tiny_target, tiny_drafts, prompt_budget):
    store = SlotStore(tiny_target)
    runs = [
        d.start(p, 20, cache=store.acquire())
        for d, p in zip(decoders(tiny_target, tiny_drafts), PROMPTS, strict=True)
    ]
    outputs = run_batch(runs, prompt_budget, join_at={3: 2, 4: 5})  # two join late
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output == reference_greedy(tiny_target.model, prompt, 20)


def test_a_long_prompt_is_read_in_chunks_while_others_step(tiny_target, tiny_drafts):
    short, long = decoders(tiny_target, tiny_drafts)[1:3]
    store = SlotStore(tiny_target)
    runs = [
        short.start([5, 6], 12, cache=store.acquire()),
        long.start(list(range(3, 60)), 4, cache=store.acquire()),
    ]
    first = step_together(runs, prompt_budget=16)
    # The short one stepped (its pass read its last prompt token); the long one read 15 of 56.
    assert first[0] is not None and first[1] is None
    assert long.verifier.model.length == 15
    outputs = run_batch(runs, prompt_budget=16)
    assert outputs[1] == reference_greedy(tiny_target.model, list(range(3, 60)), 4)


def test_sampled_sequences_in_a_batch_reproduce_their_seeds(tiny_target, tiny_drafts):
    sampling = SamplingConfig(temperature=1.0, seed=7)
    alone = [
        d.generate(p, 16).token_ids
        for d, p in zip(decoders(tiny_target, tiny_drafts, sampling), PROMPTS, strict=True)
    ]
    store = SlotStore(tiny_target)
    runs = [
        d.start(p, 16, cache=store.acquire())
        for d, p in zip(decoders(tiny_target, tiny_drafts, sampling), PROMPTS, strict=True)
    ]
    assert run_batch(runs) == alone


def test_the_store_gives_each_row_its_own_logits_and_cache(tiny_target, monkeypatch):
    monkeypatch.setattr("speckv.decoding.slots.MIN_CAPACITY", 4)  # grow during the test
    store = SlotStore(tiny_target)
    rows = [store.acquire() for _ in range(3)]
    alone = [CachedModel(tiny_target) for _ in range(3)]
    for row, model, tokens in zip(rows[:2], alone[:2], ([5, 6, 7, 8], [9]), strict=True):
        row.feed(tokens)
        model.feed(tokens)
    feeds = [
        Feed([3, 4], keep=2),
        Feed([10, 11, 12], keep=1, parents=[-1, -1]),
        Feed([20, 21, 22, 23, 24], keep=0),
    ]
    outputs = store.forward({row.row: feed for row, feed in zip(rows, feeds, strict=True)})
    for row, model, feed in zip(rows, alone, feeds, strict=True):
        expected = model.feed(**vars(feed))
        mine = outputs[row.row]
        assert mine.logits.shape == expected.logits.shape  # keep 0: every row, as alone
        torch.testing.assert_close(mine.logits, expected.logits, rtol=1e-4, atol=1e-4)
        assert row.length == model.length
    # A row leaves: the last one moves into its place and keeps its cache.
    before = store.keys[0][2, :, : rows[2].length].clone()
    rows[0].release()
    assert rows[2].row == 0 and rows[1].row == 1 and store.lengths == [5, 4]
    torch.testing.assert_close(store.keys[0][0, :, : rows[2].length], before)
    next_alone = alone[2].feed([30], keep=1).logits
    torch.testing.assert_close(rows[2].feed([30]).logits, next_alone, rtol=1e-4, atol=1e-4)
    rows[1].release()
    rows[2].release()
    assert store.bytes == 0  # nobody left: the memory goes back
    with pytest.raises(SpecKVError, match="not held"):
        rows[2].release()
    again = store.acquire()
    with pytest.raises(SpecKVError, match="at least one token"):
        store.forward({again.row: Feed([])})


def test_the_batch_table_picks_gamma_by_batch_size():
    controller = make_controller("batch-table:1=3,2=2,4=1,8=0")
    assert controller.describe() == "batch-table:1=3,2=2,4=1,8=0"
    for sequences, gamma in ((1, 3), (2, 2), (3, 2), (4, 1), (7, 1), (8, 0), (30, 0)):
        controller.observe_batch(sequences)
        assert controller.begin_step() == gamma
    assert make_controller("batch-table").begin_step() == 3  # vLLM-like default, alone
    for bad in ("batch-table:2=3", "batch-table:1=-1", "batch-table:1=x"):
        with pytest.raises(SpecKVError):
            make_controller(bad)


def test_speckv_drafts_less_as_the_batch_grows():
    from speckv.controllers.speckv import shipped_levels

    level = shipped_levels()[0]
    budgets = []
    for sequences in (1, 2, 4, 8, 16):
        controller = make_controller("speckv-step", compression=level)
        controller.observe_batch(sequences)
        budgets.append(controller.begin_step())
    assert budgets[0] > 0 and budgets[-1] == 0  # speculation switches itself off in a large batch
    assert budgets == sorted(budgets, reverse=True)


def test_a_short_prompt_steps_at_once_beside_a_long_one(tiny_target, tiny_drafts):
    long, short = decoders(tiny_target, tiny_drafts)[1:3]
    store = SlotStore(tiny_target)
    # The long prompt came first, but the short one's whole prompt fits the budget: it steps now.
    runs = [
        long.start(list(range(3, 60)), 4, cache=store.acquire()),
        short.start([5, 6, 7, 8], 6, cache=store.acquire()),
    ]
    first = step_together(runs, prompt_budget=16)
    assert first[0] is None and first[1] is not None
    assert long.verifier.model.length == 13  # what the short one's 3 unread tokens left of 16
